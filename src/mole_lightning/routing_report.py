"""``mole-routing-report``: how the tokens of each validation source are routed to the experts of every MoLE layer.

Usage::

    mole-routing-report --ckpt runs/demo/checkpoints/last.ckpt --tokenizer demo_data/tokenizer \
        --val general=demo_data/val/general-000000.tar --val doc=demo_data/val/doc-000000.tar \
        --out runs/demo/routing --html runs/demo/routing/routing.html
    mole-routing-report --adapter adapters/demo --tokenizer demo_data/tokenizer ... --out report/
    mole-routing-report --ckpt CKPT --preset llava-1.5-7b --model-kwargs '{"projector_path": ...}' ...

The model is the architecture and MoLE config recorded by training (a checkpoint's hyper-parameters, or
``training_config.json`` of an export), or ``--preset`` (default ``tiny``) with any ``build_preset`` argument via
``--model-kwargs``, with the trained tensors of an exported adapter (``save_adapters`` directory) or of a Lightning
checkpoint (its ``state_dict`` entries named ``model.<parameter>``; every trainable parameter must be there). A
random base (``tiny``) is rebuilt with ``--seed`` (default: the training module's ``model_seed``), as the
checkpoint holds only the trained tensors.

For at most ``--max-samples`` samples per source, full conversations (prompt and answer, as in training) are run
through the model and every valid token's expert is counted per layer, split into image and text tokens. Written
to ``--out``:

* ``routing_fractions.csv`` -- ``layer, token_type (all|image|text), source, tokens, expert_0..expert_{K-1}``;
  each row's expert fractions sum to 1;
* ``specialization.csv`` -- per layer and token type, ``MI(source; expert)`` in bits, ``H(source)`` and their ratio;
* ``routing_<token_type>_<layers>.png`` -- one heatmap figure per group of ``--layers-per-figure`` layers;
* ``summary.json`` -- sources, layers, sample counts and the per-layer MI of all tokens;
* with ``--html FILE``: one self-contained page with the heatmaps, MI per layer and ``--html-samples`` answers per
  source whose tokens are coloured by their expert at a chosen layer
  (:mod:`mole_lightning.eval.routing_page`).

One line per layer with the MI is printed.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import sys
from typing import Any

import torch

from mole_lightning.checkpoints import (
    CheckpointError,
    checkpoint_data_settings,
    checkpoint_hparams,
    load_checkpoint_state,
    load_export,
    read_checkpoint,
    read_training_config,
    recorded_data_settings,
)
from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.data.images import ASPECTS
from mole_lightning.eval.routing_analysis import SELECTIONS, RoutingAccumulator
from mole_lightning.eval.routing_page import heatmap_pngs, render_routing_page, sample_routing
from mole_lightning.generation import take_rows
from mole_lightning.models import build_preset
from mole_lightning.training import MoLELightningModule


def parse_sources(values: list[str]) -> dict[str, dict[str, str]]:
    """``["name=urls", ...]`` → ``{name: {"urls": urls}}``."""
    sources: dict[str, dict[str, str]] = {}
    for value in values:
        name, sep, urls = value.partition("=")
        if not sep or not name or not urls:
            raise SystemExit(f"--val expects NAME=SHARDS, got {value!r}")
        sources[name] = {"urls": urls}
    return sources


def read_checkpoint_file(path: str, trust: bool = False) -> dict[str, Any]:
    """``--ckpt`` (:func:`~mole_lightning.checkpoints.read_checkpoint`; tensors and plain values only unless
    ``trust``).

    Raises:
        SystemExit: one line naming the problem (and the flag that reads pickled files).
    """
    try:
        return read_checkpoint(path, trust=trust)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    except CheckpointError as error:
        hint = "" if trust else "; pass --trust-checkpoint if you trust this file (it may hold pickled objects)"
        raise SystemExit(f"{error}{hint}") from None


def build_model(args: argparse.Namespace, checkpoint: dict[str, Any] | None = None) -> Any:
    """The model with the adapter or checkpoint tensors loaded, in eval mode.

    Without ``--preset`` and ``--model-kwargs`` the architecture and MoLE config are the ones training recorded (the
    checkpoint's hyper-parameters, or ``training_config.json`` of an export); otherwise, or when nothing was
    recorded, the preset (default ``tiny``) with the extra arguments. ``checkpoint``: ``--ckpt`` already read.
    """
    hparams: dict[str, Any] = {}
    if args.ckpt:
        if checkpoint is None:
            checkpoint = read_checkpoint_file(args.ckpt, args.trust_checkpoint)
        hparams = checkpoint_hparams(checkpoint)
    else:
        hparams = read_training_config(args.adapter) or {}
    seed = args.seed
    if seed is None:
        seed = hparams["model_seed"] if isinstance(hparams.get("model_seed"), int) else 0
    if args.preset is None and args.model_kwargs is None and hparams.get("architecture"):
        module = MoLELightningModule.from_hparams({**hparams, "tokenizer": args.tokenizer, "model_seed": seed})
        model = module.build_model()
    else:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        torch.manual_seed(seed)
        mole = None if args.adapter else "preset"
        model = build_preset(args.preset or "tiny", tokenizer=args.tokenizer, mole=mole, **kwargs)
    try:
        if args.adapter:
            load_export(model, args.adapter)
        elif checkpoint is not None:  # every trainable parameter must be there; tensors the model lacks are skipped
            load_checkpoint_state(model, checkpoint, strict=False, source=f"--ckpt {args.ckpt}")
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    return model.eval()


def data_settings(args: argparse.Namespace, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """How samples become inputs: each of ``--template``, ``--system-prompt``, ``--image-aspect``, ``--max-length``
    when given, else the run's (recorded in the checkpoint or the export), else the DataModule's default.
    ``checkpoint``: ``--ckpt`` already read (read with ``--trust-checkpoint``'s setting otherwise)."""
    if args.ckpt:
        if checkpoint is None:
            checkpoint = read_checkpoint_file(args.ckpt, args.trust_checkpoint)
        recorded = checkpoint_data_settings(checkpoint)
    else:
        recorded = recorded_data_settings(args.adapter)
    parameters = inspect.signature(MixedInstructionDataModule.__init__).parameters
    defaults = {key: parameters[key].default for key in ("template", "system_prompt", "image_aspect", "max_length")}
    given = {key: getattr(args, key) for key in defaults}
    return {key: given[key] if given[key] is not None else recorded.get(key, defaults[key]) for key in defaults}


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts with the same keys as CSV."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(prog="mole-routing-report", description=__doc__.splitlines()[0])
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--adapter", help="exported adapter directory (save_adapters)")
    weights.add_argument("--ckpt", help="Lightning checkpoint with model.* tensors")
    parser.add_argument("--preset", help="base model preset (build_preset name; default: as trained, else tiny)")
    parser.add_argument("--model-kwargs", help="JSON dict of extra build_preset arguments")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory used in training")
    parser.add_argument("--seed", type=int, help="seed of the random base weights (default: checkpoint model_seed, 0)")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in --ckpt")
    parser.add_argument("--val", action="append", required=True, help="NAME=SHARDS of a validation source")
    parser.add_argument("--template", help="chat template (default: the run's, from the checkpoint or export)")
    parser.add_argument("--system-prompt", help="system prompt (default: the run's)")
    parser.add_argument("--image-aspect", choices=ASPECTS, help="pad / resize / crop (default: the run's)")
    parser.add_argument("--max-samples", type=int, default=64, help="samples per source")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, help="maximum tokens per sample (default: the run's)")
    parser.add_argument("--layers-per-figure", type=int, default=8)
    parser.add_argument("--weighting", choices=("tokens", "uniform"), default="tokens", help="source weights in MI")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--html", help="also write the routing page (one self-contained HTML file) here")
    parser.add_argument("--html-samples", type=int, default=3, help="sample answers per source on the page")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the report; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.max_samples < 1:
        raise SystemExit(f"--max-samples must be at least 1, got {args.max_samples}")
    if args.html_samples < 0:
        raise SystemExit(f"--html-samples must be at least 0, got {args.html_samples}")

    import matplotlib  # headless backend chosen before anything draws

    matplotlib.use("Agg")

    sources = parse_sources(args.val)
    checkpoint = read_checkpoint_file(args.ckpt, args.trust_checkpoint) if args.ckpt else None
    model = build_model(args, checkpoint).to(args.device)
    data = data_settings(args, checkpoint)
    tower = model.vision_tower
    datamodule = MixedInstructionDataModule(
        sources=sources,
        val_sources=sources,
        tokenizer=args.tokenizer,
        template=data["template"],
        system_prompt=data["system_prompt"],
        image_aspect=data["image_aspect"],
        num_image_tokens=model.num_image_tokens,
        image_size=tower.image_size,
        image_mean=tuple(tower.image_mean),
        image_std=tuple(tower.image_std),
        batch_size=args.batch_size,
        num_workers=0,
        max_length=data["max_length"],
        samples_per_epoch=1,
    )
    datamodule.setup("validate")
    names = datamodule.val_source_names
    accumulator = RoutingAccumulator(model, names)
    samples = dict.fromkeys(names, 0)
    routed = []
    page_samples = args.html_samples if args.html else 0
    with torch.no_grad(), accumulator:
        for name in names:
            for batch in datamodule.source_loader(name, "train"):
                if samples[name] >= args.max_samples:
                    break
                batch = take_rows(batch, args.max_samples - samples[name])
                samples[name] += len(batch["input_ids"])
                batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                accumulator.set_batch(name, batch["input_ids"] == model.image_token_id)
                model(
                    batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    has_image=batch["has_image"],
                    return_routing_stats=False,
                )
                shown = sum(sample.source == name for sample in routed)
                rows = range(min(page_samples - shown, len(batch["input_ids"])))
                if rows:
                    routed += sample_routing(model, batch, rows, datamodule.tokenizer, model.image_token_id)
    counts = accumulator.result()

    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "routing_fractions.csv"), counts.fraction_rows())
    rows = []
    for tokens in SELECTIONS:
        for row in counts.specialization(tokens, args.weighting):
            rows.append({"token_type": tokens, **row})
    write_csv(os.path.join(args.out, "specialization.csv"), rows)
    heatmaps = heatmap_pngs(counts, args.layers_per_figure)
    pngs = []
    for tokens, label, png in heatmaps:
        path = os.path.join(args.out, f"routing_{tokens}_{label}.png")
        with open(path, "wb") as handle:
            handle.write(png)
        pngs.append(path)
    specialization = counts.specialization("all", args.weighting)
    summary = {
        "sources": names,
        "samples": samples,
        "layers": counts.layers,
        "num_experts": counts.num_experts,
        "weighting": args.weighting,
        "mi_bits": {r["layer"]: r["mi_bits"] for r in specialization},
        "normalized_mi": {r["layer"]: r["normalized_mi"] for r in specialization},
        "figures": [os.path.basename(p) for p in pngs],
    }
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    print(f"samples per source: {samples}")
    for row in specialization:
        print(
            f"{row['layer']}: MI(source; expert) = {row['mi_bits']:.4f} bits "
            f"({row['normalized_mi']:.1%} of H(source) = {row['source_entropy_bits']:.3f})"
        )
    print(f"wrote {args.out}/routing_fractions.csv, specialization.csv, summary.json and {len(pngs)} PNG(s)")
    if args.html:
        page = render_routing_page(counts, routed, samples, args.weighting, heatmaps)
        os.makedirs(os.path.dirname(os.path.abspath(args.html)), exist_ok=True)
        with open(args.html, "w", encoding="utf-8") as handle:
            handle.write(page)
        print(f"wrote {args.html} ({len(routed)} sample answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
