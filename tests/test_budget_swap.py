"""Swaps after rounded allocation: one group a step up, another a step down, made only when
the predicted error clearly drops.

The curves a swap compares are predictions scaled to one or two probe measurements. On
digits_cnn at half the FLOPs a swap predicted 9% less error (group 3: 16 -> 8 channels,
group 7: 16 -> 24) and cost 0.8 points of accuracy after refit: a trade whose gain is
smaller than the curves' own uncertainty must not be made.
"""

from __future__ import annotations

import numpy as np

from onnxslim_fr.lumping import budget
from onnxslim_fr.lumping.budget import SWAP_FACTOR, allowed_counts


class _LinearCost:
    """Cost = kept channels (the allocator's CostModel interface)."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes, self.units = sizes, {}

    def total(self, kept: dict[int, int] | None = None) -> float:
        return float(sum((kept or {}).get(g, s) for g, s in self.sizes.items()))


def _curve(points: dict[int, float], size: int = 32) -> np.ndarray:
    """error(k) through the given points (k = 8, 16, 24), 0 at full size, linear between."""
    ks = [0, *sorted(points), size]
    return np.interp(np.arange(size + 1), ks, [1.0, *(points[k] for k in sorted(points)), 0.0])


def _swapped(down_adds: float, up_removes: float) -> dict[int, int]:
    """Both groups at 16 of 32 channels within a budget of 32: group 0 a step down adds
    `down_adds`, group 1 a step up removes `up_removes`; the swap's result."""
    curves = {0: _curve({8: 0.035 + down_adds, 16: 0.035, 24: 0.01}),
              1: _curve({8: 0.3, 16: 0.111, 24: 0.111 - up_removes})}
    cost = _LinearCost({0: 32, 1: 32})
    counts = {g: allowed_counts(32, 8) for g in curves}
    return budget._swap({0: 16, 1: 16}, curves, cost, 32.0, counts)


def test_a_swap_predicted_slightly_better_is_not_made():
    """digits_cnn's numbers: 16 -> 8 adds 0.069, 16 -> 24 removes 0.088 (9% of the total
    predicted error): within the curves' uncertainty, so the allocation stays."""
    assert _swapped(down_adds=0.069, up_removes=0.088) == {0: 16, 1: 16}


def test_a_swap_that_wins_back_clearly_more_than_it_costs_is_made():
    adds = 0.03
    assert _swapped(down_adds=adds, up_removes=adds * SWAP_FACTOR * 1.1) == {0: 8, 1: 24}


def test_channels_that_explain_nothing_are_traded_for_ones_that_do():
    """A step down that adds no error at all is always worth a step up that removes some."""
    assert _swapped(down_adds=0.0, up_removes=0.01) == {0: 8, 1: 24}
