"""What keeping k channels of each group costs: an exact count of MACs and parameters.

Every Conv/Gemm/MatMul costs ``base * kept_in/in * kept_out/out``: the fraction of input
features it still reads times the fraction of output channels it still writes. That makes
the cost of any allocation cheap to evaluate, so budgets are met by search, not estimate.
The base costs are the handlers' (through `report.node_costs`, the figures the report
prints), counted at the input sizes of `feeds`: with a dynamic height counted as 1 the
convolutions would look free next to the MatMuls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..channels.structures import GroupSet, Role
from ..graph import Graph
from ..report import node_costs


@dataclass
class _Term:
    base: float
    inputs: list[tuple[int, float]]  # (group, share of the input features it owns)
    fixed_in: float  # share of input features owned by no group
    output: int | None  # producer group


class CostModel:
    def __init__(self, graph: Graph, groups: GroupSet, target: str = "flops",
                 feeds: Mapping[str, np.ndarray] | None = None) -> None:
        self.sizes = {g.id: g.size for g in groups.groups.values()}
        self.terms: list[_Term] = []
        costs = node_costs(graph.model, feeds)
        for index, node in enumerate(graph.nodes):
            if index not in costs:
                continue
            macs, params = costs[index]
            roles = groups.roles.get(node.name, [])
            out = next((m for m in roles if m.role is Role.PRODUCER), None)
            carrier = next((m for m in roles if m.role is Role.CARRIER), None)
            inputs, fixed = self._input_shares(groups, node.input[0])
            output = groups.layouts[out.tensor].segments[0].group if out else None
            if carrier is not None:  # depthwise: input and output are the same channels
                output = None
            self.terms.append(_Term(float(macs if target == "flops" else params), inputs,
                                    fixed, output))

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
            frac_out = 1.0 if t.output is None else kept.get(t.output, self.sizes[t.output]) \
                / self.sizes[t.output]
            total += t.base * frac_in * frac_out
        return total


def allocate(curves: Mapping[int, np.ndarray], cost: CostModel, budget: float) -> dict[int, int]:
    """Kept channels per group minimising the summed error curves within `budget` cost.

    curves[g][k] is the error of keeping k channels (k = 0..C, curve[0] unused). A price λ
    on cost is bisected: each group keeps the k minimising ``error(k) + λ * k * unit_cost``.
    """
    unit = {g: _unit_cost(cost, g) for g in curves}

    def choose(price: float) -> dict[int, int]:
        kept = {}
        for g, curve in curves.items():
            k = np.arange(1, len(curve))
            kept[g] = int(k[np.argmin(curve[1:] + price * unit[g] * k)])
        return kept

    hi = 1.0
    while cost.total(choose(hi)) > budget and hi < 1e12:
        hi *= 4
    # a higher price removes more: find the lowest price that fits
    return choose(_boundary(0.0, hi, lambda p: cost.total(choose(p)) <= budget, 60))


def _unit_cost(cost: CostModel, group: int) -> float:
    full = cost.total()
    one_less = cost.total({group: cost.sizes[group] - 1})
    return max(full - one_less, 1e-12) / max(full, 1e-12)


def uniform(cost: CostModel, groups: list[int], budget: float) -> dict[int, int]:
    """The classic allocation: every group keeps the same fraction of its channels."""
    def kept(frac: float) -> dict[int, int]:
        return {g: max(1, round(frac * cost.sizes[g])) for g in groups}

    # a higher fraction keeps more: find the highest fraction that fits
    return kept(_boundary(1.0, 0.0, lambda f: cost.total(kept(f)) <= budget, 40))


def _boundary(bad: float, good: float, fits, steps: int) -> float:
    """Bisect between a value that does not fit and one that does; return the fitting end."""
    for _ in range(steps):
        mid = (bad + good) / 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
