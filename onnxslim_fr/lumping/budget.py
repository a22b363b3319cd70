"""What keeping k channels of each group costs: MACs and parameters, or milliseconds.

Every Conv/Gemm/MatMul costs ``base * kept_in/in * kept_out/out``: the fraction of input
features it still reads times the fraction of output channels it still writes. That makes
the cost of any allocation cheap to evaluate, so budgets are met by search, not estimate.
The base costs are the handlers' (through `report.node_costs`, the figures the report
prints), counted at the input sizes of `feeds`: with a dynamic height counted as 1 the
convolutions would look free next to the MatMuls. With `target="latency"` a layer's cost
is its measured milliseconds at those fractions instead (`latency_table.layer_costs`): the
allocation then trades error per millisecond, not per MAC.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..channels.handlers import handler_for
from ..channels.structures import GroupSet, Role
from ..graph import Graph
from ..report import node_costs

# measured cost of one layer at (share of its input features, share of its outputs kept)
Measured = Callable[[float, float], float]


@dataclass
class _Term:
    base: float
    inputs: list[tuple[int, float]]  # (group, share of the input features it owns)
    fixed_in: float  # share of input features owned by no group
    outputs: list[tuple[int, float]]  # (group, share of the output channels it owns)
    measured: Measured | None = None

    def cost(self, frac_in: float, frac_out: float) -> float:
        if self.measured is not None:
            return self.measured(frac_in, frac_out)
        return self.base * frac_in * frac_out


class CostModel:
    """Cost of an allocation: MACs or parameters (exact counts), or with `measured` (node
    index -> milliseconds at a width, `latency_table.layer_costs`) milliseconds: the layers
    measured alone, the others charged their MACs at the measured layers' rate."""

    def __init__(self, graph: Graph, groups: GroupSet, target: str = "flops",
                 feeds: Mapping[str, np.ndarray] | None = None,
                 measured: Mapping[int, Measured] | None = None) -> None:
        self.sizes = {g.id: g.size for g in groups.groups.values()}
        self.units = {g.id: g.unit for g in groups.groups.values()}  # head_dim for heads
        self.terms: list[_Term] = []
        costs = node_costs(graph.model, feeds)
        measured = measured or {}
        rate = _ms_per_mac(costs, measured)
        for index, node in enumerate(graph.nodes):
            if index not in costs:
                continue
            macs, params = costs[index]
            roles = groups.roles.get(node.name, [])
            out = next((m for m in roles if m.role is Role.PRODUCER), None)
            carrier = next((m for m in roles if m.role is Role.CARRIER), None)
            data = next((n for n in node.input if n in groups.layouts), node.input[0])
            inputs, fixed = self._input_shares(groups, data)  # MatMul(W, x) reads input 1
            scaled = handler_for(node).input_share(node, graph)
            inputs, fixed = [(g, s * scaled) for g, s in inputs], 1.0 - scaled * (1.0 - fixed)
            # a producer's output may be pieces of several groups (Split after it)
            outputs = self._input_shares(groups, out.tensor)[0] if out else []
            if carrier is not None:  # depthwise: input and output are the same channels
                outputs = []
            base = float(params if target == "params" else macs)
            if target == "latency":
                base *= rate
            self.terms.append(_Term(base, inputs, fixed, outputs, measured.get(index)))

    @staticmethod
    def _input_shares(groups: GroupSet, tensor: str) -> tuple[list[tuple[int, float]], float]:
        lay = groups.layouts.get(tensor)
        if lay is None:
            return [], 1.0
        shares, fixed = [], 0.0
        for seg in lay.segments:
            share = seg.length * seg.stride / lay.unit
            if seg.group is None:
                fixed += share
            else:
                shares.append((seg.group, share))
        return shares, fixed

    def total(self, kept: Mapping[int, int] | None = None) -> float:
        kept = kept or {}
        total = 0.0
        for t in self.terms:
            frac_in = t.fixed_in + sum(share * kept.get(g, self.sizes[g]) / self.sizes[g]
                                       for g, share in t.inputs)
            frac_out = sum(share * kept.get(g, self.sizes[g]) / self.sizes[g]
                           for g, share in t.outputs) if t.outputs else 1.0
            total += t.cost(frac_in, frac_out)
        return total


def _ms_per_mac(costs: Mapping[int, tuple[int, int]], measured: Mapping[int, Measured]
                ) -> float:
    """Milliseconds per MAC of the layers measured at full width (1.0 with none: a cost
    in MACs, which only scales the prices)."""
    ms = sum(measured[i](1.0, 1.0) for i in measured if i in costs)
    macs = sum(costs[i][0] for i in measured if i in costs)
    return ms / macs if ms > 0 and macs > 0 else 1.0


# Multiples of 8 channels: on an AVX2 CPU a stack of 3x3 convs runs about 1.5x more MACs
# per millisecond at 48/56/64 channels than at the counts between (README, Speed); MatMul
# widths barely matter.
DEFAULT_ROUND_TO = 8


