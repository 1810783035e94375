"""Distributed strategies for LLaVA-MoLE: FSDP2 (``fully_shard``, the default) and FSDP1, configured by class names.

Sharding units, the same for both (never one unit per expert: experts are stacked tensors inside their layer, so an
unused expert never leaves a unit without gradients):

- every LLM decoder layer (also the activation-checkpointing unit),
- every MoLE router (fp32 while the base may be bf16; FSDP flattens one dtype per unit),
- the vision tower (frozen) as one unit,
- the root (projector, final norm, the frozen embeddings and LM head, and the fp32 rows of added tokens that
  ``train_new_token_rows`` trains).

:class:`MoLEModelParallelStrategy` is Lightning's ``ModelParallelStrategy`` with pure data parallelism by default,
trainable-only full-tensor checkpoints, and the ``fully_shard`` options read by the module's ``configure_model``.
It works on CPU with the gloo backend (``accelerator="cpu"``), which is how the tests run it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.wrap import CustomPolicy

from mole_lightning.peft import MoLERouter
from mole_lightning.peft.quantization import is_quantized

DEFAULT_WRAP_CLASS_NAMES: tuple[str, ...] = (
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "MoLERouter",
)
"""Decoder layer classes (and the router) that become FSDP1 units unless ``wrap_class_names`` says otherwise."""

QUANTIZED_SHARDING_ERROR = (
    "a 4-bit base (model.architecture.quantize) cannot be sharded with FSDP/FSDP2 (the packed bitsandbytes weights "
    "and their quantization state are not sharded): train QLoRA on one device or with DDP (trainer.strategy: auto / "
    "ddp)"
)

PRECISION_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "decoder_layers"):
        return list(model.decoder_layers())
    return [m for m in model.modules() if type(m).__name__ in DEFAULT_WRAP_CLASS_NAMES[:-1]]


def refuse_sharded_4bit(quantize: str | None, mesh: Any, strategy: Any) -> None:
    """Raise ``ValueError`` (:data:`QUANTIZED_SHARDING_ERROR`) when a 4-bit base (``quantize`` set) would be sharded:
    a device mesh is given (FSDP2) or ``strategy`` is FSDP1."""
    if quantize is not None and (mesh is not None or isinstance(strategy, FSDPStrategy)):
        raise ValueError(QUANTIZED_SHARDING_ERROR)


def fully_shard_llava_mole(
    model: nn.Module,
    mesh: Any,
    *,
    param_dtype: str | None = None,
    reduce_dtype: str | None = None,
    reshard_after_forward: bool = True,
    shard_vision_tower: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to a :class:`LlavaMoLE`, bottom-up: routers, decoder layers, vision tower, root.

    Args:
        model: the model (built, not yet on the mesh's device type necessarily).
        mesh: a device mesh; with a ``data_parallel`` dimension name, only that dimension is used.
        param_dtype: compute dtype of all-gathered parameters (``"bfloat16"``...); ``None``: keep each dtype.
        reduce_dtype: gradient reduce-scatter dtype; ``None``: the parameter dtype.
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3); ``False``: ZeRO-2.
        shard_vision_tower: make the vision tower its own unit.
        cpu_offload: keep sharded parameters and optimizer state on CPU.

    Returns:
        The model, sharded in place.

    Raises:
        ValueError: the model has a 4-bit (bitsandbytes) base.
    """
    if is_quantized(model):
        raise ValueError(QUANTIZED_SHARDING_ERROR)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    kwargs: dict[str, Any] = {"mesh": dp_mesh}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=PRECISION_DTYPES[param_dtype] if param_dtype else None,
            reduce_dtype=PRECISION_DTYPES[reduce_dtype] if reduce_dtype else None,
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for module in model.modules():
        if isinstance(module, MoLERouter):
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    for layer in _decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    vision = getattr(model, "vision_tower", None)
    if shard_vision_tower and vision is not None and any(True for _ in vision.parameters()):
        fully_shard(vision, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root is needed again right after forward
    return model


class MoLEModelParallelStrategy(ModelParallelStrategy):
    """FSDP2 for LLaVA-MoLE: data parallel over all processes, trainable-only full-tensor checkpoints.

    The module's ``configure_model`` builds the model and calls :func:`fully_shard_llava_mole` with
    :meth:`fsdp2_options`. Checkpoints are single files written by rank 0 (through the trainer's ``CheckpointIO``,
    atomically with :class:`~mole_lightning.training.callbacks.AtomicCheckpointIO`) that hold the full trainable
    tensors, gathered from their shards; frozen weights are never gathered.

    Args:
        data_parallel_size: Data-parallel (sharding) degree; ``"auto"``: every process.
        tensor_parallel_size: Tensor-parallel degree; ``"auto"``: 1 (MoLE layers are not tensor-parallel).
        process_group_backend: ``"nccl"``, ``"gloo"`` (CPU) ...; ``None``: chosen from the device.
        param_dtype: FSDP2 compute dtype of gathered parameters (``"bfloat16"``); ``None``: keep dtypes.
        reduce_dtype: FSDP2 gradient reduce dtype (``"float32"`` is the safe choice with bf16 params).
        reshard_after_forward: ZeRO-3 (``True``) or ZeRO-2 (``False``) for decoder layers.
        shard_vision_tower: make the vision tower an FSDP unit.
        cpu_offload: offload sharded parameters and optimizer state to CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        process_group_backend: str | None = None,
        param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        reduce_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        reshard_after_forward: bool = True,
        shard_vision_tower: bool = True,
        cpu_offload: bool = False,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._fsdp2_options = {
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "reshard_after_forward": reshard_after_forward,
            "shard_vision_tower": shard_vision_tower,
            "cpu_offload": cpu_offload,
        }

    def fsdp2_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fully_shard_llava_mole`."""
        return dict(self._fsdp2_options)

    def setup_environment(self) -> None:
        """Resolve ``"auto"`` sizes as pure data parallelism (all processes of all nodes), then set up the mesh."""
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def reshard(self) -> None:
        """Free the gathered parameters of every FSDP2 unit, the root's included.

        FSDP2 keeps the root unit gathered after its forward (its parameters are needed again by the backward). A
        forward without backward (validation, test, generation in a callback) leaves the root's unsharded tensors
        registered as the module's parameters, so the optimizer's sharded parameters no longer match the module's
        when the optimizer state is gathered for a checkpoint (``KeyError`` in ``get_optimizer_state_dict``).
        Called after every evaluation loop and before every checkpoint gather.
        """
        module = self.lightning_module
        if module is None:
            return
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()

    def on_validation_end(self) -> None:
        """Reshard the root after the forward-only validation loop."""
        super().on_validation_end()
        self.reshard()

    def on_test_end(self) -> None:
        """Reshard the root after the forward-only test loop."""
        super().on_test_end()
        self.reshard()

    def on_predict_end(self) -> None:
        """Reshard the root after prediction."""
        super().on_predict_end()
        self.reshard()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state (Lightning's gather), taken with every unit resharded (see :meth:`reshard`)."""
        self.reshard()
        return super().optimizer_state(optimizer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full tensors of the trainable parameters only (every rank takes part in the gathers)."""
        self.reshard()
        module = self.lightning_module
        assert module is not None
        state: dict[str, Any] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state[name] = tensor.cpu()
        return state if self.global_rank == 0 else {}


def _class_name_policy(class_names: Iterable[str]) -> Any:
    names = frozenset(class_names)
    return CustomPolicy(lambda module: type(module).__name__ in names)


class MoLEFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1) with wrapping and activation checkpointing chosen by class names (YAML-friendly).

    Frozen and trainable parameters share units (``use_orig_params=True``); routers are their own units and are left
    out of FSDP's mixed precision, so their parameters stay fp32 under ``bf16-mixed``.
    The full state dict is gathered on rank 0 and reduced to trainable tensors by the module.

    Args:
        wrap_class_names: Module class names that become FSDP units (default: common decoder layers + router).
        checkpoint_class_names: Module class names recomputed in backward (``None``: no activation checkpointing;
            usually the decoder layer class).
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"HYBRID_SHARD"``, ``"NO_SHARD"``.
        state_dict_type: ``"full"`` (single file on rank 0) or ``"sharded"``.
        cpu_offload: offload parameters to CPU.
        **kwargs: other ``FSDPStrategy`` / FSDP arguments (``limit_all_gathers``, ``device_mesh``...).
    """

    def __init__(
        self,
        wrap_class_names: list[str] | None = None,
        checkpoint_class_names: list[str] | None = None,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("use_orig_params", True)
        wrap = list(wrap_class_names) if wrap_class_names is not None else list(DEFAULT_WRAP_CLASS_NAMES)
        if "MoLERouter" not in wrap:
            wrap.append("MoLERouter")
        checkpointing = _class_name_policy(checkpoint_class_names) if checkpoint_class_names else None
        super().__init__(
            auto_wrap_policy=_class_name_policy(wrap),
            activation_checkpointing_policy=checkpointing,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            **kwargs,
        )
        self.wrap_class_names = wrap
        self.checkpoint_class_names = list(checkpoint_class_names or [])

    @property
    def mixed_precision_config(self) -> Any:
        """The precision plugin's FSDP ``MixedPrecision`` with routers excluded: they keep fp32 parameters."""
        config = super().mixed_precision_config
        if config is None:
            return None
        ignored = tuple(config._module_classes_to_ignore)
        if MoLERouter not in ignored:
            config = dataclasses.replace(config, _module_classes_to_ignore=(*ignored, MoLERouter))
        return config


def default_strategy(num_devices: int, accelerator: str = "auto") -> str | Any:
    """``"auto"`` for one device; FSDP2 (:class:`MoLEModelParallelStrategy`, gloo on CPU) for several."""
    if num_devices <= 1:
        return "auto"
    return MoLEModelParallelStrategy(process_group_backend="gloo" if accelerator == "cpu" else None)


__all__ = [
    "DEFAULT_WRAP_CLASS_NAMES",
    "MoLEFSDPStrategy",
    "MoLEModelParallelStrategy",
    "default_strategy",
    "fully_shard_llava_mole",
]
