"""Turn the study's job results into seed-level summaries, a markdown report and PNG plots.

Conventions: a "curve" is a (P, D) array over evaluation points P (per-domain training samples seen) and domains D.
Per seed, the ``single`` method's D one-domain runs are assembled into one (P, D) curve. "Final" means the last
evaluation point of a method's own schedule (``mix2x`` ends after twice the per-domain samples). Spread is over
seeds: mean ± sample sd, with n and the 95% t-interval of paired differences.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import numpy as np

from experiments.conflict_study.metrics import mutual_information_bias, steps_to_threshold
from experiments.conflict_study.metrics import summarize as summarize_values
from mole_lightning.eval.routing_analysis import mutual_information, source_entropy


def assemble_curves(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """``{method: {seed: {"samples": (P,), "loss": (P, D), "em": (P, D)}}}`` from job result dictionaries."""
    grouped: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for res in results:
        grouped[res["method"]][res["seed"]].append(res)
    curves: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for method, by_seed in grouped.items():
        curves[method] = {}
        for seed, runs in by_seed.items():
            runs = sorted(runs, key=lambda r: -1 if r["domain"] is None else r["domain"])
            points = min(len(r["samples"]) for r in runs)
            loss = np.concatenate([np.asarray(r["loss"])[:points] for r in runs], axis=1)  # (P, D)
            em = np.concatenate([np.asarray(r["em"])[:points] for r in runs], axis=1)  # (P, D)
            curves[method][seed] = {"samples": np.asarray(runs[0]["samples"][:points]), "loss": loss, "em": em}
    return curves


def final_metrics(curve: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """Scalar outcomes of one (method, seed) curve: mean/worst answer loss and EM at the end, steps-to-threshold.

    ``reach`` is the mean over domains of the per-domain samples seen until the answer loss is <= ``threshold``
    (``inf`` if some domain never gets there); ``reached`` the fraction of domains that did.
    """
    loss, em, samples = curve["loss"], curve["em"], curve["samples"]
    reach = [steps_to_threshold(samples, loss[:, d], threshold) for d in range(loss.shape[1])]
    return {
        "loss": float(loss[-1].mean()),
        "worst_loss": float(loss[-1].max()),
        "em": float(em[-1].mean()),
        "worst_em": float(em[-1].min()),
        "reach": float(np.mean(reach)),
        "reached": float(np.mean(np.isfinite(reach))),
        "auc_loss": float(np.trapezoid(loss.mean(1), samples) / max(1, samples[-1])),
    }


def routing_summary(results: list[dict[str, Any]], num_domains: int) -> dict[str, list[dict[str, Any]]]:
    """Per routed method, per layer: MI(domain; expert) over all tokens and over answer positions, MI(token;
    expert), their plug-in biases, H(domain), H(expert) and the domain x expert usage, per seed."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for res in results:
        if not res.get("routing"):
            continue
        layers = []
        for table in res["routing"]:
            dom, dom_ans, tok = (np.asarray(table[k]) for k in ("domain", "domain_answer", "token"))
            layers.append(
                {
                    "mi_domain": mutual_information(dom),
                    "mi_domain_answer": mutual_information(dom_ans),
                    "mi_token": mutual_information(tok),
                    "bias_domain": mutual_information_bias(dom),
                    "bias_token": mutual_information_bias(tok),
                    "h_domain": source_entropy(dom),
                    "h_token": source_entropy(tok),
                    "h_expert": source_entropy(dom.T),  # the expert marginal of the domain x expert table
                    "usage": dom,
                }
            )
        out[res["method"]].append({"seed": res["seed"], "layers": layers})
    for runs in out.values():
        runs.sort(key=lambda r: r["seed"])
    return out


def _fmt(stats: dict[str, float], digits: int = 3) -> str:
    if stats["n"] == 0 or math.isnan(stats["mean"]):
        return "n/a"
    if math.isinf(stats["mean"]):
        return "never"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def _fmt_diff(values: list[float], digits: int = 3) -> str:
    """Mean ± sd [95% CI] and the number of seeds where the difference is negative (method better on loss)."""
    stats = summarize_values(values)
    if stats["n"] == 0:
        return "n/a"
    neg = sum(v < 0 for v in values)
    ci = (
        ""
        if math.isnan(stats["ci"])
        else f" [{stats['mean'] - stats['ci']:+.{digits}f}, {stats['mean'] + stats['ci']:+.{digits}f}]"
    )
    return f"{stats['mean']:+.{digits}f} ± {stats['sd']:.{digits}f}{ci} ({neg}/{stats['n']} < 0)"


