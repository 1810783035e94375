"""Tests of the data-conflict study: its routing summary on hand-computed tables (the measures themselves are
tested in tests/eval/test_routing_analysis.py), the task format, the parameter-matched baseline, and the ``--quick``
mode end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from experiments.conflict_study.metrics import steps_to_threshold, summarize
from experiments.conflict_study.tasks import TaskConfig, domain_rules, make_domain_sets, make_samples
from mole_lightning.constants import IGNORE_INDEX
from tests.conftest import load_tool


def test_routing_summary_by_hand() -> None:
    """The study's per-layer routing numbers on tables small enough to compute by hand (an empty domain row is
    ignored)."""
    from experiments.conflict_study import report
    from mole_lightning.eval import routing_analysis

    assert report.mutual_information is routing_analysis.mutual_information  # the library's measure, not a copy
    dom = [[2, 0], [0, 2], [0, 0]]  # domains 0 and 1 each always on their own expert, domain 2 unseen
    ans = [[1, 1], [1, 1], [0, 0]]  # answer positions: routing independent of the domain
    tok = [[3, 1], [1, 3]]  # p = [[3, 1], [1, 3]] / 8, uniform marginals
    result = {"method": "mole", "seed": 0, "routing": [{"domain": dom, "domain_answer": ans, "token": tok}]}
    layer = report.routing_summary([result], num_domains=3)["mole"][0]["layers"][0]
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # H(1/4) = 0.811278 bits
    expected = {
        "mi_domain": 1.0,  # = H(domain) = H(1/2): the expert tells the domain
        "mi_domain_answer": 0.0,
        "mi_token": 1.0 - h_quarter,  # 2 * 3/8 log2(1.5) + 2 * 1/8 log2(0.5)
        "h_domain": 1.0,
        "h_token": 1.0,
        "h_expert": 1.0,
        # (|X| - 1)(|E| - 1) / (2 N ln 2) over the non-empty rows and columns: N = 4 and N = 8
        "bias_domain": 1 / (2 * 4 * math.log(2)),
        "bias_token": 1 / (2 * 8 * math.log(2)),
    }
    for key, value in expected.items():
        assert layer[key] == pytest.approx(value, abs=1e-12), key
    assert np.array_equal(layer["usage"], dom)


def test_summary_and_threshold() -> None:
    stats = summarize([1.0, 2.0, 3.0])
    assert stats["mean"] == pytest.approx(2.0) and stats["sd"] == pytest.approx(1.0)
    assert stats["ci"] == pytest.approx(4.303 / math.sqrt(3))
    assert steps_to_threshold([0, 10, 20], [3.0, 0.4, 0.1], 0.5) == 10
    assert math.isinf(steps_to_threshold([0, 10], [3.0, 2.0], 0.5))


@pytest.mark.parametrize("setting", ["style", "cue"])
def test_task_format(setting: str) -> None:
    task = TaskConfig(setting=setting, num_domains=3, num_symbols=5, num_fonts=3, style_purity=1.0, length=4)
    rules = domain_rules(task, seed=0)
    sets = make_domain_sets(task, rules, 16, seed=1)
    for d, dset in enumerate(sets):
        assert dset.input_ids.shape == (16, task.seq_len)
        assert int(dset.input_ids.max()) < task.vocab_size
        scored = dset.labels != IGNORE_INDEX
        assert scored.sum(1).tolist() == [task.length] * 16
        start = task.answer_start
        first = task.input_token(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long))
        symbols = (dset.input_ids[:, start - task.length - 1 : start - 1] - first) // task.num_fonts
        fonts = (dset.input_ids[:, start - task.length - 1 : start - 1] - first) % task.num_fonts
        answers = dset.input_ids[:, start : start + task.length] - task.answer_token(torch.zeros((), dtype=torch.long))
        assert torch.equal(answers, rules[d][symbols])
        if setting == "style":  # purity 1: every token in the domain's own font
            assert bool((fonts == d).all())
    pre = make_samples(task, None, None, 8, torch.Generator().manual_seed(0))
    assert bool((pre.domain == -1).all())


def test_dense_baseline_is_parameter_matched() -> None:
    from transformers import LlamaForCausalLM

    from experiments.conflict_study.base import BaseConfig, llama_config
    from experiments.conflict_study.methods import TrainConfig, adapt_model, adapter_counts, make_methods

    task = TaskConfig(num_domains=3, num_symbols=6, num_fonts=3, length=3)
    base = BaseConfig(hidden=16, layers=2, heads=2, ffn=32)
    train = TrainConfig(rank=2, num_experts=3)
    specs = {s.kind: s for s in make_methods(["mix", "dense", "mole"], 2, 3, [("prob", "switch", 0.01)])}
    counts = {}
    for kind, spec in specs.items():
        model = adapt_model(LlamaForCausalLM(llama_config(task, base)), spec, train)
        counts[kind] = adapter_counts(model, spec)
        attn_ranks = {m.rank for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj"))}
        assert attn_ranks == {2}  # attention rank r for every method
    routers = 2 * (3 * 16 + 3)
    assert counts["dense"][0] + routers == counts["mole"][0]  # same expert parameters, MoLE adds the routers
    assert counts["mole"][1] == counts["mix"][0] + routers  # top-1 activates one rank-r expert
    assert counts["dense"][0] > counts["mix"][0]


def test_method_learning_rate_suffix() -> None:
    from experiments.conflict_study.methods import make_methods

    specs = make_methods(
        ["mix", "dense@0.0025", "mole@1e-3"], 2, 3, [("prob", "switch", 0.01), ("none", "pooled", 0.05)]
    )
    assert [s.name for s in specs] == [
        "mix",
        "dense[r=6,lr=0.0025]",
        "mole[prob,switch=0.01,lr=0.001]",
        "mole[none,pooled=0.05,lr=0.001]",
    ]
    assert [s.lr for s in specs] == [None, 0.0025, 1e-3, 1e-3]
    assert specs[1].mlp_rank == 6 and specs[1].kind == "dense"
    with pytest.raises(ValueError, match="learning rate"):
        make_methods(["dense@fast"], 2, 3, [])
    with pytest.raises(ValueError, match="> 0"):
        make_methods(["mix@0"], 2, 3, [])
    with pytest.raises(ValueError, match="unknown method"):
        make_methods(["lora@0.1"], 2, 3, [])


def test_source_routing_variants_parse_name_and_map() -> None:
    from experiments.conflict_study.methods import make_methods, parse_source_variants

    variants = parse_source_variants("prob:switch:0.01:1, none:pooled:0.05:0.5:0/0/1")
    assert variants == [("prob", "switch", 0.01, 1.0, None), ("none", "pooled", 0.05, 0.5, (0, 0, 1))]
    specs = make_methods(["mole_src"], 2, 3, [], source_variants=variants)
    assert [s.name for s in specs] == [
        "mole_src[prob,switch=0.01,src=1]",
        "mole_src[none,pooled=0.05,src=0.5,map=0/0/1]",
    ]
    assert specs[1].source_expert_map() == {"0": 0, "1": 0, "2": 1} and specs[0].source_expert_map() is None
    for bad in ("prob:switch:0.01", "prob:switch:0.01:x", "prob:switch:0.01:1:0/a"):
        with pytest.raises(ValueError, match="source-routing variant"):
            parse_source_variants(bad)


def test_source_routed_job_sends_each_domain_to_its_expert(tmp_path) -> None:
    """run_job with ``mole_src`` on a random tiny base, domains told by the input tokens' font: after a short run
    more than 1/K of each domain's held-out tokens go to the expert its map names, in every routed layer (the
    label is not used at evaluation); K < D without a map is refused."""
    from transformers import LlamaForCausalLM

    from experiments.conflict_study.base import BaseConfig, llama_config
    from experiments.conflict_study.methods import JobSpec, TrainConfig, make_methods, parse_source_variants, run_job

    task = TaskConfig(num_domains=3, num_symbols=6, num_fonts=3, style_purity=1.0, length=4)  # fonts tell the domain
    base = BaseConfig(hidden=16, layers=2, heads=2, ffn=32)
    torch.manual_seed(0)
    path = str(tmp_path / "base.pt")
    torch.save({"state_dict": LlamaForCausalLM(llama_config(task, base)).state_dict()}, path)
    train = TrainConfig(rank=2, num_experts=3, per_domain=32, epochs=20, batch=16, lr=2e-2, eval_per_domain=16)
    variants = parse_source_variants("prob:switch:0.01:1.0:2/0/1")
    (spec,) = make_methods(["mole_src"], 2, 3, [], source_variants=variants)
    result = run_job(JobSpec(task, base, train, spec, seed=0, base_path=path))
    assert len(result.routing) == base.layers
    for layer in result.routing:
        shares = layer["domain"] / layer["domain"].sum(1, keepdims=True)  # (D, K)
        for domain, expert in enumerate(spec.source_map):
            assert shares[domain, expert] > 1 / 3, (domain, shares)

    (unmapped,) = make_methods(["mole_src"], 2, 2, [], source_variants=parse_source_variants("prob:switch:0.01:1"))
    with pytest.raises(ValueError, match="num_experts >= 3 sources"):
        run_job(JobSpec(task, base, TrainConfig(rank=2, num_experts=2), unmapped, seed=0, base_path=path))


@pytest.mark.slow
def test_quick_mode_writes_table(tmp_path) -> None:
    tool = load_tool("conflict_study")
    out = tmp_path / "study"
    argv = ["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--seeds", "2"]
    assert tool.main(argv) == 0
    report = (out / "report.md").read_text()
    assert "| method | params / activated |" in report
    for name in ("single", "mix", "mix2x", "mix_long", "dense[r=6]", "mole[prob,switch=0.01]", "soft"):
        assert f"| {name} |" in report
    assert "MI(domain; expert)" in report
    assert "| mix2x vs mix_long |" in report
    payload = json.loads((out / "results.json").read_text())
    steps = {r["method"]: r["steps"][-1] for r in payload["results"] if r["seed"] == 0 and r["domain"] is None}
    assert steps["mix_long"] == steps["mix2x"] == 2 * steps["mix"]  # twice the steps, on mix's data
    for png in ("curves_loss.png", "curves_em.png", "routing_mi.png"):
        assert (out / png).stat().st_size > 1000
    assert len(payload["stage0"]) == 2
    # stage 0 is cached by its settings: a rerun (of seed 0 only) skips it
    assert tool.main([*argv[:-1], "1", "--methods", "mix,mix@1e-9"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert all(s["cached"] for s in payload["stage0"])
    # a method's own lr is the one it trains with: at 1e-9 the held-out loss does not move, at the shared lr it drops
    curves = {r["method"]: np.asarray(r["loss"]).mean(1) for r in payload["results"] if r["seed"] == 0}
    frozen, trained = curves["mix[lr=1e-09]"], curves["mix"]
    assert frozen[-1] == pytest.approx(frozen[0], abs=1e-4)
    assert trained[-1] < trained[0] - 0.1


def _result(method: str, seed: int, final: list[float], domain: int | None = None, routing=None) -> dict:
    loss = [[3.0] * len(final), final]  # (P=2, D): start on the plateau, end at `final`
    return {
        "method": method,
        "seed": seed,
        "domain": domain,
        "samples": [0, 100],
        "loss": loss,
        "em": [[0.0] * len(final), [1.0] * len(final)],
        "params": 10,
        "activated": 5,
        "routing": routing or [],
    }


def test_comparison_table_by_hand() -> None:
    from experiments.conflict_study.report import comparison_table

    diag = {"domain": [[50, 0], [0, 50]], "domain_answer": [[10, 0], [0, 10]], "token": [[5, 5], [5, 5]]}
    results = []
    for seed, (mix, mole, dense_a, dense_b) in enumerate([(1.0, 0.2, 0.4, 0.9), (0.6, 0.4, 0.2, 0.8)]):
        results += [_result("single", seed, [0.1], domain=d) for d in (0, 1)]
        results += [
            _result("mix", seed, [mix, mix]),
            _result("mole[prob,switch=0.01]", seed, [mole, mole], routing=[diag]),
            _result("dense[r=4]", seed, [dense_a, dense_a]),
            _result("dense[r=4,lr=0.001]", seed, [dense_b, dense_b]),
        ]
    payload = {
        "config": {
            "task": {"setting": "style", "style_purity": 0.5, "num_domains": 2},
            "train": {"num_experts": 2},
            "seeds": [0, 1],
            "threshold": 0.5,
        },
        "methods": ["single", "mix", "dense[r=4]", "dense[r=4,lr=0.001]", "mole[prob,switch=0.01]"],
        "results": results,
    }
    rows = comparison_table([("run", payload)]).strip().splitlines()
    assert len(rows) == 3  # header, rule, one routed method
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[:4] == ["run", "style, purity 0.5", "2", "2"]
    assert cells[4] == "+0.700 (0/2)"  # mix - single: (0.9 + 0.5) / 2
    assert cells[5] == "mole[prob,switch=0.01]: -0.500 (2/2)"  # (-0.8 - 0.2) / 2
    assert cells[6] == "+0.000 (1/2) vs dense[r=4]"  # the better dense (mean 0.3 < 0.85): (-0.2 + 0.2) / 2
    assert cells[7] == "–"  # no mix2x in this run
    # reached (loss <= 0.5 at the end): mix never (1.0, 0.6), dense[r=4] always (0.4, 0.2), MoLE always (0.2, 0.4)
    assert cells[8] == "0.00 / 1.00 / 1.00"
    assert cells[9] == "1.000 / 1.00"  # perfect dependence on 2 equiprobable domains: MI = H(domain) = 1 bit
