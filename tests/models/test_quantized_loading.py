"""A 4-bit (nf4, double quantisation) LLM base loaded the transformers way, ``from_pretrained(path,
quantization_config=BitsAndBytesConfig(...))``, inside a LlavaMoLE: what is packed (and how many bits it takes),
what stays full precision, logits against the same weights dequantized, dtype conversions and exports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mole_lightning.models import TINY_CLIP_VISION_CONFIG, build_language_model, build_llava_mole, tiny_tokenizer
from mole_lightning.models.export import ExportError, export_model
from mole_lightning.models.loading import load_adapters
from mole_lightning.peft import MoLEConfig, adapter_state_dict
from mole_lightning.peft.quantization import dequantized_weight, is_4bit, logical_numel, quantize_linears
from mole_lightning.training import ModelSpec
from tests.rounding import assert_linear_within_rounding, bnb_kernel_dtype

bnb = pytest.importorskip("bitsandbytes")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOLE = MoLEConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama (d 128, MLP 256, 2 layers) written with ``save_pretrained``, with its byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def stored_bits_per_weight(weight: torch.Tensor) -> float:
    """Bits a 4-bit weight occupies per weight it stands for: packed codes + 8-bit block absmax + fp32 second-level
    absmax (the 16- and 256-entry lookup tables, constant per layer, left out)."""
    state = weight.quant_state
    stored = weight.numel() * weight.element_size() + state.absmax.numel() * state.absmax.element_size()
    stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return 8 * stored / logical_numel(weight)


def test_llm_folder_loads_with_nf4_projections_and_everything_else_in_full_precision(llama_folder):
    model = build_llava_mole(llm_path=llama_folder, vision_config=TINY_CLIP_VISION_CONFIG, mole=MOLE, quantize="nf4")
    lm = model.language_model
    assert getattr(lm, "is_loaded_in_4bit", False)  # transformers' own quantizer did the loading
    layers = {n: m for n, m in lm.named_modules() if n.rpartition(".")[2] in PROJECTIONS}
    assert len(layers) == 2 * len(PROJECTIONS)
    for name, layer in layers.items():
        assert is_4bit(layer.weight) and layer.weight.dtype == torch.uint8, name
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
        assert 4.12 < stored_bits_per_weight(layer.weight) < 4.13  # 4 + 8/64 + 32/(64*256) = 4.127
    packed = sum(p.numel() for n, p in lm.named_parameters() if is_4bit(p))
    assert packed * 2 == sum(logical_numel(p) for p in lm.parameters() if is_4bit(p))  # two codes per byte
    assert type(lm.lm_head) is nn.Linear and lm.lm_head.weight.dtype == torch.float32
    assert not any(is_4bit(p) for p in [*model.vision_tower.parameters(), *model.projector.parameters()])
    assert not any(
        isinstance(m, bnb.nn.Linear4bit) for m in [*model.vision_tower.modules(), *model.projector.modules()]
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "router" in n or n.startswith("projector.") for n in trainable)


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_logits_match_the_same_model_with_the_dequantized_weights(llama_folder, training):
    quantized = build_language_model(path=llama_folder, quantize="nf4").train(training)
    dense = build_language_model(path=llama_folder).train(training)  # no dropout in this config: train = eval
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    dequantized = {n: dequantized_weight(m.weight).clone() for n, m in layers.items()}  # before a repack
    captured = {}
    hooks = [
        m.register_forward_hook(
            lambda m, args, out, n=n: captured.__setitem__(n, (args[0], out, bnb_kernel_dtype(m.weight)))
        )
        for n, m in layers.items()
    ]
    with torch.no_grad():
        original = dense(ids).logits
        for name, weight in dequantized.items():
            dense.get_submodule(name).weight.copy_(weight)
        reference, logits = dense(ids).logits, quantized(ids).logits
    for hook in hooks:
        hook.remove()
    assert set(captured) == set(layers)
    for name, (x, y, dtype) in captured.items():
        # rounded to the kernel's dtype: input, block absmax, dequantized weight, product (exact in an fp32 kernel)
        assert_linear_within_rounding(y, x, dequantized[name], dtype, roundings=4, name=name)
    if all(dtype == torch.float32 for _, _, dtype in captured.values()):
        # fp32 kernel: the same matrix through the same F.linear, only the summation order may differ
        assert torch.allclose(logits, reference, atol=1e-4, rtol=0), (logits - reference).abs().max()
    else:  # bf16 kernel: the rounding above compounds over layers; the logits stay near the dequantized model's
        assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert 0 < (logits - original).abs().max() < 0.5 * original.abs().max()  # nf4 error: visible, not ruinous


def test_from_pretrained_quantization_and_quantize_linears_give_the_same_codes(llama_folder):
    loaded = build_language_model(path=llama_folder, quantize="nf4")
    converted = build_language_model(path=llama_folder)
    assert quantize_linears(converted, "nf4") == 2 * len(PROJECTIONS)
    for name, module in loaded.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine = converted.get_submodule(name).weight
            assert torch.equal(mine.data, module.weight.data), name
            assert torch.equal(mine.quant_state.absmax, module.weight.quant_state.absmax), name


def test_bf16_conversion_keeps_the_packed_codes_and_the_fp32_trainables(llama_folder):
    model = build_llava_mole(llm_path=llama_folder, vision_config=TINY_CLIP_VISION_CONFIG, mole=MOLE, quantize="nf4")
    layer = model.language_model.model.layers[0].mlp.up_proj
    codes, absmax = layer.weight.detach().clone(), layer.weight.quant_state.absmax.clone()
    model.to(torch.bfloat16)  # what Lightning's bf16-true plugin does
    assert layer.weight.dtype == torch.uint8 and is_4bit(layer.weight) and torch.equal(layer.weight.data, codes)
    assert torch.equal(layer.weight.quant_state.absmax, absmax)
    assert layer.lora_A.dtype == torch.float32 and model.projector[0].weight.dtype == torch.float32
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_meta_device_loading_and_bad_values_are_refused(llama_folder):
    with pytest.raises(ValueError, match="cannot be combined with frozen_on_meta"):
        build_llava_mole(
            llm_path=llama_folder, vision_config=TINY_CLIP_VISION_CONFIG, quantize="nf4", frozen_on_meta=True
        )
    with pytest.raises(ValueError, match=r"quantize must be None or one of \('nf4', 'fp4'\).*got 'int4'"):
        build_language_model(path=llama_folder, quantize="int4")
    with pytest.raises(ValueError, match=r"quantize must be None or one of \('nf4', 'fp4'\).*got 'nf8'"):
        ModelSpec(quantize="nf8")


def test_adapter_exports_work_and_llava_hf_merging_into_4bit_is_refused(llama_folder, tmp_path):
    def build():
        return build_llava_mole(
            llm_path=llama_folder, vision_config=TINY_CLIP_VISION_CONFIG, mole=MOLE, quantize="nf4"
        ).eval()

    torch.manual_seed(3)
    model = build()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)
    folder = export_model(model, tmp_path / "mole", to="mole")
    reloaded = load_adapters(build(), folder)
    for name, value in adapter_state_dict(model.language_model).items():
        assert torch.equal(adapter_state_dict(reloaded.language_model)[name], value)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    with pytest.raises(ExportError, match="4-bit base"):
        export_model(model, tmp_path / "hf", to="llava-hf", merge=True)
    with pytest.raises(ExportError, match="4-bit base"):
        export_model(model, tmp_path / "with-base", to="mole", write_base=True)
