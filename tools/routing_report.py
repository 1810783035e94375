"""The routing report; the command is ``mole-routing-report`` (``mole_lightning.routing_report``). This script runs
the same for old command lines::

    python tools/routing_report.py --ckpt CKPT --tokenizer DIR --val name=SHARDS ... --out DIR [--html FILE]
"""

from __future__ import annotations

import sys

from mole_lightning.routing_report import build_parser, data_settings, main

__all__ = ["build_parser", "data_settings", "main"]

if __name__ == "__main__":
    sys.exit(main())
