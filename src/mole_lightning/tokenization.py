"""The tokenizer as model and data both need it: loaded once per process, with ``<image>`` and a pad token.

Hub tokenizers come without the image placeholder (vicuna's ``tokenizer.model`` + ``tokenizer_config.json``,
Qwen2's ``tokenizer.json``) and often without a pad token. :func:`prepare_tokenizer` adds ``<image>`` as a special
token after the existing vocabulary and pads with ``unk`` as LLaVA does (else ``eos``). It is idempotent, so the
model builder and the DataModule, which each prepare the tokenizer of the same folder, get the same ids.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
"""Files of which a tokenizer folder holds at least one."""


def looks_local(path: str) -> bool:
    """True for a path that names a local file or folder rather than a hub id (``org/name``)."""
    expanded = os.path.expanduser(path)
    return (
        os.path.exists(expanded)
        or os.path.isabs(expanded)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or os.sep != "/"
        and os.sep in path
    )


def require_local_path(path: str, what: str) -> str:
    """``path`` with ``~`` expanded; a local-looking path that does not exist raises at once (no hub lookup).

    Raises:
        FileNotFoundError: ``path`` looks local (absolute, ``./``, ``~``, several ``/``) and does not exist.
    """
    expanded = os.path.expanduser(path)
    if looks_local(path) and not os.path.exists(expanded):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    return expanded


def add_image_token(tokenizer: Any, image_token: str = DEFAULT_IMAGE_TOKEN) -> int:
    """Add ``image_token`` as a special token (no-op when present) and return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(image_token))


def prepare_tokenizer(tokenizer: Any, image_token: str = DEFAULT_IMAGE_TOKEN) -> Any:
    """Give ``tokenizer`` the ``image_token`` special token and a pad token (``unk``, else ``eos``); idempotent.

    Returns:
        The same tokenizer object, changed in place.
    """
    add_image_token(tokenizer, image_token)
    if tokenizer.pad_token is None:  # LLaVA pads vicuna with unk
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


@lru_cache(maxsize=8)
def load_tokenizer(path: str, image_token: str = DEFAULT_IMAGE_TOKEN, trust_remote_code: bool = False) -> Any:
    """The prepared tokenizer of a folder (or hub id), loaded once per process and argument set.

    Raises:
        FileNotFoundError: a local-looking ``path`` that does not exist.
        ValueError: the folder holds no loadable tokenizer (one line naming the folder, its files and the cause).
    """
    resolved = require_local_path(path, "tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError, TypeError, ImportError... here
        files = sorted(os.listdir(resolved)) if os.path.isdir(resolved) else []
        found = [name for name in files if name in TOKENIZER_FILES] or files[:8]
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load a tokenizer from {path!r} (files: {found}): {cause}") from error
    return prepare_tokenizer(tokenizer, image_token)


TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def tiny_tokenizer(*, image_token: str = DEFAULT_IMAGE_TOKEN) -> Any:
    """A byte-level tokenizer without merges (every UTF-8 byte is a token) plus ``<unk> <s> </s> <pad>``.

    Encodes any text losslessly with a 260-token vocabulary (+ ``<image>``); for tiny random models and tests. Like
    Llama's, it puts ``<s>`` in front when called with ``add_special_tokens=True``.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({ch: len(TINY_SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    add_image_token(tokenizer, image_token)
    return tokenizer


def resize_embeddings(language_model: nn.Module, tokenizer: Any, *, pad_to_multiple_of: int | None = None) -> int:
    """Grow the LM embeddings (input and output) to cover the tokenizer, only when needed.

    New rows are initialised to the mean of the old ones (transformers' ``mean_resizing``).

    Returns:
        The number of rows before resizing (first new row), equal to the current size when nothing changed.
    """
    old = language_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    return old
