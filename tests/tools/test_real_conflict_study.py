"""Tests of the real-weights conflict study (`experiments.real_conflict_study`): the word task against the rule
tables read back through the tokenizer, and ``--quick`` end to end on a tiny random Llama hub folder with a
byte-level BPE tokenizer and a ChatML template (the formats of SmolLM2-135M-Instruct's folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments import real_conflict_study as study
from experiments.conflict_study.tasks import domain_rules
from mole_lightning.constants import IGNORE_INDEX
from tests.realformats import smollm2_folder


def _task_lines() -> list[str]:
    """Text in the task's format, so that the stand-in tokenizer learns every study word as one token."""
    words = study.CONTENT_WORDS
    return [
        f" {cue}{study.CUE_SEP} {' '.join(words[i:] + words[:i])}{study.ANSWER_SEP} {' '.join(words)}"
        for cue in study.DOMAIN_WORDS
        for i in range(len(words))
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_folder(tmp_path_factory.mktemp("tiny_llama"), texts=_task_lines())


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_answers_are_each_domains_permutation(tokenizer) -> None:
    task = study.word_task(tokenizer, len(tokenizer), num_domains=3, num_symbols=8, length=5)
    rules = domain_rules(task, seed=4)
    for d in range(3):
        assert sorted(rules[d].tolist()) == list(range(8))  # a permutation of the S words
    assert len({tuple(r.tolist()) for r in rules}) == 3  # conflicting: the domains' rules differ
    sets = study.make_word_sets(task, rules, per_domain=20, seed=1)
    for d, dset in enumerate(sets):
        assert (dset.domain == d).all()
        for ids, labels in zip(dset.input_ids.tolist(), dset.labels.tolist()):
            # read the sample back as text and apply the rule to the words
            text = tokenizer.decode(ids)
            match = re.fullmatch(r" (\w+):((?: \w+){5}) ->((?: \w+){5})", text)
            assert match, text
            cue, inputs, answers = match.group(1), match.group(2).split(), match.group(3).split()
            assert cue == study.DOMAIN_WORDS[d]
            expected = [study.CONTENT_WORDS[rules[d][study.CONTENT_WORDS.index(w)]] for w in inputs]
            assert answers == expected
            # only the answer words are scored
            start = task.answer_start
            assert labels[:start] == [IGNORE_INDEX] * start and labels[start:] == ids[start:]
            assert len(ids) == task.seq_len == 2 * 5 + 3


def test_words_are_single_tokens(tokenizer) -> None:
    task = study.word_task(tokenizer, len(tokenizer), num_domains=6, num_symbols=16, length=4)
    sample = study.make_word_sets(task, domain_rules(task, seed=0), per_domain=4, seed=0)[5]
    for ids in sample.input_ids.tolist():  # the token ids are what the tokenizer makes of the sample's text
        assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids
    for word in study.DOMAIN_WORDS + study.CONTENT_WORDS:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ValueError, match="'pneumothorax' is"):
        study.single_token_id(tokenizer, "pneumothorax")
    with pytest.raises(ValueError, match="symbols must be in"):
        study.word_task(tokenizer, len(tokenizer), num_domains=3, num_symbols=17, length=4)


def test_rejects_methods_outside_the_study() -> None:
    with pytest.raises(ValueError, match="not in the real-weights study"):
        study.parse_args(["--methods", "mix,single"])
    with pytest.raises(ValueError, match="not a hub folder"):
        study.resolve_model("/nonexistent/folder")


@pytest.mark.slow
def test_quick_run_end_to_end(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert study.main(["--quick", "--model", str(folder), "--out", str(out), "--seeds", "2", "--workers", "1"]) == 0
    payload = json.loads((out / "results.json").read_text())
    methods = payload["methods"]
    assert [m.split("[")[0] for m in methods] == ["mix", "dense", "mole", "mole_src"]
    assert sorted((r["method"], r["seed"]) for r in payload["results"]) == sorted(
        (m, s) for m in methods for s in (0, 1)
    )
    # adapter sizes by hand: rank r on q, k, v, o (d -> d, d -> d_kv twice, d -> d) and gate, up, down (d <-> f)
    d, d_kv, f, layers, r, k = 32, 16, 64, 2, 4, 3
    attn = r * ((d + d) + 2 * (d + d_kv) + (d + d))
    mlp = r * (3 * (d + f))
    params = {m.split("[")[0]: r_["params"] for m in methods for r_ in payload["results"] if r_["method"] == m}
    assert params["mix"] == layers * (attn + mlp)
    assert params["dense"] == layers * (attn + k * mlp)  # parameter-matched: MLP rank K*r
    assert params["mole"] == layers * (attn + k * mlp + d * k + k)  # K experts + a router: weight (K, d), bias (K,)
    routed = [r_ for r_ in payload["results"] if r_["method"].startswith("mole")]
    assert all(len(r_["routing"]) == layers for r_ in routed)
    report = (out / "report.md").read_text()
    assert report.startswith("# Data-conflict study on real weights")
    for m in methods:
        assert f"| {m} |" in report
    assert "## Routing" in report and "## General prompts" in report
    before = payload["general_before"]
    assert len(before) == len(study.GENERAL_PROMPTS)
    for m in methods:
        same = [
            sum(a == b for a, b in zip(r_["general"], before)) / len(before)
            for r_ in payload["results"]
            if r_["method"] == m
        ]
        assert f"| {m} | {sum(same) / len(same):.2f} ± " in report
