"""`round_to`: kept channel counts are multiples of N, chosen inside the global allocation
so the budget is met with rounded counts; round_to=1 is the allocation as it was."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from builders import Net, cnn_input

from onnxslim_fr import slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.lumping import budget
from onnxslim_fr.lumping.budget import CostModel, allocate, allowed_counts, uniform

WIDTHS = (40, 64, 48, 64, 56)
WIDE = (64, 128, 96, 128, 112)  # a step of 8 channels is a small share of the cost


def _cnn(widths=WIDTHS, seed: int = 5):
    """x [N, 3, 8, 8] ─ conv 40 ─ conv 64 ─ conv 48 ─ conv 64 ─ conv 56 ─ GAP ─ gemm 10
    (ReLU after each conv, `widths` the conv outputs): five groups rounding can move."""
    b = Net(cnn_input(c=3), seed=seed)
    h = b.relu(b.conv(b.x, widths[0]))
    for w in widths[1:]:
        h = b.relu(b.conv(h, w))
    return b.build(b.gemm(b.flatten(b.gap(h)), 10))


def _cost() -> CostModel:
    model = normalize(_cnn(WIDE))
    graph = Graph(model)
    return CostModel(graph, build_groups(graph), "flops",
                     {"x": np.zeros((1, 3, 8, 8), np.float32)})


def _curves(cost: CostModel, seed: int) -> dict[int, np.ndarray]:
    """Decreasing error curves: error(k) = the gains of the channels not kept."""
    rng = np.random.default_rng(seed)
    curves = {}
    for g, size in cost.sizes.items():
        if size == 10:  # the classifier output: frozen in a real run
            continue
        gains = np.sort(rng.exponential(size=size))[::-1]
        curves[g] = np.append(gains[::-1].cumsum()[::-1], 0.0)
    return curves


@pytest.mark.parametrize(("size", "n", "expected"), [
    (64, 8, list(range(8, 65, 8))),
    (61, 8, [8, 16, 24, 32, 40, 48, 56, 61]),  # or the full size
    (12, 8, [8, 12]),
    (8, 8, [4, 8]),  # at most N channels: the largest smaller power of two held twice
    (6, 8, [2, 4, 6]),
    (3, 8, [1, 2, 3]),
    (5, 1, [1, 2, 3, 4, 5]),
])
def test_allowed_counts_are_multiples_of_n_or_the_full_size_never_zero(size, n, expected):
    assert allowed_counts(size, n).tolist() == expected


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.85])
def test_allocation_meets_the_budget_with_counts_that_are_multiples_of_8(fraction):
    cost = _cost()
    curves = _curves(cost, seed=1)
    limit = fraction * cost.total()
    kept = allocate(curves, cost, limit, round_to=8)
    assert all(k % 8 == 0 or k == cost.sizes[g] for g, k in kept.items())
    assert 0.98 * limit <= cost.total(kept) <= limit


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_magnitude_allocation_rounds_too(fraction):
    cost = _cost()
    groups = [g for g, size in cost.sizes.items() if size != 10]
    limit = fraction * cost.total()
    kept = uniform(cost, groups, limit, round_to=8)
    assert all(k % 8 == 0 for k in kept.values())
    assert 0.95 * limit <= cost.total(kept) <= limit


def _allocate_before_rounding(curves, cost, limit):
    """The allocation as it was before round_to: price bisection over every count, then
    one channel at a time given back by error removed per cost while the budget allows."""
    unit = {g: budget._unit_cost(cost, g) for g in curves}

    def choose(price):
        return {g: int(np.argmin(c[1:] + price * unit[g] * np.arange(1, len(c)))) + 1
                for g, c in curves.items()}

    hi = 1.0
    while cost.total(choose(hi)) > limit and hi < 1e12:
        hi *= 4
    kept = choose(budget._boundary(0.0, hi, lambda p: cost.total(choose(p)) <= limit, 60))
    heap = [(-max(curves[g][k] - curves[g][k + 1], 0.0) / unit[g], g, k)
            for g, k in kept.items() if k + 1 < len(curves[g])]
    heapq.heapify(heap)
    best, steps = dict(kept), dict(kept)
    while heap:
        _, g, k = heapq.heappop(heap)
        steps[g] = k + 1
        if cost.total(steps) > limit:
            break
        best = dict(steps)
        if k + 2 < len(curves[g]):
            c = curves[g]
            heapq.heappush(heap, (-max(c[k + 1] - c[k + 2], 0.0) / unit[g], g, k + 1))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_to_1_is_the_allocation_before_rounding(seed):
    cost = _cost()
    curves = _curves(cost, seed)
    for fraction in (0.3, 0.55, 0.8):
        limit = fraction * cost.total()
        assert allocate(curves, cost, limit, round_to=1) == \
            _allocate_before_rounding(curves, cost, limit)
        groups = list(curves)
        frac = budget._boundary(1.0, 0.0, lambda f, groups=groups, limit=limit: cost.total(
            {g: max(1, round(f * cost.sizes[g])) for g in groups}) <= limit, 40)
        assert uniform(cost, groups, limit, round_to=1) == \
            {g: max(1, round(frac * cost.sizes[g])) for g in groups}


def test_calibrated_slimming_keeps_multiples_of_8_and_meets_the_budget():
    data = {"x": np.random.default_rng(0).standard_normal((96, 3, 8, 8)).astype(np.float32)}
    rep = slim(_cnn(), data=data, ratio=0.5, latency_runs=0).report  # the default: 8
    kept = {g["size"]: g["kept"] for g in rep.groups if not g["frozen"]}
    assert any(k < size for size, k in kept.items())
    assert all(k % 8 == 0 for k in kept.values())
    assert 0.98 * 0.5 <= rep.after.flops / rep.before.flops <= 0.5


def test_a_ratio_overshot_by_coarse_steps_says_so():
    """One slimmable group of 16 channels: with steps of 8, removing 10% of the FLOPs
    means removing half the group. The report says why the cut is larger than asked."""
    data = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    rep = slim(_cnn((16,)), data=data, ratio=0.1, latency_runs=0).report
    assert rep.after.flops / rep.before.flops < 0.85
    assert any("more than the 0.1 asked" in n and "--round-to 1" in n for n in rep.notes)
    exact = slim(_cnn((16,)), data=data, ratio=0.1, round_to=1, latency_runs=0).report
    assert not any("more than" in n for n in exact.notes)


@pytest.mark.parametrize("seed", [4, 6, 9])
def test_no_pair_of_rounded_steps_would_lower_the_error_within_the_budget(seed):
    """With steps of 8 channels, giving back single steps stops where none fits; trading a
    step of one group for a step of another can still lower the error (and fill more of
    the budget). No such pair is left that would lower the error clearly (by more than
    the curves' uncertainty: budget.SWAP_FACTOR, tests/test_budget_swap.py)."""
    cost = _cost()
    curves = _curves(cost, seed)
    for fraction in (0.3, 0.45, 0.6):
        limit = fraction * cost.total()
        kept = allocate(curves, cost, limit, round_to=8)
        error = sum(curves[g][k] for g, k in kept.items())
        for g, h in ((g, h) for g in kept for h in kept if g != h):
            up = allowed_counts(cost.sizes[g], 8)
            down = allowed_counts(cost.sizes[h], 8)
            if kept[g] == up[-1] or kept[h] == down[0]:
                continue
            trial = {**kept, g: int(up[up > kept[g]][0]), h: int(down[down < kept[h]][-1])}
            if cost.total(trial) <= limit:  # a swap wins back SWAP_FACTOR x what it adds
                removes = curves[g][kept[g]] - curves[g][trial[g]]
                adds = curves[h][trial[h]] - curves[h][kept[h]]
                assert removes <= budget.SWAP_FACTOR * adds + 1e-12 or \
                    sum(curves[x][k] for x, k in trial.items()) >= error - 1e-12
