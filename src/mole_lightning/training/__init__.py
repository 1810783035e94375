"""Training LLaVA-MoLE with Lightning: the LightningModule, strategies (FSDP2/FSDP), callbacks, schedules.

- :class:`MoLELightningModule` (+ :class:`ModelSpec`): builds the model in ``configure_model``, trains LM + aux
  loss, validates per source (:class:`SourceLossMetric`), generates in ``predict_step``.
- :class:`MoLEModelParallelStrategy` (FSDP2) and :class:`MoLEFSDPStrategy` (FSDP1 by class names).
- Callbacks: :class:`RoutingHeatmapCallback` (routing scalars + heatmaps), :class:`SourceMetricsTable`,
  :class:`ResumableTrainLoader`, :class:`TokenThroughputMonitor`, :class:`LearningRateLogger`,
  :class:`SkippedSamplesLogger`; :class:`AtomicCheckpointIO`.
- :class:`WarmupCosineLR`.

Reading its checkpoints back (``module_from_checkpoint``, ``load_trained``, ``export_checkpoint``) is
:mod:`mole_lightning.checkpoints`, a layer above.
"""

from mole_lightning.models import ModelSpec  # re-exported: its home is mole_lightning.models.spec
from mole_lightning.models.vision import VisionGeometry, vision_geometry
from mole_lightning.training.callbacks import (
    AtomicCheckpointIO,
    LearningRateLogger,
    ResumableTrainLoader,
    RoutingHeatmapCallback,
    SkippedSamplesLogger,
    SourceMetricsTable,
    source_table,
)
from mole_lightning.training.module import MoLELightningModule
from mole_lightning.training.schedules import WarmupCosineLR
from mole_lightning.training.source_metrics import SourceLossMetric
from mole_lightning.training.strategies import (
    MoLEFSDPStrategy,
    MoLEModelParallelStrategy,
    default_strategy,
    fully_shard_llava_mole,
)
from mole_lightning.training.throughput import TokenThroughputMonitor, training_flops

__all__ = [
    "AtomicCheckpointIO",
    "LearningRateLogger",
    "ModelSpec",
    "MoLEFSDPStrategy",
    "MoLELightningModule",
    "MoLEModelParallelStrategy",
    "ResumableTrainLoader",
    "RoutingHeatmapCallback",
    "SkippedSamplesLogger",
    "SourceLossMetric",
    "SourceMetricsTable",
    "TokenThroughputMonitor",
    "VisionGeometry",
    "WarmupCosineLR",
    "default_strategy",
    "fully_shard_llava_mole",
    "source_table",
    "training_flops",
    "vision_geometry",
]
