"""``python -m mole_lightning fit --config configs/demo.yaml``: the same as the ``mole-train`` console script."""

from mole_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
