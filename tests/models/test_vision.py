"""Vision towers against manual computations and transformers' own hidden states; frozen-ness; file loading."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from mole_lightning.models import HFVisionTower, OpenCLIPVisionTower

OC_CFG = dict(
    embed_dim=24,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=4, head_width=8),
    text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
)


def _manual_open_clip(visual, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Patch embedding, CLS + positions, ln_pre, then blocks up to ``layer`` (negative from the end); CLS dropped."""
    h = visual.conv1(x)  # (B, W, g, g)
    h = h.flatten(2).transpose(1, 2)  # (B, g*g, W)
    cls = visual.class_embedding.expand(h.shape[0], 1, -1)
    h = torch.cat([cls, h], dim=1) + visual.positional_embedding
    h = visual.ln_pre(h)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[: len(blocks) + layer + 1]:
        h = block(h)
    return h[:, 1:]


@pytest.fixture
def open_clip_file(tmp_path):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(**OC_CFG).eval()
    path = tmp_path / "tiny_open_clip.pt"
    torch.save(clip.state_dict(), path)
    return path, clip


@pytest.mark.parametrize("layer", [-2, -1, -3])
def test_open_clip_features_equal_manual_blocks(open_clip_file, layer):
    path, clip = open_clip_file
    tower = OpenCLIPVisionTower(model_cfg=OC_CFG, pretrained=str(path), feature_layer=layer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = _manual_open_clip(clip.visual, x, layer)
    out = tower(x)
    assert out.shape == (2, 16, 32) == (2, tower.num_patches, tower.hidden_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # blocks after the selected one and the text tower are gone
    assert len(tower.visual.transformer.resblocks) == 4 + layer + 1
    assert not any("token_embedding" in n for n, _ in tower.named_parameters())


def test_open_clip_registered_name_with_pretrained_file(open_clip_file, tmp_path):
    import open_clip

    path, clip = open_clip_file
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "mole-test-tiny-vit.json").write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(cfg_dir)
    tower = OpenCLIPVisionTower("mole-test-tiny-vit", pretrained=str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = _manual_open_clip(clip.visual, x, -2)
    torch.testing.assert_close(tower(x), ref, rtol=1e-5, atol=1e-5)
    assert tower.image_size == 32 and len(tower.image_mean) == 3


def _clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4
    )


def test_hf_clip_tower_matches_hidden_states_and_loads_from_dir(tmp_path):
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    ref_model = CLIPVisionModel(_clip_config()).eval()
    ref_model.save_pretrained(tmp_path / "clip")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ref_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # LLaVA "default"
    tower = HFVisionTower.from_pretrained(str(tmp_path / "clip"), feature_layer=-2)
    out = tower(x)
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(tower.model.encoder.layers) == 2  # last layer pruned


def test_hf_siglip_tower_has_no_cls():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4
    )
    torch.manual_seed(0)
    ref_model = SiglipVisionModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ref_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    tower = HFVisionTower.from_config(config)
    tower.model.load_state_dict(ref_model.state_dict(), strict=False)
    torch.testing.assert_close(tower(x), ref, rtol=0, atol=0)
    assert tower.num_patches == 16


def test_towers_are_frozen_and_stay_in_eval(open_clip_file):
    path, _ = open_clip_file
    for tower in (HFVisionTower.from_config(_clip_config()), OpenCLIPVisionTower(model_cfg=OC_CFG)):
        parent = nn.ModuleDict({"tower": tower}).train()
        assert not tower.training
        assert all(not m.training for m in tower.modules())
        assert not any(p.requires_grad for p in tower.parameters())
        x = torch.randn(1, 3, 32, 32, requires_grad=True)
        assert not tower(x).requires_grad
        assert parent.training


def test_wrong_image_size_is_a_clear_error():
    tower = HFVisionTower.from_config(_clip_config())  # 32 px
    with pytest.raises(ValueError, match=r"48\*48.*32\*32"):
        tower(torch.randn(2, 3, 48, 48))


def test_pixel_values_without_batch_or_channels_are_a_clear_error():
    tower = HFVisionTower.from_config(_clip_config())
    for shape in [(3, 32, 32), (2, 1, 32, 32)]:
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got " + re.escape(str(shape))):
            tower(torch.randn(*shape))
