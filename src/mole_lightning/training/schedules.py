"""Learning-rate schedules for instruction tuning: linear warmup then cosine decay (LLaVA-1.5: 3 % warmup).

The schedule keeps each parameter group's own base lr (the projector's lower lr stays lower throughout). The total
number of optimizer steps is usually unknown when YAML is parsed: the Lightning module calls
:meth:`WarmupCosineLR.set_total_steps` with ``trainer.estimated_stepping_batches``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """lr(step) = base_lr * f(step), f rising linearly to 1 over the warmup, then cosine down to ``min_lr_ratio``.

    Args:
        optimizer: Wrapped optimizer.
        warmup_ratio: Warmup length as a fraction of the total steps (used when ``warmup_steps`` is ``None``).
        warmup_steps: Warmup length in optimizer steps.
        total_steps: Total optimizer steps; ``None`` until :meth:`set_total_steps` is called (constant after warmup).
        min_lr_ratio: Final lr as a fraction of the base lr.
        last_epoch: Index of the last step (``-1``: start).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_ratio: float = 0.0,
        warmup_steps: int | None = None,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Set the total number of optimizer steps (the cosine reaches ``min_lr_ratio`` there) and refresh lrs."""
        if self.total_steps is None:
            self.total_steps = int(total_steps)
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def resolved_warmup_steps(self) -> int:
        """Warmup length in steps."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return int(math.ceil(self.warmup_ratio * self.total_steps)) if self.total_steps else 0

    def factor(self, step: int) -> float:
        """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
        warmup = self.resolved_warmup_steps()
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not self.total_steps:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        """Learning rates of every group at the current step."""
        factor = self.factor(max(0, self.last_epoch))
        return [base_lr * factor for base_lr in self.base_lrs]
