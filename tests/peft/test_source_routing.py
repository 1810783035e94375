"""Source-supervised routing loss: values computed by hand on fixed logits and masks, its gradient, every gate mode,
unknown sources, the zero-coefficient case and the configuration checks."""

import math

import pytest
import torch
from torch import nn

from mole_lightning.peft import GATES, MoLEConfig, apply_mole, collect_aux, routing_mask, source_supervision

K = 3


class OneProjectionMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(K, 2, bias=False)

    def forward(self, x):
        return self.up_proj(x)


class TwoLayers(nn.Module):
    """Two 'MLPs' on the same input, so both routers see the inputs the test chooses."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([OneProjectionMLP(), OneProjectionMLP()])

    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


PERMUTATION = [2, 0, 1]  # layer 1's logits are the input's components in this order


def cfg(**kw) -> MoLEConfig:
    kw = {"balance_coef": 0.0, "z_loss_coef": 0.0, **kw}
    return MoLEConfig(dropout=0.0, num_experts=K, rank=2, alpha=2.0, mlp_targets=["up_proj"], attn_targets=[], **kw)


def fixed_router_model(config: MoLEConfig) -> TwoLayers:
    """Layer 0 router logits = x, layer 1 router logits = x[PERMUTATION]."""
    model = apply_mole(TwoLayers(), config)
    with torch.no_grad():
        model.layers[0].router.weight.copy_(torch.eye(K))
        model.layers[1].router.weight.copy_(torch.eye(K)[PERMUTATION])
        for layer in model.layers:
            layer.router.bias.zero_()
    return model


# batch of 4 samples x 3 tokens; logits per token (layer 0)
X = [
    [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [9.0, 9.0, 9.0]],  # sample 0, last token padding
    [[0.0, 0.0, 3.0], [-2.0, 1.0, 0.5], [0.3, -0.7, 1.1]],  # sample 1, all valid
    [[4.0, -4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],  # sample 2, unknown source
    [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 2.0, 0.0]],  # sample 3, no valid token
]
MASK = [[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]]
TARGETS = [0, 2, -1, 1]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def hand_loss(x, mask, targets) -> float:
    """mean over layers and over samples with a known source and a valid token of -log(mean_t softmax)[target]."""
    per_layer = []
    for layer in range(2):
        terms = []
        for tokens, valid, target in zip(x, mask, targets):
            rows = [t if layer == 0 else [t[i] for i in PERMUTATION] for t, v in zip(tokens, valid) if v]
            if target < 0 or not rows:
                continue
            pooled = sum(softmax(r)[target] for r in rows) / len(rows)
            terms.append(-math.log(pooled))
        per_layer.append(sum(terms) / len(terms))
    return sum(per_layer) / len(per_layer)


def run(model, targets=TARGETS, mask=MASK, x=X):
    with routing_mask(model, torch.tensor(mask)), source_supervision(model, torch.tensor(targets)):
        model(torch.tensor(x))
    return collect_aux(model)


def test_loss_equals_the_hand_computed_value_over_valid_tokens_and_known_sources():
    model = fixed_router_model(cfg(source_routing_coef=0.3, balance_coef=0.1, z_loss_coef=0.01))
    aux = run(model)
    expected = hand_loss(X, MASK, TARGETS)
    assert aux.source_routing.item() == pytest.approx(expected, rel=1e-6)
    assert aux.total.item() == pytest.approx(0.1 * aux.balance.item() + 0.01 * aux.z_loss.item() + 0.3 * expected)
    # counting the padding token of sample 0 would give another value: the mask is honoured
    assert not math.isclose(expected, hand_loss(X, [[1, 1, 1]] + MASK[1:], TARGETS), rel_tol=1e-3)
    assert all(layer.router.source_expert is None for layer in model.layers)  # the context cleans up


def test_unknown_sources_contribute_nothing():
    model = fixed_router_model(cfg(source_routing_coef=1.0))
    changed = [row[:] for row in X]
    changed[2] = [[-9.0, 9.0, 0.0]] * 3  # the unknown-source sample's logits do not matter
    assert run(model, x=changed).source_routing.item() == pytest.approx(hand_loss(X, MASK, TARGETS), rel=1e-6)

    nobody = run(model, targets=[-1, -1, -1, -1])
    assert nobody.source_routing.item() == 0.0 and nobody.total.item() == 0.0
    nobody.total.backward()
    for layer in model.layers:
        assert layer.router.weight.grad is None or torch.count_nonzero(layer.router.weight.grad) == 0


def test_gradient_reaches_the_routers_only_through_the_term_and_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    model = fixed_router_model(cfg(source_routing_coef=0.5))
    with torch.no_grad():
        for layer in model.layers:
            layer.router.weight.copy_(torch.randn(K, K))
            layer.router.bias.copy_(torch.randn(K))
    aux = run(model)  # the task loss is zero: nothing else is back-propagated
    aux.total.backward()

    # reference: the formula written directly on the router parameters
    x, mask, targets = torch.tensor(X), torch.tensor(MASK).bool(), torch.tensor(TARGETS)
    weights = [layer.router.weight.detach().clone().requires_grad_() for layer in model.layers]
    biases = [layer.router.bias.detach().clone().requires_grad_() for layer in model.layers]
    per_layer = []
    for w, b in zip(weights, biases):
        probs = (x @ w.T + b).softmax(-1)  # (B, S, K)
        terms = [
            -torch.log(probs[i][mask[i]].mean(0)[targets[i]])
            for i in range(len(X))
            if targets[i] >= 0 and mask[i].any()
        ]
        per_layer.append(torch.stack(terms).mean())
    (0.5 * torch.stack(per_layer).mean()).backward()
    for layer, w, b in zip(model.layers, weights, biases):
        torch.testing.assert_close(layer.router.weight.grad, w.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.router.bias.grad, b.grad, rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(w.grad) > 0
        assert layer.up_proj.lora_A.grad is None and layer.up_proj.lora_B.grad is None  # experts: no signal


@pytest.mark.parametrize("gate", sorted(GATES))
def test_every_gate_mode_gives_the_same_loss_and_a_router_gradient(gate):
    model = fixed_router_model(cfg(gate=gate, source_routing_coef=1.0))
    aux = run(model)
    assert aux.source_routing.item() == pytest.approx(hand_loss(X, MASK, TARGETS), rel=1e-6)
    aux.total.backward()
    assert all(torch.count_nonzero(layer.router.weight.grad) > 0 for layer in model.layers)


def test_zero_coefficient_gives_the_old_loss_bit_exactly():
    config = cfg(balance_coef=0.1, z_loss_coef=0.01)
    model = fixed_router_model(config)
    with routing_mask(model, torch.tensor(MASK)):
        model(torch.tensor(X))
    before = collect_aux(model)
    with_targets = run(model)
    assert torch.equal(with_targets.total, before.total)
    assert torch.equal(with_targets.total, config.balance_coef * before.balance + config.z_loss_coef * before.z_loss)
    assert with_targets.source_routing.item() == 0.0


def test_no_targets_set_gives_zero_even_when_enabled():
    model = fixed_router_model(cfg(source_routing_coef=1.0, balance_coef=0.1))
    with routing_mask(model, torch.tensor(MASK)):
        model(torch.tensor(X))
    aux = collect_aux(model)
    assert aux.source_routing.item() == 0.0 and torch.equal(aux.total, 0.1 * aux.balance + 0.0 * aux.z_loss)


def test_configuration_checks():
    with pytest.raises(ValueError, match="source_routing_coef must be >= 0"):
        cfg(source_routing_coef=-0.1)
    with pytest.raises(ValueError, match=r"source_expert_map\['doc'\] = 3 is not an expert index in \[0, 3\)"):
        cfg(source_routing_coef=1.0, source_expert_map={"general": 0, "doc": 3})
    with pytest.raises(ValueError, match="num_experts >= 4 sources"):
        cfg(source_routing_coef=1.0).source_experts(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="needs num_experts >= 2"):
        MoLEConfig(num_experts=1, source_routing_coef=1.0)
    assert cfg(source_routing_coef=1.0).source_experts(["med", "doc"]) == {"med": 0, "doc": 1}
    shared = cfg(source_routing_coef=1.0, source_expert_map={"a": 0, "b": 0, "c": 2, "d": 1})
    assert shared.source_experts(["a", "b", "c", "d"]) == {"a": 0, "b": 0, "c": 2, "d": 1}
    # the balance loss is no longer the only router signal of gate "none" when the source term is on
    assert cfg(gate="none", source_routing_coef=1.0).balance_coef == 0.0
    with pytest.raises(ValueError, match="never trains the router"):
        cfg(gate="none")
    assert MoLEConfig.from_dict(shared.to_dict()) == shared
