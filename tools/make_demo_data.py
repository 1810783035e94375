"""Write the synthetic demo data set: ``general``/``doc``/``med`` shards (train and val) and a demo tokenizer.

The command is ``mole-demo-data`` (``mole_lightning.data.demo.main``); this script runs the same for old command lines::

    python tools/make_demo_data.py --out data/demo [--train 2000 --val 100 --seed 0]
"""

from __future__ import annotations

import sys

from mole_lightning.data.demo import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
