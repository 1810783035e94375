"""Mutual information on hand-made routing counts, count bookkeeping, and token counting on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mole_lightning.eval.routing_analysis import (
    RoutingAccumulator,
    RoutingCounts,
    layer_label,
    mutual_information,
    source_entropy,
)


def test_mi_independent_is_zero():
    # both sources route 1/3 : 2/3
    assert mutual_information(torch.tensor([[2, 4], [1, 2]])) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.tensor([[2, 4], [1, 2]]), weighting="uniform") == pytest.approx(0.0, abs=1e-12)


def test_mi_perfect_dependence_is_source_entropy():
    counts = torch.tensor([[5, 0, 0], [0, 3, 0]])
    h_source = -(5 / 8) * math.log2(5 / 8) - (3 / 8) * math.log2(3 / 8)  # 0.954434
    assert mutual_information(counts) == pytest.approx(h_source)
    assert mutual_information(counts) == pytest.approx(0.954434, abs=1e-6)
    assert mutual_information(counts, weighting="uniform") == pytest.approx(1.0)


def test_mi_partial_by_hand():
    # joint [[3, 1], [1, 3]] / 8, uniform marginals: 2 * 3/8 * log2(1.5) + 2 * 1/8 * log2(0.5) = 1 - H(1/4)
    assert mutual_information(torch.tensor([[3, 1], [1, 3]])) == pytest.approx(0.188722, abs=1e-6)
    # uneven sources: joint [[6, 2], [1, 3]] / 12, p(s) = (2/3, 1/3), p(e) = (7/12, 5/12):
    # 1/2 log2(9/7) + 1/6 log2(3/5) + 1/12 log2(3/7) + 1/4 log2(9/5) = 0.181285 - 0.122828 - 0.101866 + 0.211999
    assert mutual_information(torch.tensor([[6, 2], [1, 3]])) == pytest.approx(0.168590, abs=1e-5)
    # uniform weighting only looks at p(e|s) = (3/4, 1/4) and (1/4, 3/4): the symmetric case above
    assert mutual_information(torch.tensor([[6, 2], [1, 3]]), weighting="uniform") == pytest.approx(0.188722, abs=1e-6)


def test_mi_on_numpy_counts_zero_rows_and_order():
    # p(d, e) = p(d) p(e) for 3 x 3 counts given as numpy
    assert mutual_information(np.outer([10, 30, 60], [2, 5, 3])) == pytest.approx(0.0, abs=1e-12)
    counts = np.diag([40, 40, 20])  # each domain always on its own expert: I = H(domain)
    h_domain = -(0.4 * math.log2(0.4) * 2 + 0.2 * math.log2(0.2))
    assert source_entropy(counts) == pytest.approx(h_domain)
    assert mutual_information(counts) == pytest.approx(h_domain)
    # two domains sharing one expert, the third alone on the other: I = H(expert) = H(1/2, 1/2) = 1 bit
    assert mutual_information(np.array([[25, 0], [25, 0], [0, 50]])) == pytest.approx(1.0)
    # p = [[0.4, 0.1], [0.1, 0.4]]: I = 0.8 log2(0.4 / 0.25) + 0.2 log2(0.1 / 0.25); rows swapped, a zero row added
    expected = 0.8 * math.log2(1.6) + 0.2 * math.log2(0.4)
    assert mutual_information(np.array([[40, 10], [10, 40]])) == pytest.approx(expected)
    assert mutual_information(np.array([[10, 40], [0, 0], [40, 10]])) == pytest.approx(expected)


def test_mi_no_tokens():
    assert mutual_information(torch.zeros(2, 3)) == 0.0


def test_routing_counts_rows_and_specialization():
    counts = torch.zeros(2, 1, 2, 2, dtype=torch.long)  # sources a, b; one layer; image/text; 2 experts
    counts[0, 0, 0] = torch.tensor([3, 1])  # a, image
    counts[0, 0, 1] = torch.tensor([0, 4])  # a, text
    counts[1, 0, 1] = torch.tensor([2, 2])  # b, text only
    rc = RoutingCounts(sources=["a", "b"], layers=["L0"], counts=counts)
    rows = {(r["token_type"], r["source"]): r for r in rc.fraction_rows()}
    assert rows[("all", "a")]["tokens"] == 8
    assert rows[("all", "a")]["expert_0"] == pytest.approx(3 / 8)
    assert rows[("image", "a")]["expert_1"] == pytest.approx(1 / 4)
    assert ("image", "b") not in rows  # no image token from b
    assert rows[("text", "b")]["expert_0"] == pytest.approx(0.5)
    for row in rows.values():
        assert row["expert_0"] + row["expert_1"] == pytest.approx(1.0)
    # text tokens: a [0, 4], b [2, 2] -> joint [[0, 1/2], [1/4, 1/4]], p(e) = (1/4, 3/4)
    # MI = 1/2 log2((1/2) / (1/2 * 3/4)) + 1/4 log2(1 / (1/2)) + 1/4 log2((1/4) / (1/2 * 3/4)) = 0.311278
    text = rc.specialization("text")[0]
    assert text["mi_bits"] == pytest.approx(0.311278, abs=1e-6)
    assert text["normalized_mi"] == pytest.approx(0.311278, abs=1e-6)  # H(source) = 1 bit
    assert rc.specialization("image")[0]["mi_bits"] == 0.0  # a single source


def test_layer_label():
    assert layer_label("model.layers.12.mlp.router", 0) == "L12"
    assert layer_label("blocks.3.ffn.router", 0) == "L3"
    assert layer_label("mlp.router", 4) == "R4"


def test_accumulator_counts_valid_tokens_by_type():
    from mole_lightning.models import build_preset

    torch.manual_seed(0)
    model = build_preset("tiny").eval()
    image_id = model.image_token_id
    input_ids = torch.full((2, 24), 70)
    input_ids[0, 2:18] = image_id  # one image (16 placeholders) in sample 0
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # 5 padding tokens in sample 1
    pixel_values = torch.randn(1, 3, 32, 32)
    acc = RoutingAccumulator(model, ["x", "y"])
    with torch.no_grad(), acc:
        acc.set_batch("y", input_ids == image_id)
        model(input_ids, attention_mask, pixel_values, has_image=torch.tensor([True, False]))
    counts = acc.result()
    assert counts.layers == ["L0", "L1"] and counts.num_experts == 3
    assert counts.select("all")[0].sum() == 0  # nothing for source x
    # per layer: 16 image tokens, 8 + 19 text tokens (padding excluded)
    assert counts.select("image")[1].sum(-1).tolist() == [16, 16]
    assert counts.select("text")[1].sum(-1).tolist() == [27, 27]
    # the hooks are gone after the block
    with torch.no_grad():
        model(input_ids, attention_mask, pixel_values)
    assert acc.result().counts.sum() == counts.counts.sum()
