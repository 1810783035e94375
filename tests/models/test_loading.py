"""Each checkpoint format reloads and reproduces the saved model's outputs exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mole_lightning.models import (
    build_llava_mole,
    build_preset,
    build_projector,
    load_adapters,
    load_llava_hf,
    load_projector,
    save_adapters,
    trainable_state_dict,
)
from mole_lightning.peft import MoLEConfig
from tests.tiny_models import clip_config_kwargs, llama_config_kwargs

MOLE = MoLEConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, balance_coef=0.01)


@pytest.fixture
def llm_dir(tmp_path, tokenizer_without_image):
    """A tiny LlamaForCausalLM + tokenizer without ``<image>`` saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(len(tokenizer_without_image)))).eval()
    lm.save_pretrained(tmp_path / "llm")
    tokenizer_without_image.save_pretrained(tmp_path / "llm")
    return tmp_path / "llm", lm


def test_hf_llm_dir_adds_image_token_and_reproduces_logits(llm_dir):
    path, ref = llm_dir
    model = build_llava_mole(llm_path=str(path), vision_config=clip_config_kwargs()).eval()
    assert model.tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id == 44
    emb = model.language_model.get_input_embeddings().weight
    assert emb.shape[0] == 45  # resized by exactly the added token
    ids = torch.randint(4, 44, (2, 10))
    with torch.no_grad():
        out = model(ids).logits
        expected = ref(input_ids=ids).logits
    torch.testing.assert_close(out[..., :44], expected, rtol=0, atol=0)
    assert not emb.requires_grad  # new rows trainable only if asked
    assert "<image>" in model.tokenizer.tokenize("w1 <image> w2")


def test_tokenizer_with_image_token_does_not_resize(tmp_path, tokenizer_with_image):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(len(tokenizer_with_image)))).save_pretrained(tmp_path)
    tokenizer_with_image.save_pretrained(tmp_path)
    model = build_llava_mole(llm_path=str(tmp_path), vision_config=clip_config_kwargs())
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(tokenizer_with_image) == 45


def test_new_token_rows_train_only_new_rows(llm_dir, make_batch, tmp_path):
    """Only the added rows are parameters (``token_rows.*``, (V - 44, D)): the embedding and head weights stay
    frozen; logits equal those of the plain LM whose matrices hold the trained rows; a few AdamW steps move the new
    head row (its moments are (1, D)); the trainable state and an export hold only the rows and reload to equal
    logits."""
    path, _ = llm_dir
    torch.manual_seed(0)  # the random tower, as for the reloaded model below
    model = build_llava_mole(
        llm_path=str(path), vision_config=clip_config_kwargs(), mole=MOLE, train_new_token_rows=True
    ).train()
    head = model.language_model.get_output_embeddings().weight
    emb = model.language_model.get_input_embeddings().weight
    frozen_head, frozen_emb = head.detach().clone(), emb.detach().clone()
    D = emb.shape[1]  # noqa: N806 (the hidden size, as in the docstrings)
    assert not head.requires_grad and not emb.requires_grad
    assert {k: tuple(v.shape) for k, v in model.token_rows.items()} == {"input": (1, D), "output": (1, D)}
    assert model.parameter_roles()["embeddings"] == list(model.token_rows.values())
    batch = make_batch(model.image_token_id)
    batch["labels"][0, -1] = model.image_token_id  # make the new output row receive a gradient
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    before = model.token_rows["output"].detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).total_loss.backward()
        assert head.grad is None and emb.grad is None
        optimizer.step()
    assert not torch.equal(model.token_rows["output"], before)  # the new row learns
    assert torch.equal(head, frozen_head) and torch.equal(emb, frozen_emb)
    moments = optimizer.state[model.token_rows["output"]]
    assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == (1, D)

    model.eval()
    with torch.no_grad():  # reference: the merged matrices in an LM without hooks
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        merged = model.merged_embedding_state()
        assert set(merged) == {"model.embed_tokens.weight", "lm_head.weight"}
        hidden = model.language_model.model(inputs_embeds=torch.randn(1, 3, D)).last_hidden_state
        expected = F.linear(hidden, merged["lm_head.weight"])
        # fp32 dot products of length D in another blocking: |error| <= D * eps * (|h| @ |W|^T)
        bound = D * torch.finfo(torch.float32).eps * F.linear(hidden.abs(), merged["lm_head.weight"].abs())
        assert bool(((model.language_model.lm_head(hidden) - expected).abs() <= bound).all())
        ids = torch.tensor([[44, 3, 44]])
        assert torch.equal(model.language_model.get_input_embeddings()(ids), merged["model.embed_tokens.weight"][ids])
        assert torch.equal(merged["lm_head.weight"][44:], model.token_rows["output"])
    state = trainable_state_dict(model)
    rows = {k: tuple(v.shape) for k, v in state.items() if "embed" in k or "lm_head" in k or "token_rows" in k}
    assert rows == {"token_rows.input": (1, D), "token_rows.output": (1, D)}
    save_adapters(model, tmp_path / "export")
    torch.manual_seed(0)
    reloaded = load_adapters(
        build_llava_mole(llm_path=str(path), vision_config=clip_config_kwargs()), tmp_path / "export"
    ).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits, logits)


