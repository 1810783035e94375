"""Miniature data-conflict study: does a sparse Mixture of LoRA Experts mitigate conflicts between domains?

Compares, on synthetic domains with one instruction format and conflicting rules (see
`experiments.conflict_study.tasks`), from a tiny Llama pretrained in stage 0 (cached):
single-domain LoRA, mixed LoRA, mixed LoRA with 2x samples, the parameter-matched dense LoRA (MLP rank K*r),
mixed MoLE (gate/balance variants) and optionally a dense soft mixture; over several seeds, with learning curves,
paired differences, steps-to-threshold and routing mutual information. Writes ``report.md``, ``results.json`` and
PNG plots into ``--out``.

Examples::

    python tools/conflict_study.py --out out/conflict_study            # default study (5 seeds, style setting)
    python tools/conflict_study.py --setting cue --out out/conflict_cue  # single-cue setting
    python tools/conflict_study.py --quick --out /tmp/cs_quick           # ~1 minute smoke run
    python tools/conflict_study.py --report-only --out out/conflict_study
    python tools/conflict_study.py --compare out/conflict_study out/conflict_cue --out out  # one table of runs
    python tools/conflict_study.py --multimodal --out out/conflict_mm    # demo image domains
    python tools/conflict_study.py --methods mix,mix2x,dense,mole,mole_src --out out/conflict_src  # source routing
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the study lives in experiments/ at the repository root, outside the installed package
    sys.path.insert(0, REPO)

from experiments.conflict_study.base import BaseConfig, pretrain_job  # noqa: E402
from experiments.conflict_study.methods import (  # noqa: E402
    METHOD_KINDS,
    JobResult,
    JobSpec,
    run_job,
    study_schedule_and_methods,
)
from experiments.conflict_study.report import build_summary, comparison_table, make_plots, markdown_report  # noqa: E402
from experiments.conflict_study.tasks import TaskConfig  # noqa: E402

DEFAULT_METHODS = "single,mix,mix2x,dense,mole"
DEFAULT_MOLE_VARIANTS = "prob:switch:0.01,none:pooled:0.05"
DEFAULT_SOURCE_VARIANTS = "prob:switch:0.01:1.0:0/1/2/0/1/2"
"""``mole_src`` default: the ``prob`` gate, domain d of the default 6 to expert d mod 3 (K = 3 < D)."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (defaults are the documented default study; ``--quick`` is applied by parse_args)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="out/conflict_study", help="output folder (report.md, results.json, PNGs)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/mole_lightning/conflict_study"))
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (about a minute)")
    p.add_argument("--multimodal", action="store_true", help="the same comparison on the demo image domains")
    p.add_argument("--report-only", action="store_true", help="rebuild report and plots from --out/results.json")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="DIR",
        help="summarise finished study folders (their results.json) in one table, written to --out/compare.md",
    )
    g = p.add_argument_group("task")
    g.add_argument("--setting", choices=("style", "cue"), default="style")
    g.add_argument("--domains", type=int, default=6, help="D, number of domains")
    g.add_argument("--symbols", type=int, default=24, help="S, size of each domain's rule table")
    g.add_argument("--fonts", type=int, default=None, help="F, fonts (default: D)")
    g.add_argument("--purity", type=float, default=0.5, help="style: P(token in its domain's own font)")
    g.add_argument("--length", type=int, default=6, help="L, symbols per input and answer")
    g = p.add_argument_group("base model and stage 0")
    g.add_argument("--hidden", type=int, default=96)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--ffn", type=int, default=192)
    g.add_argument("--pretrain-steps", type=int, default=600)
    g = p.add_argument_group("adapters and schedule")
    g.add_argument("--rank", type=int, default=2, help="r, attention LoRA rank and expert rank")
    g.add_argument("--experts", type=int, default=3, help="K")
    g.add_argument("--per-domain", type=int, default=256, help="training samples per domain")
    g.add_argument("--epochs", type=int, default=16)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--lr", type=float, default=5e-3)
    g.add_argument("--evals-per-epoch", type=int, default=2)
    g.add_argument("--eval-per-domain", type=int, default=128)
    g.add_argument("--impl", default="auto", help="MoLE compute path (auto, grouped, dense_masked, loop)")
    g = p.add_argument_group("methods, seeds, reporting")
    g.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma list from {','.join(METHOD_KINDS)}; kind@lr gives a method its own peak lr (dense@0.0025)",
    )
    g.add_argument(
        "--mole-variants",
        default=DEFAULT_MOLE_VARIANTS,
        help="comma list of gate:balance:coef for 'mole' (gate: prob|straight_through|none; balance: switch|pooled)",
    )
    g.add_argument(
        "--source-variants",
        default=DEFAULT_SOURCE_VARIANTS,
        help="comma list of gate:balance:coef:source_coef[:e0/e1/...] for 'mole_src' (source-supervised routing; "
        "the optional map gives the expert of domain 0, 1, ...; without it domain d -> expert d, needs K >= D)",
    )
    g.add_argument("--z-loss", type=float, default=0.0, help="router z-loss weight")
    g.add_argument("--seeds", type=int, default=5, help="number of seeds (each varies base, task, data, adapter)")
    g.add_argument("--seed-offset", type=int, default=0)
    g.add_argument("--threshold", type=float, default=0.5, help="answer-loss threshold for steps-to-threshold")
    g.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each)")
    g = p.add_argument_group("multimodal variant (--multimodal; uses --rank, --experts, --methods, --mole-variants)")
    g.add_argument("--mm-per-source", type=int, default=800, help="training samples per demo source")
    g.add_argument("--mm-eval-per-source", type=int, default=48, help="validation/generation samples per source")
    g.add_argument("--mm-epochs", type=int, default=4)
    g.add_argument("--mm-batch", type=int, default=16)
    g.add_argument("--mm-lr", type=float, default=3e-3)
    g.add_argument("--mm-seeds", type=int, default=5)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with ``--quick``'s tiny settings in place of the defaults it overrides."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        quick = {
            "domains": 3,
            "symbols": 8,
            "length": 4,
            "hidden": 32,
            "layers": 2,
            "heads": 2,
            "ffn": 64,
            "pretrain_steps": 150,
            "per_domain": 64,
            "epochs": 3,
            "batch": 16,
            "lr": 1e-2,
            "eval_per_domain": 32,
            "seeds": 2,
            "mole_variants": "prob:switch:0.01",
            "source_variants": "prob:switch:0.01:1.0",
            "methods": "single,mix,mix2x,mix_long,dense,mole,soft",
            "mm_per_source": 32,
            "mm_eval_per_source": 8,
            "mm_epochs": 1,
            "mm_seeds": 1,
        }
        for key, value in quick.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def result_to_dict(res: JobResult) -> dict[str, Any]:
    """JSON-ready job result."""
    out = asdict(res)
    out["loss"] = np.asarray(res.loss).tolist()
    out["em"] = np.asarray(res.em).tolist()
    out["routing"] = [{k: np.asarray(v).tolist() for k, v in layer.items()} for layer in res.routing]
    return out


