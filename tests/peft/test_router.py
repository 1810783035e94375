"""Balance losses, z-loss and routing statistics against values computed by hand on small fixed logits."""

import math

import pytest
import torch
from torch import nn

from mole_lightning.peft import MoLEConfig, apply_mole, collect_aux, routing_mask, routing_statistics

LN3 = math.log(3.0)


class OneProjectionMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.up_proj(x)


class TwoLayers(nn.Module):
    """Two 'MLPs' applied to the same input, so both routers see the inputs we choose."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([OneProjectionMLP(), OneProjectionMLP()])

    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


def identity_routed(config: MoLEConfig, swap_second: bool = False) -> TwoLayers:
    """Router logits = the 2-d input itself (second layer: swapped), so probabilities are fixed by hand."""
    model = apply_mole(TwoLayers(), config)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.router.weight.copy_(torch.eye(2).flip(0) if (swap_second and i == 1) else torch.eye(2))
            layer.router.bias.zero_()
    return model


def cfg(**kw) -> MoLEConfig:
    return MoLEConfig(dropout=0.0, num_experts=2, rank=2, alpha=2.0, mlp_targets=["up_proj"], attn_targets=[], **kw)


def test_switch_balance_and_z_loss_by_hand():
    # tokens: probs (.25,.75) -> e1, (.25,.75) -> e1, (.75,.25) -> e0
    x = torch.tensor([[0.0, LN3], [0.0, LN3], [LN3, 0.0]])
    model = identity_routed(cfg(balance="switch", balance_coef=0.1, z_loss_coef=0.01))
    model(x)
    aux = collect_aux(model)
    # f = (1/3, 2/3), P = (5/12, 7/12): K * sum f P = 2 * (5/36 + 14/36) = 19/18, same in both layers
    assert aux.balance.item() == pytest.approx(19 / 18, rel=1e-6)
    assert aux.z_loss.item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)  # logsumexp(0, ln3) = ln 4
    assert aux.total.item() == pytest.approx(0.1 * 19 / 18 + 0.01 * math.log(4.0) ** 2, rel=1e-6)
    stats = routing_statistics(model)
    assert list(stats) == ["layers.0.router", "layers.1.router"]
    assert stats["layers.0.router"]["tokens_per_expert"].tolist() == [1, 2]
    assert stats["layers.0.router"]["balance"] == pytest.approx(19 / 18, rel=1e-6)


def test_switch_balance_is_averaged_over_layers():
    x = torch.tensor([[0.0, LN3], [0.0, LN3], [LN3, 0.0]])
    model = identity_routed(cfg(balance="switch"), swap_second=True)
    model(x)
    # layer 1 sees logits swapped: probs (.75,.25) e0, (.75,.25) e0, (.25,.75) e1: f=(2/3,1/3), P=(7/12,5/12) -> 19/18
    stats = routing_statistics(model)
    assert stats["layers.1.router"]["tokens_per_expert"].tolist() == [2, 1]
    assert collect_aux(model).balance.item() == pytest.approx(19 / 18, rel=1e-6)


def test_pooled_balance_by_hand_with_padding():
    # batch of 2 samples x 2 tokens; sample 1's second token is padding
    x = torch.tensor([[[0.0, LN3], [LN3, 0.0]], [[0.0, LN3], [5.0, -5.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    model = identity_routed(cfg(balance="pooled", balance_coef=1.0))
    with routing_mask(model, mask):
        model(x)
    # sample 0, pooled over 2 layers x 2 tokens: (.25,.75) e1, (.75,.25) e0 twice: P = (.5,.5), f = (.5,.5) -> 0.5
    # sample 1, valid token only: (.25,.75) e1 twice: P = (.25,.75), f = (0, 1) -> 0.75.  Mean over samples: 0.625
    # (were the padding token counted, sample 1 would give 0.5 and the mean 0.5)
    aux = collect_aux(model)
    assert aux.balance.item() == pytest.approx(0.625, rel=1e-6)
    assert aux.total.item() == pytest.approx(0.625, rel=1e-6)

    # an unbalanced case: one sample, both layers identical
    x = torch.tensor([[[0.0, LN3], [0.0, LN3], [LN3, 0.0]]])
    model = identity_routed(cfg(balance="pooled"))
    model(x)
    # pooled over 6 rows: P = (5/12, 7/12), f = (1/3, 2/3): sum = 5/36 + 14/36 = 19/36 (no K factor)
    assert collect_aux(model).balance.item() == pytest.approx(19 / 36, rel=1e-6)


def test_padding_counts_in_neither_losses_nor_statistics():
    x = torch.tensor([[[0.0, LN3], [0.0, LN3], [LN3, 0.0], [9.0, 0.0], [9.0, 0.0]]])
    model = identity_routed(cfg(balance="switch", z_loss_coef=1.0))
    with routing_mask(model, torch.tensor([[1, 1, 1, 0, 0]])):
        model(x)
    assert routing_statistics(model)["layers.0.router"]["tokens_per_expert"].tolist() == [1, 2]
    aux = collect_aux(model)
    assert aux.balance.item() == pytest.approx(19 / 18, rel=1e-6)
    assert aux.z_loss.item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    assert all(r.token_mask is None for r in (model.layers[0].router, model.layers[1].router))


def test_balance_loss_gradient_reaches_router():
    model = identity_routed(cfg(balance="switch", balance_coef=1.0))
    with torch.no_grad():
        model.layers[0].router.weight.copy_(torch.randn(2, 2))
    model(torch.randn(6, 2))
    collect_aux(model).total.backward()
    assert torch.count_nonzero(model.layers[0].router.weight.grad) > 0


def test_no_router_gives_zero_aux():
    model = identity_routed(cfg())
    aux = collect_aux(model)  # no forward yet
    assert aux.total.item() == 0.0
    single = apply_mole(TwoLayers(), MoLEConfig(dropout=0.0, num_experts=1, rank=2, alpha=2, mlp_targets=["up_proj"]))
    single(torch.randn(3, 2))
    assert collect_aux(single).total.item() == 0.0 and routing_statistics(single) == {}


def test_mask_of_wrong_shape_is_a_clear_error():
    model = identity_routed(cfg())
    with routing_mask(model, torch.ones(3, 4)), pytest.raises(ValueError, match="routing mask of shape"):
        model(torch.randn(2, 5, 2))


def test_decoding_mask_uses_last_columns():
    model = identity_routed(cfg())
    x = torch.tensor([[[0.0, LN3]], [[LN3, 0.0]]])  # (B=2, S=1, d) new tokens of a cached decode
    with routing_mask(model, torch.tensor([[0, 1, 1], [1, 1, 0]])):
        model(x)
    # sample 1's newest token is masked (left-padded prompt of a different length would not do this; a test value)
    assert routing_statistics(model)["layers.0.router"]["tokens_per_expert"].tolist() == [0, 1]


def test_fp32_router_on_bf16_inputs_matches_autograd_reference():
    from mole_lightning.peft.router import fp32_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=gen).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(3, 8, generator=gen).requires_grad_(True)
    bias = torch.randn(3, generator=gen).requires_grad_(True)
    upstream = torch.randn(6, 3, generator=gen)
    (fp32_linear(x, weight, bias) * upstream).sum().backward()
    ours = (x.grad.clone(), weight.grad.clone(), bias.grad.clone())
    x.grad = weight.grad = bias.grad = None
    reference = torch.nn.functional.linear(x.float(), weight, bias)
    assert reference.dtype == torch.float32
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours[0], x.grad)
    torch.testing.assert_close(ours[1], weight.grad)
    torch.testing.assert_close(ours[2], bias.grad)