def build_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """All numbers of the report from the saved payload (config, jobs, results)."""
    results = payload["results"]
    threshold = payload["config"]["threshold"]
    curves = assemble_curves(results)
    methods = [m for m in payload["methods"] if m in curves]
    finals = {m: {s: final_metrics(c, threshold) for s, c in curves[m].items()} for m in methods}
    params = {}
    for res in results:
        params.setdefault(res["method"], (res["params"], res["activated"]))
    return {
        "curves": curves,
        "methods": methods,
        "finals": finals,
        "params": params,
        "routing": routing_summary(results, payload["config"]["task"]["num_domains"]),
    }


def paired(finals: dict[str, dict[int, dict[str, float]]], a: str, b: str, key: str) -> list[float]:
    """Per-seed differences ``a - b`` of ``key`` over the seeds both methods have."""
    seeds = sorted(set(finals.get(a, {})) & set(finals.get(b, {})))
    return [finals[a][s][key] - finals[b][s][key] for s in seeds]


def markdown_report(payload: dict[str, Any], summary: dict[str, Any], plots: list[str]) -> str:
    """The study's markdown report: settings, final table, paired differences, routing, plots."""
    cfg = payload["config"]
    finals, methods, params = summary["finals"], summary["methods"], summary["params"]
    seeds = sorted({s for m in methods for s in finals[m]})
    if cfg.get("multimodal"):
        setting = (
            "Multimodal demo domains (general, doc, med) through the DataModule, LightningModule and "
            "GenerationEvalCallback; answer loss = the module's per-source validation CE over assistant tokens, "
            "exact match = the per-source generation score at the end (no curve), token routing = token type "
            "(image/text); "
        )
    else:
        setting = (
            f"Setting `{cfg['task']['setting']}`, D={cfg['task']['num_domains']} domains, "
            f"S={cfg['task']['num_symbols']} symbols, L={cfg['task']['length']}, "
        )
    lines = [
        "# Data-conflict study: results",
        "",
        setting + f"K={cfg['train']['num_experts']} experts, r={cfg['train']['rank']}, "
        f"{cfg['train']['per_domain']} training samples per domain, {cfg['train']['epochs']} epochs, "
        f"batch {cfg['train']['batch']}, lr {cfg['train']['lr']:g}; seeds {seeds} (n={len(seeds)}); "
        f"wall time {payload.get('seconds', 0.0) / 60:.1f} min with {cfg['workers']} worker(s).",
        "",
        "Values are mean ± sd over seeds of the final point of each method's own schedule; answer loss is the mean "
        'cross-entropy (nats/token) on held-out samples, averaged over domains ("worst": the worst domain). '
        f"Reach: per-domain training samples seen until a domain's answer loss ≤ {cfg['threshold']:g} (mean over "
        'domains; "never" if some domain did not get there in some seed), and the fraction of (seed, domain) '
        "curves that got there. Params: trainable adapter parameters / activated per token.",
        "",
        "| method | params / activated | answer loss | worst-domain loss | exact match | worst-domain EM | reach "
        "| reached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        vals = list(finals[m].values())
        col = {k: summarize_values([v[k] for v in vals]) for k in vals[0]}
        p, a = params[m]
        lines.append(
            f"| {m} | {p:,} / {a:,} | {_fmt(col['loss'])} | {_fmt(col['worst_loss'])} | {_fmt(col['em'])} "
            f"| {_fmt(col['worst_em'])} | {_fmt(col['reach'], 0)} | {col['reached']['mean']:.2f} |"
        )
    lines += [
        "",
        "## Paired differences (per seed, same data and base)",
        "",
        "Mean ± sd [95% t-interval] of the per-seed difference, and in how many seeds it is negative "
        "(negative loss difference = the first method is better; for EM, positive is better).",
        "",
        "| comparison | answer loss | worst-domain loss | exact match |",
        "|---|---|---|---|",
    ]
    routed = [m for m in methods if m.startswith("mole")]
    pairs = [("mix", "single", "(a) mixing vs single-domain")]
    for m in routed + [x for x in methods if x == "soft"]:
        pairs += [
            (m, "mix", f"(b) {m} vs mix"),
            (m, "single", f"{m} vs single"),
            (m, "mix2x", f"(c) {m} vs mix2x"),
            (m, "mix_long", f"{m} vs mix_long"),
        ]
        pairs += [(m, d, f"{m} vs {d}") for d in methods if d.startswith("dense")]
    pairs += [(d, "mix", f"{d} vs mix") for d in methods if d.startswith("dense")]
    pairs += [
        ("mix2x", "mix", "mix2x vs mix"),
        ("mix_long", "mix", "mix_long vs mix"),
        ("mix2x", "mix_long", "mix2x vs mix_long"),
    ]
    for a, b, label in pairs:
        if a not in finals or b not in finals:
            continue
        lines.append(
            f"| {label} | {_fmt_diff(paired(finals, a, b, 'loss'))} | {_fmt_diff(paired(finals, a, b, 'worst_loss'))} "
            f"| {_fmt_diff(paired(finals, a, b, 'em'))} |"
        )
    routing = summary["routing"]
    if routing:
        lines += [
            "",
            "## Routing",
            "",
            "Per layer, mean ± sd over seeds, in bits, on the held-out sets after training: MI(domain; expert) over "
            "all tokens and over answer positions (H(domain) is the maximum, full specialisation), MI(token id; "
            "expert), and H(expert) (log2 K = balanced). The plug-in bias of MI(token; expert) under independence "
            "is given in brackets.",
            "",
            "| method | layer | MI(domain; expert) | MI(domain; expert), answers | H(domain) "
            "| MI(token; expert) [bias] | H(expert) |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, runs in routing.items():
            for li in range(len(runs[0]["layers"])):
                col = {
                    k: summarize_values([r["layers"][li][k] for r in runs])
                    for k in runs[0]["layers"][li]
                    if k != "usage"
                }
                lines.append(
                    f"| {m} | {li} | {_fmt(col['mi_domain'])} | {_fmt(col['mi_domain_answer'])} "
                    f"| {col['h_domain']['mean']:.2f} | {_fmt(col['mi_token'])} [{col['bias_token']['mean']:.3f}] "
                    f"| {_fmt(col['h_expert'], 2)} |"
                )
        for m, runs in routing.items():
            first = runs[0]
            lines += [
                "",
                f"Domain × expert usage of `{m}`, seed {first['seed']} (fraction of each domain's tokens):",
                "",
            ]
            layers = first["layers"]
            num_experts = layers[0]["usage"].shape[1]
            header = "| domain | " + " | ".join(f"layer {i}" for i in range(len(layers))) + " |"
            lines += [header, "|---" * (len(layers) + 1) + "|"]
            for d in range(layers[0]["usage"].shape[0]):
                cells = []
                for layer in layers:
                    row = layer["usage"][d] / max(1, layer["usage"][d].sum())
                    cells.append(" ".join(f"{v:.2f}" for v in row))
                lines.append(f"| {d} | " + " | ".join(cells) + " |")
            lines.append(f"\n(each cell: fractions routed to experts 0..{num_experts - 1})")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def _save_figure(fig: Any, out_dir: str, name: str) -> str:
    """Lay out, write ``out_dir/name`` as PNG, close the figure; returns the path."""
    import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(summary: dict[str, Any], out_dir: str) -> list[str]:
    """Learning curves (loss and EM, mean and worst domain; the mean over seeds and every seed's own curve) and
    routing plots as PNG files; returns the paths."""
    import matplotlib  # headless backend chosen at call time, before pyplot draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

    paths: list[str] = []
    curves, methods = summary["curves"], summary["methods"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for metric, ylabel, log in (("loss", "answer loss (nats/token)", True), ("em", "exact match", False)):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, reduce, title in ((axes[0], "mean", "mean over domains"), (axes[1], "worst", "worst domain")):
            for i, m in enumerate(methods):
                runs = list(curves[m].values())
                points = min(len(r["samples"]) for r in runs)
                x = runs[0]["samples"][:points]
                if reduce == "mean":
                    ys = np.stack([r[metric][:points].mean(1) for r in runs])
                else:
                    ys = np.stack(
                        [(r[metric][:points].max(1) if metric == "loss" else r[metric][:points].min(1)) for r in runs]
                    )
                color = colors[i % len(colors)]
                ax.plot(x, ys.mean(0), label=m, color=color, lw=1.8)
                for y in ys:  # each seed: a stalled seed shows as its own line, not as a wide band
                    ax.plot(x, np.clip(y, 1e-4, None) if log else y, color=color, lw=0.6, alpha=0.35)
            ax.set_title(title)
            ax.set_xlabel("training samples seen per domain")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{ylabel}: mean over seeds (bold) and each seed (thin)")
        paths.append(_save_figure(fig, out_dir, f"curves_{metric}.png"))

    routing = summary["routing"]
    if routing:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        width = 0.8 / max(1, len(routing))
        for i, (m, runs) in enumerate(routing.items()):
            num_layers = len(runs[0]["layers"])
            x = np.arange(num_layers) + i * width
            for ax, key in ((axes[0], "mi_domain"), (axes[1], "mi_token")):
                vals = np.array([[r["layers"][li][key] for li in range(num_layers)] for r in runs])  # (seeds, layers)
                ax.bar(x, vals.mean(0), width, yerr=vals.std(0), label=m, color=colors[i % len(colors)], capsize=2)
        h_dom = routing[next(iter(routing))][0]["layers"][0]["h_domain"]
        axes[0].axhline(h_dom, color="k", ls="--", lw=1, label="H(domain)")
        axes[0].set_title("MI(domain; expert) per layer (bits)")
        axes[1].set_title("MI(token id; expert) per layer (bits)")
        for ax in axes:
            ax.set_xlabel("layer")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        paths.append(_save_figure(fig, out_dir, "routing_mi.png"))

        for j, (m, runs) in enumerate(routing.items()):
            layers = runs[0]["layers"]
            fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers) + 1, 3.2), squeeze=False)
            for li, layer in enumerate(layers):
                usage = layer["usage"] / np.clip(layer["usage"].sum(1, keepdims=True), 1, None)  # (D, K)
                ax = axes[0, li]
                ax.imshow(usage, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_title(f"layer {li}")
                ax.set_xlabel("expert")
                ax.set_xticks(range(usage.shape[1]))
                if li == 0:
                    ax.set_ylabel("domain")
            fig.suptitle(f"{m}: domain × expert usage (seed {runs[0]['seed']})")
            paths.append(_save_figure(fig, out_dir, f"routing_usage_{j}.png"))
    return paths


def _task_label(cfg: dict[str, Any]) -> str:
    task = cfg["task"]
    if cfg.get("multimodal"):
        return "multimodal demo"
    if task["setting"] == "style":
        return f"style, purity {task.get('style_purity', float('nan')):g}"
    return task["setting"]


def _fmt_short(values: list[float]) -> str:
    """``+0.123 (4/5)``: mean paired difference and how many seeds are below zero."""
    if not values:
        return "–"
    return f"{np.mean(values):+.3f} ({sum(v < 0 for v in values)}/{len(values)})"


def comparison_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """One markdown row per (run, routed method) across several study outputs: the claims' paired differences in
    final answer loss, the fraction of (seed, domain) curves that reached the threshold, and the largest per-layer
    MI(domain; expert).

    ``runs`` holds (label, payload) pairs as saved in ``results.json``. "dense" is the run's parameter-matched
    dense method with the lowest mean final loss (the strongest one when several learning rates were run), named
    in its column.
    """
    lines = [
        "| run | task | K | seeds | mix − single | MoLE − mix | MoLE − dense | MoLE − mix2x | reached mix / dense / "
        "MoLE | max MI(domain; expert) / H(domain) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, payload in runs:
        summary = build_summary(payload)
        finals, methods, routing = summary["finals"], summary["methods"], summary["routing"]
        cfg = payload["config"]

        means = {
            m: {k: float(np.mean([v[k] for v in finals[m].values()])) for k in ("loss", "reached")} for m in finals
        }
        denses = sorted((m for m in methods if m.startswith("dense")), key=lambda m: means[m]["loss"])
        dense = denses[0] if denses else None
        for m in [x for x in methods if x.startswith(("mole", "soft"))]:
            reached = " / ".join(
                "–" if x is None or x not in finals else f"{means[x]['reached']:.2f}" for x in ("mix", dense, m)
            )
            mi = "–"
            if m in routing:
                per_layer = np.array([[layer["mi_domain"] for layer in r["layers"]] for r in routing[m]])
                h_domain = routing[m][0]["layers"][0]["h_domain"]
                mi = f"{per_layer.mean(0).max():.3f} / {h_domain:.2f}"
            dense_cell = "–" if dense is None else f"{_fmt_short(paired(finals, m, dense, 'loss'))} vs {dense}"
            lines.append(
                f"| {label} | {_task_label(cfg)} | {cfg['train']['num_experts']} | {len(cfg['seeds'])} "
                f"| {_fmt_short(paired(finals, 'mix', 'single', 'loss'))} "
                f"| {m}: {_fmt_short(paired(finals, m, 'mix', 'loss'))} "
                f"| {dense_cell} | {_fmt_short(paired(finals, m, 'mix2x', 'loss'))} | {reached} | {mi} |"
            )
    return "\n".join(lines) + "\n"
