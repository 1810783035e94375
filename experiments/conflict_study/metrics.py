"""Statistics of the data-conflict study: the plug-in bias of routing mutual information, seed summaries,
steps-to-threshold.

Mutual information and entropy are the library's (`mole_lightning.eval.routing_analysis.mutual_information`,
`mole_lightning.eval.routing_analysis.entropy`): the plug-in estimate in bits from a contingency table of counts::

    I(X; E) = sum_{x,e} p(x,e) log2( p(x,e) / (p(x) p(e)) ),      p = counts / total

It is 0 when X and E are independent and H(X) when E determines X (experts "specialise" by X). The plug-in
estimate is biased upwards by about (|X|-1)(|E|-1) / (2 N ln 2) bits for N samples; `mutual_information_bias`
gives that term so that a small MI over many token types is not over-read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mutual_information_bias(counts: np.ndarray) -> float:
    """First-order upward bias of the plug-in MI (bits) under independence: (|X|-1)(|E|-1) / (2 N ln 2).

    Only rows and columns with non-zero totals count.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    rows = int((counts.sum(1) > 0).sum())
    cols = int((counts.sum(0) > 0).sum())
    return (rows - 1) * (cols - 1) / (2.0 * total * math.log(2.0))


def t_quantile(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd, min, max, n and the 95% t-interval half-width of ``values`` (NaNs dropped)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = arr.size
    if n == 0:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "ci": 0.0}
    sd = float(arr.std(ddof=1)) if n > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "sd": sd,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": n,
        "ci": t_quantile(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan"),
    }


def steps_to_threshold(x: Sequence[float], y: Sequence[float], threshold: float, *, below: bool = True) -> float:
    """First ``x`` at which ``y`` reaches ``threshold`` (``y <= threshold`` if ``below`` else ``y >= threshold``).

    Returns:
        That x, or ``inf`` when the curve never reaches it.
    """
    for xi, yi in zip(x, y, strict=True):
        if (yi <= threshold) if below else (yi >= threshold):
            return float(xi)
    return math.inf
