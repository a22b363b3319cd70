"""Functional redundancy with calibration data (MISSION.md method 2, LFRNS post-training).

Per group and read point: channel covariance Σ and mean μ (calibration), and the
consumers' fan-out energy Q = B Bᵀ (B: everything channel c feeds). Keeping a set S and
replacing the rest R by their least-squares reconstruction ``M = Σ_RS Σ_SS⁻¹`` leaves the
consumers' output error ``tr(Q_RR Σ_RR|S)``, Σ_RR|S the conditional covariance.

- lfrns: agglomerative clustering on ``1 - |corr|`` (`threshold`) marks functionally
  redundant channels; cluster representatives are ranked first by contribution (the error
  each one removes when added), the redundant members after them (feature contribution
  ranking restores the useful ones when the budget allows).
- greedy: forward selection by contribution, no clustering.
- magnitude: L1 norm of the producer filters, uniform per layer, no compensation.

Every order gives an error curve error(k); the budget allocates k per group globally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from threadpoolctl import threadpool_limits

from .. import progress
from ..background import Background
from ..calibrate import ChannelStats
from ..channels.handlers import handler_for
from ..channels.structures import ChannelGroup, GroupSet, Role
from ..graph import Graph
from ..moments import Moments
from . import head_merge
from .budget import CostModel, Measured, allocate, uniform
from .consumers import consumers, occurrences
from .plan import GroupPlan, Plan, removal_plan
from .selection import forward_order

METHODS = ("lfrns", "greedy", "magnitude")


@dataclass
class GroupModel:
    """What planning needs of one group: per read point (Q, Σ, μ)."""

    group: ChannelGroup
    points: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]

    def error_scale(self) -> float:
        """Output energy of the consumers, so errors compare across layers."""
        return sum(float(np.vdot(q, s + np.outer(m, m))) for q, s, m in  # Q symmetric: tr
                   self.points.values()) or 1.0


def group_models(graph: Graph, groups: GroupSet, stats: ChannelStats) -> list[GroupModel]:
    models = []
    for g in groups.active():
        points = {}
        for name in g.read_points:
            st = stats.points.get((name, g.id))
            views = consumers(graph, groups, name, g.id)
            if st is None or not views:
                break
            q = sum(v.column_matrix() @ v.column_matrix().T for v in views)
            points[name] = (q, shrunk(st.cov, st.count), st.mean)
        else:
            if points and g.size > 1:
                models.append(GroupModel(g, _pool_ties(points, g, stats)))
    return models


def _pool_ties(points: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], g: ChannelGroup,
               stats: ChannelStats) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Tied read points (one shared weight folds the plan of each) get the statistics of
    all their samples together, so the least-squares merge is one and the same there."""
    for tied in g.ties:
        pooled = Moments.pooled([stats.points[(t, g.id)] for t in tied])
        cov, mean = shrunk(pooled.cov, pooled.count), pooled.mean
        for t in tied:
            points[t] = (points[t][0], cov, mean)
    return points


def shrinkage(cov: np.ndarray, count: int) -> float:
    """Oracle-approximating shrinkage (Chen et al. 2010; scikit-learn's `OAS`) of the
    correlation matrix toward the identity, from `count` observations.

    A read point behind a global pool (a squeeze-and-excitation input) sees one
    observation per sample: 128 of them for 480 channels give a covariance of rank 127, in
    which any 127 channels "explain" the rest exactly. Forward selection then predicts zero
    error for every larger kept set (the gains of the last picks are rounding noise divided
    by rounding noise) and the merge interpolates the calibration samples. Shrinking the
    correlations by the estimated sampling noise keeps both honest; with thousands of
    observations per channel (conv maps) the weight is ~0 and nothing changes."""
    p = len(cov)
    if p < 2 or count <= 0:
        return 0.0
    std = np.sqrt(np.maximum(np.diag(cov), 1e-30))
    corr = cov / np.outer(std, std)
    alpha = float(np.mean(corr ** 2))  # mu = tr(corr) / p = 1
    den = (count + 1) * (alpha - 1.0 / p)
    return 1.0 if den <= 0 else min((alpha + 1.0) / den, 1.0)


