"""`apply_mole` on tiny Llama, Mistral, Qwen2, Qwen3 and LLaVA models of transformers; adapter state dicts; configs."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from mole_lightning.peft import (
    LoRALinear,
    MoLEConfig,
    MoLELinear,
    MoLERouter,
    adapter_state_dict,
    apply_mole,
    collect_aux,
    load_adapter_state_dict,
    routing_mask,
    routing_statistics,
)
from tests.tiny_models import TINY_MODELS, tiny_llava

IDS = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_zero_b_equals_base_exactly(tiny_lm):
    reference = tiny_lm(IDS, attention_mask=MASK).logits
    apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=3, rank=4, alpha=8))
    with routing_mask(tiny_lm, MASK):
        adapted = tiny_lm(IDS, attention_mask=MASK).logits
    assert torch.equal(adapted, reference)


def test_structure_and_trainable_parameters(tiny_lm):
    num_layers = tiny_lm.config.num_hidden_layers
    apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=3, rank=4, alpha=8))
    modules = dict(tiny_lm.named_modules())
    routers = [n for n, m in modules.items() if isinstance(m, MoLERouter)]
    assert len(routers) == num_layers and all(n.endswith("mlp.router") for n in routers)
    assert sum(isinstance(m, MoLELinear) for m in modules.values()) == 3 * num_layers
    assert sum(isinstance(m, LoRALinear) for m in modules.values()) == 4 * num_layers
    trainable = {n for n, p in tiny_lm.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(tiny_lm))
    assert all(("lora_" in n) or (".router." in n) for n in trainable)
    # base checkpoint keys are unchanged, so base weights still load by name
    assert "model.layers.0.mlp.gate_proj.weight" in tiny_lm.state_dict()


def test_only_adapters_get_grads_and_frozen_weights_stay(tiny_lm):
    apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=3, rank=4, alpha=8, balance_coef=0.01))
    randomize_adapters(tiny_lm)
    frozen_before = {n: p.detach().clone() for n, p in tiny_lm.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in tiny_lm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tiny_lm.train()
    with routing_mask(tiny_lm, MASK):
        out = tiny_lm(IDS, attention_mask=MASK, labels=IDS)
    (out.loss + collect_aux(tiny_lm).total).backward()
    for name, p in tiny_lm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    optimizer.step()
    for name, p in tiny_lm.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name


def test_k1_is_plain_lora_on_mlp_without_router(tiny_lm):
    apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=1, rank=4, alpha=8))
    assert not any(isinstance(m, (MoLERouter, MoLELinear)) for m in tiny_lm.modules())
    mlp = tiny_lm.model.layers[0].mlp
    assert all(isinstance(getattr(mlp, p), LoRALinear) for p in ("gate_proj", "up_proj", "down_proj"))
    assert collect_aux(tiny_lm).total.item() == 0.0


@pytest.mark.parametrize("num_experts", [1, 3])
def test_mlp_rank_sets_the_mlp_adapters_apart_from_attention(tiny_lm, num_experts):
    """``mlp_rank`` (the parameter-matched dense baseline with K = 1): MLP adapters at their own rank, at the same
    scale alpha / r unless ``mlp_alpha`` says otherwise; attention untouched; the MLP delta is (alpha'/r') x A B."""
    config = MoLEConfig(dropout=0.0, num_experts=num_experts, rank=4, alpha=8, mlp_rank=12)
    assert (config.expert_rank, config.expert_alpha) == (12, 24.0)
    apply_mole(tiny_lm, config)
    layer = tiny_lm.model.layers[0]
    assert layer.self_attn.q_proj.lora_A.shape[-1] == 4 and layer.self_attn.q_proj.scaling == 2.0
    up = layer.mlp.up_proj
    assert up.lora_A.shape[-1] == 12 and up.lora_B.shape[-2] == 12 and up.scaling == 2.0
    if num_experts == 1:  # the delta by hand: x + (24 / 12) x A B
        with torch.no_grad():
            up.lora_B.normal_()
        x = torch.randn(5, up.in_features)
        expected = x @ up.weight.T + 2.0 * (x @ up.lora_A) @ up.lora_B
        torch.testing.assert_close(up(x), expected)
    own = MoLEConfig(num_experts=1, rank=4, alpha=8, mlp_rank=12, mlp_alpha=6.0)
    assert own.expert_alpha == 6.0 and MoLEConfig(rank=4, alpha=8).expert_rank == 4


def test_lm_inside_llava_is_adapted_and_vision_tower_is_not():
    torch.manual_seed(0)
    llava = tiny_llava().eval()
    pixel_values = torch.randn(1, 3, 16, 16)
    ids = torch.cat([torch.full((1, 16), 96), torch.randint(0, 90, (1, 5))], dim=1)  # 16 image tokens + text
    reference = llava(input_ids=ids, pixel_values=pixel_values).logits
    apply_mole(llava, MoLEConfig(dropout=0.0, num_experts=2, rank=4, alpha=8))
    names = [n for n, m in llava.named_modules() if isinstance(m, (LoRALinear, MoLELinear, MoLERouter))]
    assert names and all("language_model" in n for n in names)
    assert not any(p.requires_grad for p in llava.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in llava.model.multi_modal_projector.parameters())
    assert len([n for n in names if n.endswith("router")]) == 2
    assert torch.equal(llava(input_ids=ids, pixel_values=pixel_values).logits, reference)


def test_adapter_state_dict_round_trip_through_safetensors(tmp_path, tiny_lm):
    base = copy.deepcopy(tiny_lm)
    config = MoLEConfig(dropout=0.0, num_experts=3, rank=4, alpha=8)
    apply_mole(tiny_lm, config)
    randomize_adapters(tiny_lm)
    with routing_mask(tiny_lm, MASK):
        expected = tiny_lm(IDS, attention_mask=MASK).logits
    state = adapter_state_dict(tiny_lm)
    assert all(("lora_" in k) or (".router." in k) for k in state)
    save_file(state, str(tmp_path / "adapter.safetensors"))

    fresh = apply_mole(base, MoLEConfig.from_dict(config.to_dict()))
    load_adapter_state_dict(fresh, load_file(str(tmp_path / "adapter.safetensors")))
    with routing_mask(fresh, MASK):
        assert torch.equal(fresh(IDS, attention_mask=MASK).logits, expected)


def test_adapter_state_dict_mismatch_is_a_clear_error(tiny_lm):
    other = copy.deepcopy(tiny_lm)
    apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=3, rank=4, alpha=8))
    state = adapter_state_dict(tiny_lm)
    apply_mole(other, MoLEConfig(dropout=0.0, num_experts=2, rank=4, alpha=8))
    with pytest.raises(ValueError, match=r"lora_A' has shape \(3, 32, 4\), the model expects \(2, 32, 4\)"):
        load_adapter_state_dict(other, state)
    renamed = {k.replace("q_proj", "query"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="missing .*q_proj.*unexpected .*query"):
        load_adapter_state_dict(tiny_lm, renamed)


def test_apply_twice_and_no_target_are_errors(tiny_lm):
    apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=2, rank=2, alpha=4))
    with pytest.raises(ValueError, match="already has LoRA/MoLE adapters"):
        apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=2, rank=2, alpha=4))
    with pytest.raises(ValueError, match="no module named like"):
        apply_mole(torch.nn.Sequential(torch.nn.Linear(2, 2)), MoLEConfig())


def test_gradient_checkpointing_gives_same_loss_grads_and_stats(tiny_lm):
    apply_mole(tiny_lm, MoLEConfig(dropout=0.0, num_experts=3, rank=4, alpha=8, balance_coef=0.1, z_loss_coef=0.01))
    randomize_adapters(tiny_lm)
    checkpointed = copy.deepcopy(tiny_lm)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    results = []
    for model in (tiny_lm, checkpointed):
        model.train()
        with routing_mask(model, MASK):
            out = model(IDS, attention_mask=MASK, labels=IDS)
        aux = collect_aux(model)
        (out.loss + aux.total).backward()
        stats = routing_statistics(model)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), aux.total.detach(), stats, grads))
    (loss_a, aux_a, stats_a, grads_a), (loss_b, aux_b, stats_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(aux_a, aux_b)
    assert {k: v["tokens_per_expert"].tolist() for k, v in stats_a.items()} == {
        k: v["tokens_per_expert"].tolist() for k, v in stats_b.items()
    }
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_experts", 0, "num_experts must be an integer >= 1"),
        ("rank", -1, "rank must be an integer >= 1"),
        ("alpha", 0, "alpha must be > 0"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
        ("gate", "top2", "gate must be a registered gate mode"),
        ("balance", "cv2", "balance must be one of"),
        ("impl", "triton", "impl must be one of"),
        ("balance_coef", -0.1, "balance_coef must be >= 0"),
        ("mlp_targets", ["q_proj"], "listed in both"),
        ("mlp_rank", 0, "mlp_rank must be None or an integer >= 1"),
        ("mlp_alpha", -2.0, "mlp_alpha must be None or > 0"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        MoLEConfig(**{field: value})


def test_config_defaults_train_what_the_paper_trains():
    config = MoLEConfig()
    assert config.dropout == 0.05 and config.balance_coef > 0  # the official code's dropout; a router that learns
    with pytest.raises(ValueError, match="gate='none' with balance_coef=0 never trains the router"):
        MoLEConfig(gate="none", balance_coef=0.0)
    MoLEConfig(gate="none", balance="pooled", balance_coef=0.05)  # the official sparse path
    MoLEConfig(num_experts=1, gate="none", balance_coef=0.0)  # plain LoRA has no router to train


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['experts'\]"):
        MoLEConfig.from_dict({"experts": 3})
    assert MoLEConfig.from_dict(MoLEConfig(dropout=0.0, num_experts=5).to_dict()) == MoLEConfig(
        dropout=0.0, num_experts=5
    )


# the families README.md promises `apply_mole` works on, with transformers' decoder layer class of each
CLAIMED_FAMILIES = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer",
}


def test_all_tiny_families_available():
    """The `tiny_lm` fixture runs every test above on each claimed family, built as that family's own model."""
    assert set(TINY_MODELS) == set(CLAIMED_FAMILIES)
    for family, layer_class in CLAIMED_FAMILIES.items():
        model = TINY_MODELS[family]()
        assert model.config.model_type == family
        layers = list(model.model.layers)
        assert len(layers) == 2 and all(type(layer).__name__ == layer_class for layer in layers)
