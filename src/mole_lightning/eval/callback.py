"""``GenerationEvalCallback``: greedy-decoding benchmark evaluation per source during fit, validate and test.

Every ``every_n_steps`` optimizer steps, at the end of training, and in ``trainer.validate`` / ``trainer.test``, the
callback takes at most ``max_samples_per_source`` samples of each validation source from
``trainer.datamodule.generation_dataloaders()`` (prompt-only, left-padded batches with ``answers`` and ``task``),
generates answers greedily with ``pl_module.model.generate`` and scores them with
:class:`~mole_lightning.eval.tasks.SourceTaskMetrics` (synchronized across ranks). It logs, under ``prefix``:

* scalars ``<prefix>/<source>/<task>/<metric>``, ``<prefix>/<source>/score``, ``<prefix>/overall/...`` and
  ``<prefix>/best/<monitor>``; they are also put into ``trainer.callback_metrics`` so a ``ModelCheckpoint`` placed
  after this callback can monitor e.g. ``gen_eval/overall/score``;
* a Markdown text table of example generations per source (TensorBoard ``add_text``);
* with ``log_routing``, the routing of the prompt tokens: MI(source; expert) per layer and heatmaps
  (:mod:`mole_lightning.eval.routing_analysis`).

The best value of ``monitor`` and its step are kept (and saved with checkpoints).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from mole_lightning.eval.routing_analysis import RoutingAccumulator, RoutingCounts, log_routing_to_tensorboard
from mole_lightning.eval.tasks import SourceTaskMetrics, task_generation_kwargs, task_names, task_spec
from mole_lightning.generation import generate_answers, take_rows


def resolve_model(pl_module: pl.LightningModule) -> Any:
    """The object with ``generate``: ``pl_module.model`` if it has one, else the LightningModule itself."""
    model = getattr(pl_module, "model", None)
    if model is not None and hasattr(model, "generate"):
        return model
    if hasattr(pl_module, "generate"):
        return pl_module
    raise AttributeError(
        "GenerationEvalCallback needs `pl_module.model.generate` (a LlavaMoLE) or `pl_module.generate`"
    )


def _escape(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def examples_table(examples: list[dict[str, Any]]) -> str:
    """Markdown table of example generations: source, task, question, answers, prediction, score."""
    lines = ["| source | task | question | answers | prediction | score |", "|---|---|---|---|---|---|"]
    for ex in examples:
        answers = " / ".join(str(a) for a in ex["answers"])
        lines.append(
            f"| {_escape(ex['source'])} | {ex['task'] or '-'} | {_escape(ex['question'])} | {_escape(answers)} | "
            f"{_escape(ex['prediction'])} | {ex['score']:.2f} |"
        )
    return "\n".join(lines)


def metric_table(results: dict[str, float], sources: list[str] | None = None) -> str:
    """Plain-text table of per-source results: samples, score and each task's primary metric (``-``: no sample).

    Args:
        results: Output of :meth:`SourceTaskMetrics.compute` (without prefix).
        sources: Row order (default: every source found in ``results``); ``overall`` is appended.
    """
    if sources is None:
        sources = sorted({key.split("/")[0] for key in results if key.endswith("/score")} - {"overall"})
    tasks = [t for t in task_names() if any(key.endswith(f"/{t}/count") for key in results)]
    header = ["source", "samples", "score", *[f"{t}:{task_spec(t).primary}" for t in tasks]]
    rows = []
    for source in [*sources, "overall"]:
        count = results.get(f"{source}/count")
        score = results.get(f"{source}/score")
        row = [source, "-" if count is None else str(int(count)), "-" if score is None else f"{score:.3f}"]
        for task in tasks:
            value = results.get(f"{source}/{task}/{task_spec(task).primary}")
            row.append("-" if value is None else f"{value:.3f}")
        rows.append(row)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in rows)])


class GenerationEvalCallback(Callback):
    """Generates answers for a bounded number of validation samples per source and logs benchmark metrics.

    Needs a DataModule with ``generation_dataloaders()`` (``{source: loader}``, e.g.
    :class:`~mole_lightning.data.MixedInstructionDataModule`) and a LightningModule with a ``model`` attribute whose
    ``generate(pixel_values, input_ids, attention_mask, has_image=..., **kwargs)`` returns prompt + new ids and whose
    ``tokenizer`` decodes them (the DataModule's tokenizer is used otherwise).

    Args:
        every_n_steps: Evaluate every this many optimizer steps during fit (0 or ``None``: only at the end).
        max_samples_per_source: Samples generated per source and evaluation, over all ranks.
        max_new_tokens: Maximum generated tokens per answer.
        num_examples: Example generations per source in the logged text table.
        monitor: Metric (without prefix) whose best value is tracked, e.g. ``overall/score`` or
            ``med/yesno/f1``.
        mode: ``"max"`` or ``"min"``.
        prefix: Prefix of every logged name.
        at_train_end: Evaluate once more when training ends (skipped if the last step was just evaluated).
        on_validate: Evaluate at the end of ``trainer.validate``.
        on_test: Evaluate at the end of ``trainer.test`` (on the DataModule's generation loaders).
        log_routing: Count the routing of the prompt tokens and log MI(source; expert) per layer and heatmaps.
        routing_figures: Add routing heatmap figures to TensorBoard (with ``log_routing``).
        print_table: Print the per-source metric table on rank 0 after each evaluation.
        table_path: Also write the latest per-source metric table (with its step) to this text file on rank 0.
        generation_kwargs: Extra ``generate`` options (e.g. ``{"repetition_penalty": 1.0}``); greedy by default. A
            batch whose task has a decoding protocol (``TaskSpec.generation``, e.g. ``lvlm_ehub``) uses the task's
            options, ``max_new_tokens`` included, over these.
        sync_generation: Make every rank run the same number of ``generate`` calls (ranks short of samples repeat
            a batch whose answers are discarded) with ``synced_gpus=True``, as sharded models (FSDP2) need.
            ``None``: on when the model's parameters are sharded (DTensors) in a multi-process run.
        vqa_leave_one_out: Score short answers with the official VQAv2 leave-one-out average (for sources with
            the 10 annotator answers per question, e.g. converted VQAv2 val).
    """

    def __init__(
        self,
        every_n_steps: int | None = 500,
        max_samples_per_source: int = 64,
        max_new_tokens: int = 32,
        num_examples: int = 3,
        monitor: str = "overall/score",
        mode: str = "max",
        prefix: str = "gen_eval",
        at_train_end: bool = True,
        on_validate: bool = True,
        on_test: bool = True,
        log_routing: bool = True,
        routing_figures: bool = True,
        print_table: bool = False,
        table_path: str | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        sync_generation: bool | None = None,
        vqa_leave_one_out: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if max_samples_per_source < 1:
            raise ValueError("max_samples_per_source must be >= 1")
        self.every_n_steps = every_n_steps or 0
        self.max_samples_per_source = max_samples_per_source
        self.max_new_tokens = max_new_tokens
        self.num_examples = num_examples
        self.monitor = monitor
        self.mode = mode
        self.prefix = prefix
        self.at_train_end = at_train_end
        self.on_validate = on_validate
        self.on_test = on_test
        self.log_routing = log_routing
        self.routing_figures = routing_figures
        self.print_table = print_table
        self.table_path = table_path
        self.generation_kwargs = dict(generation_kwargs or {})
        self.sync_generation = sync_generation
        self.vqa_leave_one_out = vqa_leave_one_out
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.last_results: dict[str, float] = {}
        self.last_examples: list[dict[str, Any]] = []
        self.last_routing: RoutingCounts | None = None
        self.last_table: str = ""
        self._last_step: int | None = None
        self._warned = False

    # ---------------------------------------------------------------------------------------------------- hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._evaluate_and_log(trainer, pl_module, use_module_log=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._evaluate_and_log(trainer, pl_module, use_module_log=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_validate and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self._evaluate_and_log(trainer, pl_module, use_module_log=True)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            self._evaluate_and_log(trainer, pl_module, use_module_log=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")
        self._last_step = state_dict.get("last_step")

    # ---------------------------------------------------------------------------------------------------- work
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Runs one evaluation and returns the metrics without prefix (empty without generation loaders).

        Also fills :attr:`last_examples` (this rank's first ``num_examples`` per source) and :attr:`last_routing`.
        """
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "generation_dataloaders"):
            if not self._warned:
                warnings.warn(
                    "GenerationEvalCallback: the DataModule has no generation_dataloaders(); skipping", stacklevel=2
                )
                self._warned = True
            return {}
        loaders = datamodule.generation_dataloaders()
        if not loaders:
            return {}
        model = resolve_model(pl_module)
        tokenizer = getattr(model, "tokenizer", None) or datamodule.tokenizer
        sources = list(loaders)
        device = pl_module.device
        per_rank = math.ceil(self.max_samples_per_source / max(1, trainer.world_size))
        metrics = SourceTaskMetrics(sources=sources, vqa_leave_one_out=self.vqa_leave_one_out).to(device)
        accumulator = None
        if self.log_routing:
            try:
                accumulator = RoutingAccumulator(model, sources)
            except ValueError:
                accumulator = None
        image_token_id = getattr(model, "image_token_id", None)
        lockstep = self._lockstep(trainer, model)
        generation_kwargs = dict(self.generation_kwargs)
        if lockstep:
            generation_kwargs.setdefault("synced_gpus", True)
        fallback: dict[str, Any] | None = None
        modes = {module: module.training for module in model.modules()}
        model.eval()
        examples: list[dict[str, Any]] = []
        try:
            with accumulator if accumulator is not None else _null():
                for source, loader in loaders.items():
                    batches = _first_samples(loader, per_rank)
                    if fallback is None and batches:
                        fallback = batches[0]
                    steps = len(batches)
                    if lockstep:  # every rank must make the same number of generate calls
                        steps = _max_over_ranks(steps, device)
                    for index in range(steps):
                        real = index < len(batches)
                        batch = batches[index] if real else (fallback or _minimal_batch(tokenizer))
                        batch = _to_device(batch, device)
                        if accumulator is not None:
                            if real:
                                mask = batch["input_ids"] == image_token_id if image_token_id is not None else None
                                accumulator.set_batch(source, mask)
                            else:
                                accumulator.pause()
                        # the task's decoding protocol (TaskSpec.generation) over the callback's options
                        kwargs = {**generation_kwargs, **task_generation_kwargs(batch.get("task") or ())}
                        max_new_tokens = kwargs.pop("max_new_tokens", self.max_new_tokens)
                        with trainer.precision_plugin.predict_step_context():
                            predictions = generate_answers(model, batch, tokenizer, max_new_tokens, **kwargs)
                        if not real:  # a filler call that keeps the ranks in step; nothing is scored
                            continue
                        tasks = list(batch.get("task") or [None] * len(predictions))
                        options = batch.get("options")
                        scores = metrics.update(
                            [source] * len(predictions), tasks, predictions, batch["answers"], options
                        )
                        for i in range(len(predictions)):
                            if sum(ex["source"] == source for ex in examples) >= self.num_examples:
                                break
                            examples.append(
                                {
                                    "source": source,
                                    "id": batch["id"][i] if "id" in batch else "",
                                    "task": tasks[i],
                                    "question": batch.get("question", [""] * len(predictions))[i],
                                    "answers": list(batch["answers"][i]),
                                    "prediction": predictions[i],
                                    "score": scores[i],
                                }
                            )
        finally:
            for module, training in modes.items():
                module.training = training
        results = metrics.compute()
        self.last_examples = examples
        self.last_routing = accumulator.result().all_reduce() if accumulator is not None else None
        return results

    def _lockstep(self, trainer: pl.Trainer, model: Any) -> bool:
        """Whether ranks must generate in lockstep: ``sync_generation``, or (``None``) a sharded model (DTensor
        parameters, as under FSDP2) in a multi-process run."""
        if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        if self.sync_generation is not None:
            return bool(self.sync_generation)
        return any(hasattr(p, "device_mesh") for p in model.parameters())

    def _evaluate_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, use_module_log: bool) -> None:
        step = trainer.global_step
        results = self.evaluate(trainer, pl_module)
        self._last_step = step
        if not results:
            return
        self.last_results = results
        value = results.get(self.monitor)
        if value is not None and value == value:
            better = self.best_score is None or (
                value > self.best_score if self.mode == "max" else value < self.best_score
            )
            if better:
                self.best_score, self.best_step = float(value), step
        logged = {f"{self.prefix}/{key}": float(val) for key, val in results.items()}
        if self.best_score is not None:
            logged[f"{self.prefix}/best/{self.monitor}"] = self.best_score
        for key, val in logged.items():
            trainer.callback_metrics[key] = torch.tensor(val)
        if use_module_log:
            pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=False, batch_size=1)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
        self.last_table = metric_table(results, [s for s in self._sources(results)])
        if trainer.is_global_zero:
            experiment = _tensorboard(trainer)
            if experiment is not None:
                experiment.add_text(f"{self.prefix}/examples", examples_table(self.last_examples), step)
                experiment.add_text(f"{self.prefix}/metrics", "```\n" + self.last_table + "\n```", step)
                if self.last_routing is not None:
                    log_routing_to_tensorboard(
                        experiment, self.last_routing, step, f"{self.prefix}/routing", figures=self.routing_figures
                    )
            if self.print_table:
                rank_zero_info(f"[{self.prefix}] step {step}\n{self.last_table}")
            if self.table_path:
                path = Path(self.table_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".partial")
                partial.write_text(
                    f"generation eval at step {step} ({self.monitor} best: {self.best_score})\n{self.last_table}\n"
                )
                os.replace(partial, path)

    @staticmethod
    def _sources(results: dict[str, float]) -> list[str]:
        seen: list[str] = []
        for key in results:
            name = key.split("/")[0]
            if name != "overall" and key.endswith("/score") and name not in seen:
                seen.append(name)
        return seen


def _first_samples(loader: Any, count: int) -> list[dict[str, Any]]:
    """The batches holding the first ``count`` samples of ``loader`` (the last one cut to size)."""
    batches, seen = [], 0
    for batch in loader:
        if seen >= count:
            break
        batch = take_rows(batch, count - seen)
        seen += len(batch["input_ids"])
        batches.append(batch)
    return batches


def _max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (collective)."""
    backend = torch.distributed.get_backend()
    tensor = torch.tensor([value], dtype=torch.long, device=device if backend == "nccl" else "cpu")
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def _minimal_batch(tokenizer: Any) -> dict[str, Any]:
    """A one-token text-only prompt, for a rank that has no sample at all but must join a lockstep generate."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[token if token is not None else 0]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None, "has_image": None}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _tensorboard(trainer: pl.Trainer) -> Any:
    """The ``SummaryWriter`` of the first TensorBoard logger, or ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
