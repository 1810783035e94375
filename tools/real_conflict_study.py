"""The data-conflict study on real pretrained weights (SmolLM2-135M-Instruct by default): plain LoRA, the
parameter-matched dense LoRA, MoLE and source-supervised MoLE on three conflicting word-permutation domains.

The study is `experiments.real_conflict_study` (``python -m experiments.real_conflict_study`` runs the same); this
script puts the repository root on the import path. Design and time budget: ``docs/conflict_study.md``.

Examples::

    python tools/real_conflict_study.py --out out/real_conflict                  # default: 2 CPU cores, ~33 min
    python tools/real_conflict_study.py --quick --out /tmp/real_quick            # smoke run, a few minutes
    python tools/real_conflict_study.py --device cuda --out out/real_conflict_gpu  # full length on one GPU
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the study lives in experiments/ at the repository root, outside the installed package
    sys.path.insert(0, REPO)

from experiments.real_conflict_study import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