def shrunk(cov: np.ndarray, count: int) -> np.ndarray:
    """`cov` with its correlations shrunk toward zero by `shrinkage` (variances kept)."""
    rho = shrinkage(cov, count)
    if rho <= 0.0:
        return cov
    out = (1.0 - rho) * cov
    out[np.diag_indices_from(out)] = np.diag(cov)
    return out


def lfrns_tiers(gm: GroupModel, threshold: float) -> list[np.ndarray]:
    """Cluster representatives first, functionally redundant members second."""
    cov = sum(s for _, s, _ in gm.points.values())
    std = np.sqrt(np.maximum(np.diag(cov), 1e-20))
    corr = np.clip(cov / np.outer(std, std), -1, 1)
    dist = 1.0 - np.abs(corr)
    np.fill_diagonal(dist, 0.0)
    labels = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                     distance_threshold=threshold).fit_predict(dist)
    energy = sum(np.diag(q) * np.diag(s) for q, s, _ in gm.points.values())
    reps = []
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        reps.append(members[np.argmax(energy[members])])
    rest = np.setdiff1d(np.arange(gm.group.size), reps)
    return [np.asarray(reps), rest]


def merge_rows(gm: GroupModel, keep: np.ndarray, compensate: bool
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Least-squares reconstruction of removed channels from kept ones, per read point."""
    removed = np.setdiff1d(np.arange(gm.group.size), keep)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    solved: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # pooled (tied) statistics: once
    for p, (_, s, m) in gm.points.items():
        if not compensate:
            rows[p] = (np.zeros((len(removed), len(keep))), np.zeros(len(removed)))
            continue
        if id(s) in solved:
            rows[p] = solved[id(s)]
            continue
        sss = s[np.ix_(keep, keep)]
        ridge = 1e-6 * max(float(np.trace(sss)) / max(len(keep), 1), 1e-12)
        mix = np.linalg.solve(sss + ridge * np.eye(len(keep)), s[np.ix_(keep, removed)]).T
        rows[p] = solved[id(s)] = (mix, m[removed] - mix @ m[keep])
    return rows


def l1_order(graph: Graph, groups: GroupSet, g: ChannelGroup) -> list[int]:
    norms = np.zeros(g.size)
    for m in g.members:
        if m.role is Role.PRODUCER:
            node = next(n for n in graph.nodes if n.name == m.node)
            w = handler_for(node).weight(node, graph)
            rows = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
            for _, start in occurrences(groups, m.tensor, g.id):  # a piece: its rows only
                norms += rows[start:start + g.size]
    return [int(i) for i in np.argsort(-norms, kind="stable")]


Probe = Callable[[Plan], float]
Probed = tuple[np.ndarray, dict[int, float]]  # a group's predicted curve, measured {k: error}


def trial_plan(gm: GroupModel, order: list[int], k: int, method: str) -> Plan:
    """The plan keeping the first k channels of `order` (merged)."""
    keep = np.sort(np.asarray(order[:k]))
    return {gm.group.id: removal_plan(gm.group.size, keep, gm.group.read_points,
                                      merge_rows(gm, keep, True), method)}


def trial_error(gm: GroupModel, order: list[int], k: int, probe: Probe, method: str) -> float:
    """The probe's output error of keeping the first k channels of `order` (merged)."""
    return max(probe(trial_plan(gm, order, k, method)), 0.0)


def measured_curve(gm: GroupModel, order: list[int], curve: np.ndarray, probe: Probe,
                   method: str) -> np.ndarray:
    """The predicted curve calibrated by one measurement at half the group's channels."""
    k = max(1, gm.group.size // 2)
    return calibrated_curve(gm, order, curve, {k: trial_error(gm, order, k, probe, method)})


def calibrated_curve(gm: GroupModel, order: list[int], predicted: np.ndarray,
                     probed: Mapping[int, float]) -> np.ndarray:
    """The predicted curve (per unit of output energy) rescaled to pass through every
    measured point: the scale is interpolated linearly in k between them, held beyond.

    A prediction of (nearly) zero at a measured point cannot be rescaled: the allocator
    would take the group's channels for free whatever the probe measured. Such a group is
    charged the uncompensated curve (`drop_curve`) scaled to the measurements instead."""
    tiny = 1e-9 * max(float(predicted[0]), 1e-30)
    base = predicted if all(predicted[k] > tiny for k in probed) else drop_curve(gm, order)
    ks = sorted(k for k in probed if base[k] > 0)
    if not ks:  # nothing to shape it by: every removal costs the measured error
        flat = np.full_like(base, max(probed.values()))
        flat[-1] = 0.0
        return flat
    scale = np.interp(np.arange(len(base)), ks, [probed[k] / base[k] for k in ks])
    return np.minimum.accumulate(base * scale)


def drop_curve(gm: GroupModel, order: list[int]) -> np.ndarray:
    """Error of keeping the first k channels of `order` and replacing the others by their
    means (no compensation), per unit of output energy: zero only where every removed
    channel is constant, so it never calls a live channel free."""
    energy = sum(np.diag(q) * np.diag(s) for q, s, _ in gm.points.values())
    removed = np.asarray(energy, dtype=np.float64)[np.asarray(order, dtype=int)]
    tail = np.append(np.cumsum(removed[::-1])[::-1], 0.0)
    return tail / gm.error_scale()


@progress.phase("redundancy planning (orders, probes, allocation)")
@threadpool_limits.wrap(limits=1, user_api="blas")  # small solves: threads cost more CPU
def plan(graph: Graph, groups: GroupSet, stats: ChannelStats, *, fraction: float,
         method: str = "lfrns", target: str = "flops", threshold: float = 0.05,
         compensate: bool = True, probe: Probe | None = None,
         feeds: Mapping[str, np.ndarray] | None = None, round_to: int = 1,
         measured: Mapping[int, Measured] | None = None, notes: list[str] | None = None
         ) -> Plan:
    """Plans that bring the model's cost to `fraction` of its current cost (0 < f <= 1).

    `probe(plans)` measures the real output error of a trial plan; when given, each group's
    predicted error curve is rescaled to a measurement at half its channels, so layers
    whose errors grow on the way to the output are spared (sensitivity calibration), and
    again at the count each allocation gave it, until the allocation stays (REMEASURES).
    Costs are counted at the input sizes of `feeds` (one sample of the calibration data).
    Kept counts are multiples of `round_to` (budget.allowed_counts); `target="latency"`
    costs layers by `measured` milliseconds (budget.CostModel). With `notes` (a cost
    ratio), a budget out of reach stops where the predicted error is still sane
    (`within_reach`) and says so; without (a search on a fidelity bound, which measures
    every candidate itself), the allocation goes as far as it can."""
    models = {gm.group.id: gm for gm in group_models(graph, groups, stats)}
    heads = head_merge.head_models(graph, groups, stats.features)  # whole heads, per feature
    cost = CostModel(graph, groups, target, feeds, measured)
    budget = fraction * cost.total()
    if method == "magnitude":
        kept = uniform(cost, list(models), budget, round_to)
        orders = {g: l1_order(graph, groups, models[g].group) for g in models}
        compensate = False
    else:
        orders, curves, probed = _curves(models, heads, probe, method, threshold)
        scratch = None if notes is None else []
        kept = within_reach(curves, cost, budget, round_to, scratch)
        for _ in range(REMEASURES if probed else 0):  # measure where it landed, again
            curves = _remeasured(models, orders, curves, probed, kept, probe, method)
            before, kept = kept, within_reach(curves, cost, budget, round_to, scratch)
            if kept == before:
                break
        kept = within_reach(curves, cost, budget, round_to, notes)  # the same, with its note
    plans: Plan = {}
    for g, k in kept.items():
        gm = models[g]
        if k >= gm.group.size:
            continue
        keep = np.sort(np.asarray(orders[g][:k]))
        if g in heads:
            plans[g] = heads[g].plan(keep, compensate, method)
            continue
        rows = merge_rows(gm, keep, compensate)
        plans[g] = removal_plan(gm.group.size, keep, gm.group.read_points, rows, method)
    return plans


# Allocations measured again and redone: each curve passes through a measurement at the
# count the allocation before gave it. More rounds chase the probe's noise (a few samples
# per group): on PaddleOCR's recogniser three gave 51% identical strings, one 54%.
REMEASURES = 1
SANE_ERROR = 0.05  # predicted relative output error a budget out of reach may cost


def within_reach(curves: Mapping[int, np.ndarray], cost: CostModel, budget: float,
                 round_to: int = 1, notes: list[str] | None = None) -> dict[int, int]:
    """`allocate`, unless the budget is out of reach (frozen groups, such as an LSTM's hidden
    width, hold more of the cost) and meeting it as nearly as possible would cost more than
    SANE_ERROR: then the cheapest allocation whose summed error stays within it.

    Out of reach, the allocator's price grows without bound and every group falls to its
    fewest channels; a Keras text model then kept 0.819 of its FLOPs instead of 0.8 and
    agreed with the original on 38% of its answers. The last channels bought little cost
    at a great error; the user gets a useful model and a note that says why it stopped.
    `notes` None: plain `allocate` (a search judges each candidate by measurement)."""
    kept = allocate(curves, cost, budget, round_to)
    reached, error = cost.total(kept), _summed(curves, kept)
    if notes is None or reached <= budget * (1 + 1e-9) or error <= SANE_ERROR:
        return kept
    lo, hi = reached, cost.total()
    best = {g: len(c) - 1 for g, c in curves.items()}
    for _ in range(24):  # the smallest budget whose allocation stays within SANE_ERROR
        trial = allocate(curves, cost, (lo + hi) / 2, round_to)
        if _summed(curves, trial) <= SANE_ERROR:
            best, hi = trial, (lo + hi) / 2
        else:
            lo = (lo + hi) / 2
    notes.append(
        f"stopped short of the budget: with the fewest channels in every group the model "
        f"would keep {reached / cost.total():.3f} of its cost (frozen groups hold the rest) at "
        f"a predicted output error of {error:.2g}; it keeps {cost.total(best) / cost.total():.3f},"
        f" where the prediction is {_summed(curves, best):.2g} (squared error relative to the "
        f"outputs' energy; at most {SANE_ERROR})")
    return best


def _summed(curves: Mapping[int, np.ndarray], kept: Mapping[int, int]) -> float:
    return float(sum(curves[g][k] for g, k in kept.items()))


def _curves(models: Mapping[int, GroupModel], heads: Mapping, probe: Probe | None,
            method: str, threshold: float
            ) -> tuple[dict[int, list[int]], dict[int, np.ndarray], dict[int, Probed]]:
    """Per group: the order, the error curve (calibrated by one probe at half the channels
    when there is a probe), and the predicted curve with the probe's measurements."""
    orders, curves, probed = {}, {}, {}
    with Background() as background:
        measuring = {}
        for g, gm in models.items():
            if g in heads:
                orders[g], curves[g] = heads[g].curve(probe, method)
                continue
            tiers = lfrns_tiers(gm, threshold) if method == "lfrns" else \
                [np.arange(gm.group.size)]
            orders[g], curve = forward_order(gm, tiers)
            curves[g] = curve / gm.error_scale()
            if probe is not None:  # measured while the next group's order is computed
                k = max(1, gm.group.size // 2)
                measuring[g] = k, background.run(probe, trial_plan(gm, orders[g], k, method))
        for g, (k, measured) in measuring.items():
            probed[g] = (curves[g], {k: max(measured(), 0.0)})
            curves[g] = calibrated_curve(models[g], orders[g], *probed[g])
    return orders, curves, probed


def _remeasured(models: Mapping[int, GroupModel], orders: Mapping[int, list[int]],
                curves: Mapping[int, np.ndarray], probed: Mapping[int, Probed],
                kept: Mapping[int, int], probe: Probe, method: str) -> dict[int, np.ndarray]:
    """Curves through a second measurement at each group's allocated count: one point at
    half the channels says little about the error of removing 10% (on PaddleOCR's
    recogniser measured / predicted varies by 3x along a curve)."""
    out = dict(curves)
    with Background() as background:
        measuring = {g: background.run(probe, trial_plan(models[g], orders[g], kept[g], method))
                     for g, (_, points) in probed.items()
                     if kept[g] < models[g].group.size and kept[g] not in points}
        for g, measured in measuring.items():
            predicted, points = probed[g]
            points[kept[g]] = max(measured(), 0.0)
            out[g] = calibrated_curve(models[g], orders[g], predicted, points)
    return out


__all__ = ["METHODS", "GroupPlan", "plan"]