def test_llava_hf_checkpoint_reproduces_transformers_outputs(llava_hf_checkpoint, make_batch):
    directory, hf = llava_hf_checkpoint
    model = load_llava_hf(directory).eval()  # no adapters: exactly the checkpoint's network
    assert model.tokenizer is not None and model.image_token_id == hf.config.image_token_id
    batch = make_batch(hf.config.image_token_id, text_only_second=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, hf(**batch).logits, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)


def test_mm_projector_bin(tmp_path):
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(32, 24), torch.randn(32), torch.randn(32, 32), torch.randn(32)
    state = {
        "model.mm_projector.0.weight": w1,
        "model.mm_projector.0.bias": b1,
        "model.mm_projector.2.weight": w2,
        "model.mm_projector.2.bias": b2,
    }
    torch.save(state, tmp_path / "mm_projector.bin")
    proj = load_projector(build_projector("mlp2x_gelu", in_dim=24, out_dim=32), tmp_path / "mm_projector.bin")
    x = torch.randn(3, 5, 24)
    expected = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), expected, rtol=0, atol=0)

    # through the builder
    model = build_preset(
        "tiny",
        mole=None,
        projector_path=str(tmp_path / "mm_projector.bin"),
        vision_config=dict(clip_config_kwargs(), hidden_size=24, num_attention_heads=4),
        llm_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4),
    )
    torch.testing.assert_close(model.projector[2].weight, w2, rtol=0, atol=0)


def test_mm_projector_key_errors_are_reported(tmp_path):
    torch.save({"model.mm_projector.0.weight": torch.zeros(32, 24)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"bad.bin.*missing \['0.bias', '2.bias', '2.weight'\]") as error:
        load_projector(build_projector("mlp2x_gelu", in_dim=24, out_dim=32), tmp_path / "bad.bin")
    assert "\n" not in str(error.value)


def test_adapters_round_trip_onto_a_fresh_base(tmp_path, make_batch):
    torch.manual_seed(0)
    trained = build_preset("tiny").eval()
    with torch.no_grad():  # pretend training happened
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    save_adapters(trained, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert MoLEConfig(**meta["mole"]) == trained.mole_config

    torch.manual_seed(0)
    base = build_preset("tiny", mole=None).eval()  # same base weights, no adapters yet
    batch = make_batch(trained.image_token_id)
    with torch.no_grad():
        before = base(**batch).logits
    load_adapters(base, tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(**batch)
        out = base(**batch)
    assert not torch.allclose(before, expected.logits)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, rtol=0, atol=0)


def test_preset_tiny_open_clip_runs(make_batch):
    model = build_preset("tiny", vision="open_clip")
    batch = make_batch(model.image_token_id)
    out = model(**batch)
    assert out.logits.shape == (2, 24, len(model.tokenizer))
    assert model.num_image_tokens == 16


def test_linear_projector_from_mm_projector_bin(tmp_path):
    w, b = torch.randn(32, 24), torch.randn(32)
    torch.save({"model.mm_projector.weight": w, "model.mm_projector.bias": b}, tmp_path / "mm_projector.bin")
    proj = load_projector(build_projector("linear", in_dim=24, out_dim=32), tmp_path / "mm_projector.bin")
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), F.linear(x, w, b), rtol=0, atol=0)


