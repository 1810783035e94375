"""Research experiments built on `mole_lightning`, kept outside the installed package.

Each subfolder or module is one experiment (``conflict_study``, ``real_conflict_study``), importable from the
repository root (``experiments.<name>``) and driven by its script in ``tools/``; ``smollm2`` makes the real
SmolLM2-135M-Instruct hub folder they and the real-model tests share.
"""
