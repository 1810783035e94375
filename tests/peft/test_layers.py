"""Adapter layers against independent references: hand-computed outputs, the per-expert loop, and peft's LoRA."""

import copy
import math

import pytest
import torch
from torch import nn

from mole_lightning.peft import LoRALinear, MoLEConfig, MoLELinear, apply_mole


class GatedMLP(nn.Module):
    """Stand-in for a Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int = 16, ffn: int = 24) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def adapted_mlp(num_experts: int, gate: str = "prob", rank: int = 4, seed: int = 0) -> GatedMLP:
    torch.manual_seed(seed)
    mlp = apply_mole(
        GatedMLP(), MoLEConfig(dropout=0.0, num_experts=num_experts, rank=rank, alpha=2.0 * rank, gate=gate)
    )
    with torch.no_grad():  # non-zero B so every adapter parameter gets a gradient
        for module in mlp.modules():
            if isinstance(module, (MoLELinear, LoRALinear)):
                module.lora_B.normal_(0, 0.5)
    return mlp


def set_routing(mlp: GatedMLP, kind: str) -> None:
    """balanced: random router; skewed: most tokens to expert 0; single: every token to the last expert."""
    router = mlp.router
    with torch.no_grad():
        if kind == "balanced":
            router.weight.normal_(0, 1.0)
            router.bias.zero_()
        elif kind == "skewed":
            router.weight.normal_(0, 0.3)
            router.bias.copy_(torch.linspace(2.0, -2.0, router.num_experts))
        elif kind == "single":
            router.weight.normal_(0, 0.01)
            router.bias.zero_()
            router.bias[-1] = 10.0


def set_impl(mlp: nn.Module, impl: str) -> nn.Module:
    for module in mlp.modules():
        if isinstance(module, MoLELinear):
            module.impl = impl
    return mlp


def run_with_grads(mlp: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = mlp(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()  # a non-uniform upstream gradient
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("gate", ["prob", "straight_through", "none", "soft"])
@pytest.mark.parametrize("routing", ["balanced", "skewed", "single"])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_all_impls_match_loop_in_outputs_and_grads(gate, routing, num_tokens):
    reference = adapted_mlp(num_experts=4, gate=gate)
    set_routing(reference, routing)
    x = torch.randn(num_tokens, 16, generator=torch.Generator().manual_seed(1))
    loop_mlp = set_impl(copy.deepcopy(reference), "loop")
    ref_out, ref_xgrad, ref_grads = run_with_grads(loop_mlp, x)
    if routing == "single":
        assert loop_mlp.router.decision.expert.unique().tolist() == [3]  # three experts get no token
    for impl in ("dense_masked", "grouped", "auto"):
        out, xgrad, grads = run_with_grads(set_impl(copy.deepcopy(reference), impl), x)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xgrad, ref_xgrad, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=f"{impl} {name}")


def test_experts_without_tokens_get_zero_grad_not_none():
    mlp = set_impl(adapted_mlp(num_experts=3), "grouped")
    set_routing(mlp, "single")
    _, _, grads = run_with_grads(mlp, torch.randn(5, 16))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        grad_a = grads[f"{proj}.lora_A"]
        assert grad_a.shape == (3, getattr(mlp, proj).in_features, 4)
        assert torch.count_nonzero(grad_a[:2]) == 0 and torch.count_nonzero(grad_a[2]) > 0


def test_grouped_rejects_misaligned_rank():
    mlp = apply_mole(GatedMLP(), MoLEConfig(dropout=0.0, num_experts=2, rank=3, alpha=6, impl="grouped"))
    with pytest.raises(ValueError, match="16 bytes"):
        mlp(torch.randn(4, 16))


def test_gate_modes_match_hand_computed_outputs():
    """Router = identity on 2-d inputs, A_e = I, B_e = (e + 1) I, zero base: the delta is scale * coeff * (e+1) * x."""
    ln3 = math.log(3.0)
    x = torch.tensor([[0.0, ln3], [0.0, ln3], [ln3, 0.0]])  # probs (.25,.75), (.25,.75), (.75,.25)
    expected_coeff = {  # chosen expert: 1, 1, 0
        "prob": torch.tensor([[0.0, 0.75], [0.0, 0.75], [0.75, 0.0]]),
        "straight_through": torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),
        "none": torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),
        "soft": torch.tensor([[0.25, 0.75], [0.25, 0.75], [0.75, 0.25]]),
    }
    for gate, coeff in expected_coeff.items():
        mlp = nn.Module()
        mlp.up_proj = nn.Linear(2, 2, bias=False)
        mlp.forward = lambda inp, m=mlp: m.up_proj(inp)
        nn.init.zeros_(mlp.up_proj.weight)
        apply_mole(mlp, MoLEConfig(dropout=0.0, num_experts=2, rank=2, alpha=3.0, gate=gate, mlp_targets=["up_proj"]))
        with torch.no_grad():
            mlp.router.weight.copy_(torch.eye(2))
            mlp.router.bias.zero_()
            mlp.up_proj.lora_A.copy_(torch.eye(2).expand(2, 2, 2))
            mlp.up_proj.lora_B.copy_(torch.stack([torch.eye(2), 2 * torch.eye(2)]))
        for impl in ("loop", "dense_masked"):
            set_impl(mlp, impl)
            out = mlp(x)
            expected = 1.5 * (coeff * torch.tensor([1.0, 2.0])).sum(-1, keepdim=True) * x
            torch.testing.assert_close(out, expected, msg=f"{gate}/{impl}")


@pytest.mark.parametrize("gate", ["prob", "straight_through", "none", "soft"])
def test_router_gradient_from_task_loss_by_gate_mode(gate):
    mlp = adapted_mlp(num_experts=3, gate=gate)
    set_routing(mlp, "balanced")
    mlp(torch.randn(9, 16)).square().sum().backward()
    router_grad = mlp.router.weight.grad
    if gate == "none":
        assert router_grad is None or torch.count_nonzero(router_grad) == 0
    else:
        assert router_grad is not None and torch.count_nonzero(router_grad) > 0


def test_straight_through_forward_equals_none_forward():
    a, b = adapted_mlp(3, gate="straight_through"), adapted_mlp(3, gate="none")
    x = torch.randn(6, 16)
    torch.testing.assert_close(a(x), b(x))


def test_lora_matches_peft_given_same_a_and_b():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20))
    ours = LoRALinear(copy.deepcopy(base[0]), rank=4, alpha=8.0)
    with torch.no_grad():
        ours.lora_B.normal_()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    )
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.T)
        layer.lora_B["default"].weight.copy_(ours.lora_B.T)
    x = torch.randn(5, 3, 12)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-6, atol=1e-6)


def test_lora_init_is_kaiming_uniform_a_and_zero_b():
    lin = nn.Linear(400, 30)
    lora = LoRALinear(lin, rank=16, alpha=32)
    bound = 1 / math.sqrt(400)
    assert lora.lora_A.shape == (400, 16) and lora.lora_B.shape == (16, 30)
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(lora.lora_B) == 0
    assert lora.weight is lin.weight and not lora.weight.requires_grad
    experts = MoLELinear(nn.Linear(400, 30), router=None, num_experts=3, rank=16, alpha=32)
    assert experts.lora_A.shape == (3, 400, 16) and experts.lora_B.shape == (3, 16, 30)
    assert experts.lora_A.abs().max() <= bound and torch.count_nonzero(experts.lora_B) == 0
    assert not torch.equal(experts.lora_A[0], experts.lora_A[1])  # experts start different


def test_bf16_base_runs_and_keeps_dtype():
    mlp = adapted_mlp(3).to(torch.bfloat16)
    out = mlp(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 16)


def test_grouped_matches_loop_in_bf16():
    reference = adapted_mlp(num_experts=3, rank=8).to(torch.bfloat16)
    set_routing(reference, "skewed")
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref_out, ref_xgrad, ref_grads = run_with_grads(set_impl(copy.deepcopy(reference), "loop"), x)
    out, xgrad, grads = run_with_grads(set_impl(copy.deepcopy(reference), "grouped"), x)
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xgrad, ref_xgrad, rtol=2e-2, atol=2e-2)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=3e-2, atol=3e-2, msg=name)
