"""Skipping training steps whose loss is NaN/inf, and stopping when they keep coming."""

from __future__ import annotations


class NonFiniteSteps:
    """Counts non-finite losses (in a row and in total) and stops the run after too many in a row.

    Args:
        max_in_a_row: Consecutive non-finite losses tolerated (each one skips its step).
    """

    def __init__(self, max_in_a_row: int = 5) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def observe(self, finite: bool, where: str) -> bool:
        """Record one step's loss; returns whether the step may proceed.

        Raises:
            RuntimeError: the ``max_in_a_row``-th non-finite loss in a row (the message names ``where``).
        """
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(
                f"the training loss was NaN/inf for {self.in_a_row} steps in a row ({where}; {self.total} non-finite "
                "steps in total); stopping. Lower the learning rate, use bf16 instead of fp16, or check the data."
            )
        return False
