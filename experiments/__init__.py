"""Research experiments built on `mole_lightning`, kept outside the installed package.

Each subfolder is one experiment, importable from the repository root (``experiments.<name>``) and driven by its
script in ``tools/``.
"""
