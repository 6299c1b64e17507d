"""Paired comparisons with intervals: every comparison of two models or modes is made on the SAME
targets, and its mean difference carries a 95 % paired bootstrap interval (percentile method, fixed
seed). A difference whose interval contains zero is reported as no difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESOLUTION = 5e-5  # reports print 4 decimals


@dataclass(frozen=True)
class Paired:
    mean: float  # mean of (a − b) over the paired targets
    lo: float  # 95 % bootstrap interval
    hi: float
    n: int

    @property
    def verdict(self) -> str:
        """`higher` / `lower` when the interval clears zero and the mean difference reaches RESOLUTION
        (half the last printed digit: a difference that prints as +0.0000 is no difference), else
        `no difference`."""
        if self.n == 0:
            return "no pairs"
        if abs(self.mean) < RESOLUTION:
            return "no difference"
        return "higher" if self.lo > 0 else "lower" if self.hi < 0 else "no difference"

    def as_dict(self) -> dict:
        return {"diff": round(self.mean, 4), "lo": round(self.lo, 4), "hi": round(self.hi, 4), "n": self.n}

    def text(self, digits: int = 4) -> str:
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def paired_bootstrap(a, b, *, seed: int = 0, resamples: int = 2000, level: float = 0.95) -> Paired:
    """Mean of a − b with a percentile bootstrap interval over targets; NaN pairs are dropped."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same targets: {a.shape} vs {b.shape}")
    d = a - b
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return Paired(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Paired(float(d.mean()), float(lo), float(hi), int(len(d)))
