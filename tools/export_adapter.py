"""Export a training checkpoint's adapters for inference: ``adapter_model.safetensors`` + ``adapter_config.json``.

Usage::

    python tools/export_adapter.py runs/demo/checkpoints/last.ckpt --out exports/demo

The export loads onto a base model built the same way with ``mole_lightning.models.load_adapters(base, out)``;
``training_config.json`` beside it records the architecture and MoLE settings of the run.
"""

from __future__ import annotations

import argparse

from mole_lightning.training.export import export_checkpoint


def main(argv: list[str] | None = None) -> None:
    """Parses arguments and writes the export."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by mole-train")
    parser.add_argument("--out", required=True, help="export directory")
    args = parser.parse_args(argv)
    directory = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {directory}/adapter_model.safetensors and adapter_config.json")


if __name__ == "__main__":
    main()
