"""``mole-export``: a training checkpoint for inference, in the format of the tool that will load it.

Usage::

    mole-export runs/demo/checkpoints/last.ckpt --out exports/demo                 # --to mole
    mole-export runs/lora/checkpoints/last.ckpt --out exports/lora-hf --to llava-hf --merge
    mole-export runs/lora/checkpoints/last.ckpt --out exports/lora-peft --to peft --write-base

Formats (``--to``):

- ``mole`` (default, any K): ``adapter_model.safetensors`` + ``adapter_config.json`` (+ ``training_config.json``),
  for ``load_llava_hf(base, adapter=out)``, ``load_adapters``, ``mole-train --model.adapter_path``, mole-chat,
  lmms-eval.
- ``peft`` (K = 1): a peft LoRA folder for a llava-hf base, for
  ``PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), out)``.
- ``llava-hf --merge`` (K = 1): LoRA merged into a ``LlavaForConditionalGeneration`` folder with its processor, for
  transformers, vLLM, SGLang.

The input is a ``.ckpt`` file or a ``mole`` export folder. ``--base`` names the llava-hf folder a ``mole``/``peft``
export refers to; ``--write-base`` writes the frozen base (llava-hf layout, any K: adapters and routers left out)
into ``OUT/base`` instead. A llava-hf folder's processor ships a chat template that renders llava-hf content lists
(``{"type": "image"}``, ``{"type": "text"}``) as the run's ``data.template`` did (``vicuna_v1``, ``tokenizer``,
``processor``, ...: read from the checkpoint; ``--template`` / ``--system-prompt`` override it). The export is
written to a temporary folder and renamed into place; a non-empty ``--out`` is replaced only with ``--overwrite``.
Prints each file written with its size; on failure prints one line naming the problem and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from mole_lightning.models.export import CHAT_TEMPLATES, EXPORT_FORMATS, check_destination, file_sizes, human_size


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``mole-export`` (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(prog="mole-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by mole-train, or a mole export folder")
    parser.add_argument("--out", required=True, help="export folder (created; must be empty unless --overwrite)")
    parser.add_argument("--to", choices=EXPORT_FORMATS, default="mole", help="output format (default: mole)")
    parser.add_argument("--merge", action="store_true", help="llava-hf: merge plain LoRA (K = 1) into the weights")
    parser.add_argument("--base", help="mole/peft: the llava-hf base folder or hub id to refer to")
    parser.add_argument("--write-base", action="store_true", help="mole/peft: write the base as llava-hf to OUT/base")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument(
        "--template",
        choices=CHAT_TEMPLATES,
        help="llava-hf / --write-base: the data.template whose prompts the chat template renders (default: the "
        "checkpoint's)",
    )
    parser.add_argument(
        "--system-prompt", help="llava-hf / --write-base: the data.system_prompt (default: the checkpoint's)"
    )
    return parser


LIBRARY_TO_FLAGS = (
    ("to='peft' / 'mole'", "--to peft / mole"),
    ("to='mole' / 'peft'", "--to mole / peft"),
    ("to='peft' with base=DIR", "--to peft --base DIR"),
    ("to='llava-hf'", "--to llava-hf"),
    ("to='mole'", "--to mole"),
    ("to='peft'", "--to peft"),
    ("merge=True", "--merge"),
    ("write_base=True", "--write-base"),
    ("overwrite=True", "--overwrite"),
    ("base=DIR", "--base DIR"),
)
"""The export library's keyword arguments, as this command's flags, in its one-line errors."""


def as_flags(message: str) -> str:
    """A library error with its keyword arguments named as this command's flags."""
    for keyword, flag in LIBRARY_TO_FLAGS:
        message = message.replace(keyword, flag)
    return message


def main(argv: list[str] | None = None) -> int:
    """Parses arguments, writes the export and prints its files; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if not os.path.exists(args.checkpoint):  # before importing the trainer (seconds)
            raise FileNotFoundError(f"input {args.checkpoint!r} does not exist")
        check_destination(args.out, overwrite=args.overwrite)
        from mole_lightning.checkpoints import export_checkpoint  # after the checks: importing it takes seconds

        directory = export_checkpoint(
            args.checkpoint,
            args.out,
            to=args.to,
            merge=args.merge,
            base=args.base,
            write_base=args.write_base,
            overwrite=args.overwrite,
            template=args.template,
            system_prompt=args.system_prompt,
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mole-export: error: {as_flags(message)}", file=sys.stderr)
        return 1
    sizes = file_sizes(directory)
    print(f"wrote {directory} ({args.to}):")
    for name, size in sizes:
        print(f"  {human_size(size):>9}  {name}")
    print(f"  {human_size(sum(size for _, size in sizes)):>9}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