def allowed_counts(size: int, round_to: int = 1) -> np.ndarray:
    """The kept counts a group of `size` channels may take, ascending: the multiples of
    `round_to` and the full size; never 0.

    onnxruntime's blocked (NCHWc) convolutions run only when the channel count is a
    multiple of their block (8 with AVX2, 16 with AVX-512): on CPU 4 convs at 50 channels
    take 1.3x the time of 56 (README, Speed). A group of at most `round_to` channels
    steps by the largest smaller power of two it holds twice (8 -> 4, 6 -> 2, 3 -> 1), so
    small layers still shrink instead of being all-or-nothing."""
    step = round_to
    if size <= round_to:
        step = 1
        while 2 * step < round_to and 4 * step <= size:
            step *= 2
    return np.unique(np.append(np.arange(step, size + 1, step), size))


def _in_channels(cost: CostModel, group: int, round_to: int) -> int:
    """`round_to` features as channels of `group`: a head of 16 features already is a
    multiple of 8, so heads step one at a time."""
    return max(1, -(-round_to // cost.units.get(group, 1)))


def allocate(curves: Mapping[int, np.ndarray], cost: CostModel, budget: float,
             round_to: int = 1) -> dict[int, int]:
    """Kept channels per group minimising the summed error curves within `budget` cost.

    curves[g][k] is the error of keeping k channels (k = 0..C, curve[0] unused). A price λ
    on cost is bisected: each group keeps the k minimising ``error(k) + λ * k * unit_cost``
    among its allowed counts (`allowed_counts`: multiples of `round_to`), so the budget is
    met by rounded counts, not rounded after the fact.
    """
    unit = {g: _unit_cost(cost, g) for g in curves}
    counts = {g: allowed_counts(len(curve) - 1, _in_channels(cost, g, round_to))
              for g, curve in curves.items()}

    def choose(price: float) -> dict[int, int]:
        return {g: int(k[np.argmin(curves[g][k] + price * unit[g] * k)])
                for g, k in counts.items()}

    hi = 1.0
    while cost.total(choose(hi)) > budget and hi < 1e12:
        hi *= 4
    # a higher price removes more: find the lowest price that fits
    kept = choose(_boundary(0.0, hi, lambda p: cost.total(choose(p)) <= budget, 60))
    kept = _fill(kept, curves, cost, budget, unit, counts)
    return _swap(kept, curves, cost, budget, counts) if round_to > 1 else kept


def _fill(kept: dict[int, int], curves: Mapping[int, np.ndarray], cost: CostModel,
          budget: float, unit: Mapping[int, float],
          counts: Mapping[int, np.ndarray]) -> dict[int, int]:
    """Give back channels while the budget allows, best error reduction per cost first,
    each step to the group's next allowed count.

    Where error curves are flat (statistics of rank below the group size: few samples),
    any price above zero drops every channel that costs something and explains nothing,
    far below the budget; a user who asked to remove 30% must not lose 85%."""
    steps = _give_backs(kept, curves, unit, counts)

    def with_steps(n: int) -> dict[int, int]:
        out = dict(kept)
        for g, up in steps[:n]:  # a group's steps come in order: the last one wins
            out[g] = up
        return out

    lo, hi = 0, len(steps)  # the longest prefix of give-backs that still fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost.total(with_steps(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return _fill_coarse(with_steps(lo), steps[lo:], cost, budget)


def _give_backs(kept: Mapping[int, int], curves: Mapping[int, np.ndarray],
                unit: Mapping[int, float], counts: Mapping[int, np.ndarray]
                ) -> list[tuple[int, int]]:
    """Every give-back step (group, its next allowed count), best error drop per cost first."""
    heap: list[tuple[float, int, int, int]] = []

    def push(g: int, k: int) -> None:
        bigger = counts[g][counts[g] > k]
        if len(bigger):
            up = int(bigger[0])
            heapq.heappush(heap, (_gain(curves[g], k, up, unit[g]), g, k, up))

    for g, k in kept.items():
        push(g, k)
    steps: list[tuple[int, int]] = []
    while heap:
        _, g, _, up = heapq.heappop(heap)
        steps.append((g, up))
        push(g, up)
    return steps


def _fill_coarse(kept: dict[int, int], rest: list[tuple[int, int]], cost: CostModel,
                 budget: float) -> dict[int, int]:
    """After the prefix: the steps of several channels (round_to > 1) that still fit, in
    order, a group stopping at its first that does not. A step of N channels the prefix
    stopped at can leave N channels' worth of budget unused; one of a single channel
    cannot, so those are left as the prefix put them."""
    out, blocked = dict(kept), set()
    for g, up in rest:
        if g in blocked:
            continue
        if up - out[g] > 1 and cost.total({**out, g: up}) <= budget:
            out[g] = up
        else:
            blocked.add(g)
    return out


# A swap must win back this many times the error it takes on: the curves it compares are
# predictions scaled to one or two measurements, off by tens of percent between them (on
# digits_cnn a swap predicted 9% better, 16 -> 8 channels of one group for 16 -> 24 of
# another, refit to 0.8 points less accuracy).
SWAP_FACTOR = 1.5


def _swap(kept: dict[int, int], curves: Mapping[int, np.ndarray], cost: CostModel,
          budget: float, counts: Mapping[int, np.ndarray], rounds: int = 64
          ) -> dict[int, int]:
    """Pairs of moves, one group a step up and another a step down, that fit the budget
    and lower the summed error clearly (`_worth`; or, at equal error, use more of the
    budget). With steps of 8 channels the give-backs alone stop where no single step fits,
    often where trading a step of one group for a step of another would still lower the
    error. Each round takes the best pair that fits; pairs are tried best first and their
    cost is checked exactly (two groups meeting at one layer do not add up), at most 4 per
    group and round."""
    out = dict(kept)
    for _ in range(rounds):
        ups, downs = _steps(out, curves, cost, counts, 1), _steps(out, curves, cost, counts, -1)
        pairs = sorted((err_up + err_down, -(cost_up + cost_down), g, h)
                       for g, (_, err_up, cost_up) in ups.items()
                       for h, (_, err_down, cost_down) in downs.items()
                       if g != h and _worth(err_up, err_down, cost_up + cost_down))
        chosen = next((trial for *_, g, h in pairs[:4 * len(out)]
                       if cost.total(trial := {**out, g: ups[g][0], h: downs[h][0]}) <= budget),
                      None)
        if chosen is None:
            return out
        out = chosen
    return out


def _worth(err_up: float, err_down: float, cost: float) -> bool:
    """A pair of moves worth making: the step up removes SWAP_FACTOR times the error the
    step down adds, or neither changes the error and the pair uses more of the budget."""
    if err_up + err_down == 0.0:
        return cost > 0.0
    return -err_up > SWAP_FACTOR * max(err_down, 0.0)


def _steps(kept: Mapping[int, int], curves: Mapping[int, np.ndarray], cost: CostModel,
           counts: Mapping[int, np.ndarray], direction: int
           ) -> dict[int, tuple[int, float, float]]:
    """Each group's next allowed count up (direction 1) or down (-1): (count, change of
    its error, change of the total cost)."""
    now, out = cost.total(kept), {}
    for g, k in kept.items():
        nearby = counts[g][counts[g] > k] if direction > 0 else counts[g][counts[g] < k]
        if len(nearby):
            step = int(nearby[0] if direction > 0 else nearby[-1])
            out[g] = (step, float(curves[g][step] - curves[g][k]),
                      cost.total({**kept, g: step}) - now)
    return out


def _gain(curve: np.ndarray, k: int, up: int, unit: float) -> float:
    """Heap key (smallest first) for giving a group's channels k+1..up back: minus the
    error they remove per unit of cost."""
    return -max(float(curve[k] - curve[up]), 0.0) / max(unit * (up - k), 1e-12)


def _unit_cost(cost: CostModel, group: int) -> float:
    full = cost.total()
    one_less = cost.total({group: cost.sizes[group] - 1})
    return max(full - one_less, 1e-12) / max(full, 1e-12)


def uniform(cost: CostModel, groups: list[int], budget: float,
            round_to: int = 1) -> dict[int, int]:
    """The classic allocation: every group keeps the same fraction of its channels (the
    allowed count nearest to it, see `allowed_counts`)."""
    counts = {g: allowed_counts(cost.sizes[g], _in_channels(cost, g, round_to))
              for g in groups}

    def kept(frac: float) -> dict[int, int]:
        return {g: int(k[np.argmin(np.abs(k - max(1, round(frac * cost.sizes[g]))))])
                for g, k in counts.items()}

    # a higher fraction keeps more: find the highest fraction that fits
    best = kept(_boundary(1.0, 0.0, lambda f: cost.total(kept(f)) <= budget, 40))
    return _top_up(best, cost, counts, budget)


def _top_up(kept: dict[int, int], cost: CostModel, counts: Mapping[int, np.ndarray],
            budget: float) -> dict[int, int]:
    """Rounded counts jump together as the common fraction grows, so the best fraction can
    fall well short of the budget (0.84 of it at round_to 8): raise groups one allowed step
    each while it fits, those kept least first. Steps of one channel (round_to 1) are left
    as the fraction put them."""
    out, grown = dict(kept), True
    while grown:
        grown = False
        for g in sorted(out, key=lambda g: out[g] / cost.sizes[g]):
            bigger = counts[g][counts[g] > out[g]]
            if len(bigger) and bigger[0] - out[g] > 1:
                trial = {**out, g: int(bigger[0])}
                if cost.total(trial) <= budget:
                    out, grown = trial, True
    return out


def _boundary(bad: float, good: float, fits, steps: int) -> float:
    """Bisect between a value that does not fit and one that does; return the fitting end."""
    for _ in range(steps):
        mid = (bad + good) / 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
