"""Instruction data for LLaVA-style models: templates, image processing, shards, mixing pipelines, DataModule.

Public API:

* :func:`encode_conversation` / :func:`encode_prompt` -- conversation → ``input_ids`` (+ ``labels``).
* :class:`ImageProcessor` -- image bytes → uint8 square pixels or normalized tower input (``pad`` / ``resize`` /
  ``crop``).
* :func:`collate` / :class:`Collator` -- padded batch dicts (right for training, left for generation).
* :class:`MixedInstructionDataModule` -- weighted multi-source webdataset training, per-source validation;
  :class:`ModalityLengthGrouper` -- batches of one modality and similar lengths (``group_by_modality_length``).
* :class:`ShardWriter`, :func:`write_samples` -- write ``<source>-%06d.tar`` shards with ``sizes.json``
  (``shard_writer.py``); :func:`convert_llava_records` -- LLaVA-format JSON records → shards, with a
  :class:`ConversionReport` of skipped records (``llava_json.py``).
* :func:`expand_urls` -- shard specs (brace patterns, ``::`` lists, folders, globs, URLs) → URL lists
  (``sources.py``).
* :func:`make_demo_data` -- synthetic ``general``/``doc``/``med`` shards and a demo tokenizer.
"""

from mole_lightning.data.collate import Collator, collate, pad_token_id_of
from mole_lightning.data.datamodule import MixedInstructionDataModule
from mole_lightning.data.demo import DemoData, make_demo_data
from mole_lightning.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, to_rgb
from mole_lightning.data.llava_json import ConversionReport, convert_llava_records, load_llava_json
from mole_lightning.data.pipeline import (
    SKIPPED_KEY,
    CountingLoader,
    MixedTrainingStream,
    ModalityLengthGrouper,
    SourceEvalStream,
)
from mole_lightning.data.samples import SampleEncoder
from mole_lightning.data.shard_writer import ShardWriter, write_samples
from mole_lightning.data.sources import expand_urls
from mole_lightning.data.templates import (
    TEMPLATES,
    BadSampleError,
    encode_conversation,
    encode_prompt,
    image_token_id,
    register_template,
)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SKIPPED_KEY",
    "TEMPLATES",
    "BadSampleError",
    "Collator",
    "ConversionReport",
    "CountingLoader",
    "DemoData",
    "ImageProcessor",
    "MixedInstructionDataModule",
    "MixedTrainingStream",
    "ModalityLengthGrouper",
    "SampleEncoder",
    "ShardWriter",
    "SourceEvalStream",
    "collate",
    "convert_llava_records",
    "encode_conversation",
    "encode_prompt",
    "expand_urls",
    "image_token_id",
    "load_llava_json",
    "make_demo_data",
    "pad_token_id_of",
    "register_template",
    "to_rgb",
    "write_samples",
]
