"""Export a training checkpoint; the command is ``mole-export`` (``mole_lightning.export_command``). This script
runs the same for old command lines::

    python tools/export_adapter.py CKPT --out DIR [--to mole|peft|llava-hf] [--merge]
"""

from __future__ import annotations

import sys

from mole_lightning.export_command import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
