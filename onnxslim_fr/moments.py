"""Running first and second moments of features, the statistics every calibrated decision
reads (channels at a read point, a head group's features): memory O(C²), not O(samples)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Count, sums and Gram matrix of observations (rows) of some features, in float64."""

    count: int
    total: np.ndarray
    gram: np.ndarray

    @classmethod
    def empty(cls, features: int) -> Moments:
        return cls(0, np.zeros(features), np.zeros((features, features)))

    @classmethod
    def pooled(cls, parts: Sequence[Moments]) -> Moments:
        """The moments of all the parts' observations together."""
        return cls(sum(p.count for p in parts), sum(p.total for p in parts),
                   sum(p.gram for p in parts))

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def cov(self) -> np.ndarray:
        m = self.mean
        return self.gram / max(self.count, 1) - np.outer(m, m)
