"""LLaVA-style multimodal model with a MoLE-adapted LLM: vision towers, projectors, the model, builders, loaders."""

from mole_lightning.models.builders import (
    PRESETS,
    TINY_CLIP_VISION_CONFIG,
    TINY_LLAMA_CONFIG,
    TINY_OPEN_CLIP_CONFIG,
    build_language_model,
    build_llava_mole,
    build_preset,
    build_vision_tower,
    preset_kwargs,
)
from mole_lightning.models.llava_mole import LlavaMoLE, LlavaMoLEOutput
from mole_lightning.models.loading import (
    load_adapters,
    load_llava_hf,
    load_projector,
    projector_state_dict_from,
    read_state_dict,
    save_adapters,
)
from mole_lightning.models.projector import PROJECTOR_NAMES, MLPProjector, build_projector, projector_name
from mole_lightning.models.spec import DTYPES, ModelSpec
from mole_lightning.models.trainable import (
    clean_parameter_name,
    load_trained_state,
    missing_trainable,
    select_trainable,
    trainable_names,
    trainable_state_dict,
)
from mole_lightning.models.vision import (
    VISION_TOWERS,
    HFVisionTower,
    OpenCLIPVisionTower,
    TowerKind,
    VisionGeometry,
    VisionTower,
    register_vision_tower,
    vision_geometry,
)
from mole_lightning.tokenization import (  # re-exported; their home is tokenization
    add_image_token,
    load_tokenizer,
    resize_embeddings,
    tiny_tokenizer,
)

__all__ = [
    "DTYPES",
    "ModelSpec",
    "preset_kwargs",
    "PRESETS",
    "PROJECTOR_NAMES",
    "TINY_CLIP_VISION_CONFIG",
    "TINY_LLAMA_CONFIG",
    "TINY_OPEN_CLIP_CONFIG",
    "VISION_TOWERS",
    "HFVisionTower",
    "LlavaMoLE",
    "LlavaMoLEOutput",
    "MLPProjector",
    "OpenCLIPVisionTower",
    "TowerKind",
    "VisionGeometry",
    "VisionTower",
    "add_image_token",
    "build_language_model",
    "build_llava_mole",
    "build_preset",
    "build_projector",
    "build_vision_tower",
    "clean_parameter_name",
    "load_trained_state",
    "missing_trainable",
    "select_trainable",
    "trainable_names",
    "load_adapters",
    "load_llava_hf",
    "load_projector",
    "load_tokenizer",
    "projector_name",
    "projector_state_dict_from",
    "read_state_dict",
    "register_vision_tower",
    "resize_embeddings",
    "save_adapters",
    "tiny_tokenizer",
    "trainable_state_dict",
    "vision_geometry",
]
