"""LoRA and MoLE layers over a 4-bit bitsandbytes base (QLoRA), on bitsandbytes' CPU backend, against independent
references: bitsandbytes' own ``Linear4bit`` forward plus the adapter term by hand, and autograd through a plain
``F.linear`` on the dequantized weight (``bitsandbytes.functional.dequantize_4bit``)."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mole_lightning.peft import LoRALinear, MoLEConfig, MoLELinear, apply_mole
from mole_lightning.peft.quantization import (
    check_quantize,
    dequantized_weight,
    is_4bit,
    logical_numel,
    quantize_linears,
    require_bitsandbytes,
)
from tests.rounding import assert_linear_within_rounding

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")

ATOL = 1e-5
"""fp32 tolerance between bitsandbytes' 4-bit matmul and F.linear on the dequantized weight: both multiply the same
fp32 matrix, so only the summation order may differ (bitsandbytes 0.50.2's CPU backend dequantizes and calls the same
matmul: the measured differences of outputs and gradients are exactly 0)."""


class BiasedMLP(nn.Module):
    """A Llama-style MLP with biases (Qwen2 projections have them): down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int = 64, ffn: int = 128) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn)
        self.up_proj = nn.Linear(d, ffn)
        self.down_proj = nn.Linear(ffn, d)
        self.lm_head = nn.Linear(d, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def dequantized_copy(model: nn.Module) -> nn.Module:
    """``model`` with every ``Linear4bit`` replaced by an ``nn.Linear`` holding the dequantized weight."""
    import bitsandbytes as bnb

    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(dequantized_weight(module.weight).clone(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, child, linear)
    return reference


def quantized_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mlp = BiasedMLP()
    assert quantize_linears(mlp, "nf4") == 3  # gate, up, down; lm_head kept
    return mlp


@needs_bnb
def test_quantize_linears_packs_projections_and_keeps_the_lm_head():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    mlp = BiasedMLP()
    dense = mlp.up_proj.weight.detach().clone()
    quantize_linears(mlp, "nf4")
    assert type(mlp.lm_head) is nn.Linear and not is_4bit(mlp.lm_head.weight)
    layer = mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and is_4bit(layer.weight) and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (128 * 64 // 2, 1)
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested and tuple(state.shape) == (128, 64)
    assert logical_numel(layer.weight) == 128 * 64
    # nf4 reconstruction error of N(0, 1/64)-ish weights: below the largest nf4 step times the block absmax
    error = (dequantized_weight(layer.weight) - dense).abs().max()
    assert 0 < error < 0.25 * dense.abs().max()


@needs_bnb
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_over_4bit_base_matches_bitsandbytes_linear4bit_plus_the_adapter(with_bias):
    mlp = quantized_mlp()
    base = mlp.up_proj
    if not with_bias:
        base.bias = None
    lora = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5)
    x = torch.randn(3, 5, 64)
    expected = base(x) + 2.0 * (x @ lora.lora_A) @ lora.lora_B  # bitsandbytes' own Linear4bit.forward
    assert torch.allclose(lora(x), expected, atol=ATOL, rtol=0)
    assert lora.weight is base.weight and (lora.bias is base.bias)  # the packed weight is shared, not copied
    names = {"weight", "lora_A", "lora_B"} | ({"bias"} if with_bias else set())
    assert set(lora.state_dict()) == names  # nn.Linear's names: base checkpoints and adapter state dicts unchanged


@needs_bnb
def test_lora_over_4bit_base_gradients_match_autograd_on_the_dequantized_weight():
    mlp = quantized_mlp()
    base = mlp.up_proj
    w, b = dequantized_weight(base.weight), base.bias.detach()
    lora = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5)
    a_ref = lora.lora_A.detach().clone().requires_grad_()
    b_ref = lora.lora_B.detach().clone().requires_grad_()
    x = torch.randn(7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    target = torch.randn(7, 128)

    ((lora(x) - target) ** 2).sum().backward()
    ((F.linear(x_ref, w, b) + 2.0 * (x_ref @ a_ref) @ b_ref - target) ** 2).sum().backward()
    for got, want in ((x.grad, x_ref.grad), (lora.lora_A.grad, a_ref.grad), (lora.lora_B.grad, b_ref.grad)):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
    assert base.weight.grad is None and base.bias.grad is None  # the frozen base gets nothing


@needs_bnb
@pytest.mark.parametrize("impl", ["loop", "dense_masked", "grouped"])
def test_mole_over_4bit_base_matches_the_dequantized_reference_in_outputs_and_gradients(impl):
    config = MoLEConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, impl=impl, attn_targets=())
    quantized = quantized_mlp()
    reference = dequantized_copy(quantized)
    torch.manual_seed(1)
    apply_mole(quantized, config)
    torch.manual_seed(1)
    apply_mole(reference, config)
    with torch.no_grad():  # non-zero experts and a router that uses all of them, identical in both
        for p, q in zip(quantized.parameters(), reference.parameters()):
            if p.requires_grad:
                p.normal_(0, 0.5)
                q.copy_(p)
    assert isinstance(quantized.up_proj, MoLELinear) and is_4bit(quantized.up_proj.weight)
    x = torch.randn(2, 9, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    out, out_ref = quantized(x), reference(x_ref)
    assert len(set(quantized.router.decision.expert.tolist())) > 1  # several experts take tokens
    assert torch.allclose(out, out_ref, atol=ATOL * 10, rtol=0), (out - out_ref).abs().max()
    out.square().sum().backward()
    out_ref.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4, rtol=1e-5), (x.grad - x_ref.grad).abs().max()
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert set(grads) == set(grads_ref) and any("router" in n for n in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], atol=1e-3, rtol=1e-4), (name, (grad - grads_ref[name]).abs().max())


@needs_bnb
def test_bf16_input_computes_in_the_base_compute_dtype_and_returns_bf16():
    torch.manual_seed(0)
    mlp = BiasedMLP()
    quantize_linears(mlp, "nf4", compute_dtype=torch.bfloat16)
    lora = LoRALinear(mlp.up_proj, rank=4, alpha=8.0)
    assert lora.compute_dtype == torch.bfloat16 and lora.lora_A.dtype == torch.float32  # fp32 masters
    x = torch.randn(6, 64, dtype=torch.bfloat16, requires_grad=True)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    # bf16 kernel: weight dequantized to bf16 (scale, value: 2 roundings) times the bf16 input, bf16 output and bias
    weight = dequantized_weight(lora.weight).float()
    assert_linear_within_rounding(y, x.detach(), weight, torch.bfloat16, roundings=3, bias=lora.bias.detach())
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and lora.lora_A.grad.dtype == torch.float32


@needs_bnb
def test_fp4_is_the_other_4bit_type():
    torch.manual_seed(0)
    mlp = BiasedMLP()
    quantize_linears(mlp, "fp4")
    assert mlp.gate_proj.weight.quant_state.quant_type == "fp4"


def test_bad_quantize_value_is_a_one_line_value_error():
    assert check_quantize(None) is None and check_quantize("nf4") == "nf4"
    with pytest.raises(ValueError, match=r"quantize must be None or one of \('nf4', 'fp4'\).*got 'int8'") as info:
        check_quantize("int8")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="quantize must be"):
        quantize_linears(nn.Linear(4, 4), "q4")


def test_missing_bitsandbytes_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r"pip install bitsandbytes.*mole_lightning\[qlora\]"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantize_linears(nn.Sequential(nn.Linear(4, 4)), "nf4")