def write_report(payload: dict[str, Any], out_dir: str) -> str:
    """Write plots and ``report.md`` into ``out_dir``; returns the report text."""
    summary = build_summary(payload)
    plots = make_plots(summary, out_dir)
    text = markdown_report(payload, summary, plots)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def run_text_study(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 0 for every seed, then every (seed, method[, domain]) job in a process pool."""
    task = TaskConfig(
        setting=args.setting,
        num_domains=args.domains,
        num_symbols=args.symbols,
        num_fonts=args.fonts or args.domains,
        style_purity=args.purity,
        length=args.length,
    )
    base = BaseConfig(hidden=args.hidden, layers=args.layers, heads=args.heads, ffn=args.ffn, steps=args.pretrain_steps)
    train, specs = study_schedule_and_methods(args, args.z_loss)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        bases = list(pool.map(pretrain_job, [(task, base, s, args.cache_dir) for s in seeds]))
        for s, info in zip(seeds, bases):
            state = "cached" if info["cached"] else f"trained in {info['seconds']:.0f}s"
            print(f"[stage0] seed {s}: copy EM {info['copy_em']:.3f} ({state})", flush=True)
        jobs = []
        for s, info in zip(seeds, bases):
            for spec in specs:
                domains = range(task.num_domains) if spec.kind == "single" else [None]
                jobs += [JobSpec(task, base, train, spec, s, info["path"], d) for d in domains]
        # longest first keeps both workers busy until the end
        jobs.sort(
            key=lambda j: -(j.method.data_mult * j.method.epoch_mult * (task.num_domains if j.domain is None else 1))
        )
        results = []
        for job, res in zip(jobs, pool.map(run_job, jobs)):
            final = res.loss[-1].mean()
            print(
                f"[job] {job.label}: final answer loss {final:.3f}, EM {res.em[-1].mean():.3f}, {res.seconds:.0f}s",
                flush=True,
            )
            results.append(result_to_dict(res))
    return {
        "config": {
            "task": task.to_dict(),
            "base": asdict(base),
            "train": asdict(train),
            "workers": args.workers,
            "threshold": args.threshold,
            "seeds": seeds,
            "command": " ".join(sys.argv),
        },
        "methods": [s.name for s in specs],
        "stage0": [{"seed": s, **{k: v for k, v in b.items() if k != "path"}} for s, b in zip(seeds, bases)],
        "results": results,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    if args.compare:
        runs = []
        for folder in args.compare:
            with open(os.path.join(folder, "results.json")) as f:
                runs.append((os.path.basename(os.path.normpath(folder)), json.load(f)))
        table = comparison_table(runs)
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(table)
        print(table)
        return 0
    if args.report_only:
        with open(path) as f:
            payload = json.load(f)
    elif args.multimodal:
        from experiments.conflict_study.multimodal import run_multimodal_study

        payload = run_multimodal_study(args)
    else:
        payload = run_text_study(args)
    if not args.report_only:
        with open(path, "w") as f:
            json.dump(payload, f)
    text = write_report(payload, args.out)
    print(text)
    print(f"wrote {args.out}/report.md, results.json and plots in {payload.get('seconds', 0.0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