def test_llava_15_7b_preset_on_local_tiny_copies(llm_dir, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path, _ = llm_dir
    CLIPVisionModel(CLIPVisionConfig(**clip_config_kwargs())).save_pretrained(tmp_path / "clip")
    model = build_preset(
        "llava-1.5-7b", llm_path=str(path), vision_name_or_path=str(tmp_path / "clip"), dtype=torch.float32
    )
    cfg = model.mole_config
    assert (cfg.num_experts, cfg.rank, cfg.alpha, cfg.dropout) == (3, 32, 64.0, 0.05)
    assert model.projector_type == "mlp2x_gelu" and model.vision_tower.feature_layer == -2


def test_tiny_preset_with_tokenizer_path(tmp_path, tokenizer_without_image):
    tokenizer_without_image.save_pretrained(tmp_path / "tok")
    model = build_preset("tiny", tokenizer=str(tmp_path / "tok"))
    assert model.image_token_id == 44
    assert model.language_model.get_input_embeddings().weight.shape[0] == 45


def test_a_missing_relative_folder_is_local_for_every_loader(tmp_path, monkeypatch):
    """``exports/run/base`` (two separators) cannot be a hub id (``org/name``): every loader that takes a folder or
    file says it does not exist, in one line, instead of asking the hub."""
    from mole_lightning.models import (
        build_language_model,
        load_adapters,
        load_llava_hf,
        load_projector,
        read_state_dict,
    )
    from mole_lightning.models.loading import read_adapter_config
    from mole_lightning.models.vision import HFVisionTower
    from mole_lightning.tokenization import load_tokenizer

    monkeypatch.chdir(tmp_path)
    missing = "exports/run/base"
    loaders = {
        "llava-hf folder": lambda: load_llava_hf(missing),
        "LLM folder": lambda: build_language_model(path=missing),
        "vision tower folder": lambda: HFVisionTower.from_pretrained(missing),
        "tokenizer folder": lambda: load_tokenizer(missing),
        "weights file": lambda: read_state_dict(f"{missing}/mm_projector.bin"),
        "adapter folder": lambda: read_adapter_config(missing),
    }
    for what, load in loaders.items():
        with pytest.raises(FileNotFoundError) as info:
            load()
        message = str(info.value)
        assert message.startswith(what) and "does not exist" in message and "\n" not in message, (what, message)
    with pytest.raises(FileNotFoundError, match="weights file"):
        load_projector(torch.nn.Linear(2, 2), "checkpoints/run/mm_projector.bin")
    with pytest.raises(FileNotFoundError, match="adapter folder 'exports/run/adapter' does not exist"):
        load_adapters(None, "exports/run/adapter")


def test_llm_path_wins_over_llm_config_and_says_so(real_folders):
    """A folder's LLM is loaded with its own config; ``llm_config`` beside it is ignored with a warning, and a
    preset's own random-LLM config gives way to an ``llm_path`` without one."""
    import warnings

    from mole_lightning.models import TINY_CLIP_VISION_CONFIG, build_llava_mole, build_preset

    folder = str(real_folders["vicuna"])
    with pytest.warns(UserWarning, match=r"llm_path .* is loaded with its own config; llm_config .* is ignored"):
        model = build_llava_mole(llm_path=folder, llm_config={"hidden_size": 8}, vision_config=TINY_CLIP_VISION_CONFIG)
    with open(f"{folder}/config.json") as handle:
        assert model.language_model.config.hidden_size == json.load(handle)["hidden_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_preset("tiny", llm_path=folder, mole=None)  # the tiny preset's llm_config is dropped, silently


def test_tied_head_shares_the_trained_input_rows(tmp_path, tokenizer_without_image, make_batch):
    """A tied LM head has no rows of its own: one ``token_rows.input``, used by the embedding and the head; a step
    that trains it changes the head's logit of the new token by ``hidden @ rows.T`` and leaves the matrix frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**llama_config_kwargs(len(tokenizer_without_image)), "tie_word_embeddings": True})
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    tokenizer_without_image.save_pretrained(tmp_path / "llm")
    model = build_llava_mole(
        llm_path=str(tmp_path / "llm"), vision_config=clip_config_kwargs(), mole=MOLE, train_new_token_rows=True
    )
    lm = model.language_model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert list(model.token_rows) == ["input"] and model.parameter_roles()["embeddings"] == [model.token_rows["input"]]
    batch = make_batch(model.image_token_id)
    batch["labels"][0, -1] = model.image_token_id
    model.train()(**batch).total_loss.backward()
    assert model.token_rows["input"].grad.any() and lm.get_input_embeddings().weight.grad is None
    with torch.no_grad():
        model.token_rows["input"].add_(1.0)
        hidden = torch.randn(1, 2, model.hidden_size)
        logits = lm.lm_head(hidden)
        ids = torch.tensor([[44]])
        assert torch.equal(lm.get_input_embeddings()(ids)[0, 0], model.token_rows["input"][0])
    new = (hidden * model.token_rows["input"][0]).sum(-1)  # (1, 2): the new token's logit, D products
    bound = (
        model.hidden_size * torch.finfo(torch.float32).eps * (hidden.abs() * model.token_rows["input"][0].abs()).sum(-1)
    )
    assert bool(((logits[..., 44] - new).abs() <= bound).all())
    assert set(model.merged_embedding_state()) == {"model.embed_tokens.weight", "lm_head.weight"}
