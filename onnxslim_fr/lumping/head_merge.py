"""Calibrated slimming of attention heads (after Kwon et al., NeurIPS 2022, post-training).

A head group's channels are heads, each a block of q = head_dim features where the output
projection reads them (x, H*q features). Two heads have nothing feature by feature in
common: feature j of head 2 is not "like" feature j of head 5, so a channel-style merge
(head r ≈ a * head s + b, one coefficient per head, lumping/redundancy.py) rebuilds noise.
Here the statistics are per feature (Σ, μ over the H*q features) and

- removing heads R keeps the heads S whole and re-solves everything reading x by least
  squares over all kept features: ``x_R ≈ M x_S + c``, ``M = Σ_RS Σ_SS⁻¹``, folded as
  ``W' = W [I; M]`` and ``b' = b + W_R c``: that is ``W' = argmin E|W x - W' x_S - b'|²``,
  Kwon's re-solve of the layer output. The error left is ``tr(Q_RR Σ_RR|S)``, ``Q = Wᵀ W``
  over the removed features, ``Σ_RR|S`` their covariance given the kept ones;
- the heads are ordered by greedy forward selection on that error, a head (a block of q
  features) at a time: adding head J to S lowers it by ``tr(Y_Jᵀ A_JJ⁻¹ Y_J)``, A the
  covariance given S and ``Y = A B`` (``B Bᵀ = Q``).

error(k) then competes with every other group's curve in one allocation by error per
cost (lumping/budget.py: a head costs its Q, K and V rows, its share of QKᵀ and P·V, and
its output projection columns), and the sequential refit re-solves the same least squares
against the original model's features (refit.py).

Worked example: 4 heads of 12 features; keep heads {0, 2}: features 0..11 and 24..35 stay
as they are, 12..23 and 36..47 are rebuilt from those 24 by a 24 x 24 least-squares map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..channels.layout import Layout
from ..channels.structures import ChannelGroup, GroupSet
from ..graph import Graph
from ..moments import Moments
from .consumers import consumers
from .plan import GroupPlan, Plan, removal_plan
from .selection import fanout_factor

RIDGE = 1e-6  # relative to the mean variance of the kept features


def feature_rows(value: np.ndarray, lay: Layout, k: int) -> np.ndarray:
    """(observations, C*q) view of segment k's features, channel-major (feature c*q + p is
    element p of channel c, the order of ``lay.feature_index(k).ravel()``)."""
    idx = lay.feature_index(k).ravel()
    block = np.moveaxis(value, lay.axis, -1)[..., idx]
    return block.reshape(-1, len(idx)).astype(np.float32, copy=False)


def feature_stride(value: np.ndarray, lay: Layout, k: int, batches: int, per_feature: int
                   ) -> int:
    """Every n-th observation when the data gives more than `per_feature` per feature."""
    features = lay.feature_index(k).size
    rows = value.size // max(value.shape[lay.axis % value.ndim], 1)
    return max(1, rows * batches // (per_feature * features))


def add_features(store: dict[tuple[str, int], Moments], key: tuple[str, int],
                 value: np.ndarray, lay: Layout, k: int, stride: int = 1) -> None:
    """Add segment k's feature moments of one batch's `value` to `store[key]`: products
    in float32 (BLAS), sums in float64, as calibrate.accumulate does for channels."""
    rows = feature_rows(value, lay, k)[::stride]
    point = store.get(key)
    if point is None:
        n = rows.shape[1]
        point = store[key] = Moments.empty(n)
    point.count += len(rows)
    point.total += np.ones(len(rows), rows.dtype) @ rows
    point.gram += rows.T @ rows


def is_heads(group: ChannelGroup) -> bool:
    """Whether a group's channels are attention heads (blocks of head_dim features)."""
    return group.unit > 1


def expand(mix: np.ndarray, offset: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-head (mix, offset) as the same map per feature: each feature of a head takes
    the head's coefficient for the same feature of the other heads."""
    return np.kron(mix, np.eye(q)), np.repeat(offset, q)


@dataclass
class HeadModel:
    """What planning needs of one head group: per read point (Q, Σ, μ) over features."""

    group: ChannelGroup
    q: int
    points: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]

    def error_scale(self) -> float:
        """Output energy of the consumers, so errors compare with other groups'."""
        return sum(float(np.trace(q @ (s + np.outer(m, m)))) for q, s, m in
                   self.points.values()) or 1.0

    def order(self) -> tuple[list[int], np.ndarray]:
        """Heads in greedy forward order and error(k) with k heads kept (k = 0..H)."""
        states = [_Selection(qm, s, self.group.size, self.q) for qm, s, _ in self.points.values()]
        curve = np.zeros(self.group.size + 1)
        curve[0] = sum(st.error for st in states)
        order: list[int] = []
        for k in range(1, self.group.size + 1):
            left = [h for h in range(self.group.size) if h not in order]
            gains = sum(st.gains(left) for st in states)
            best = left[int(np.argmax(gains))]
            for st in states:
                st.select(best)
            order.append(best)
            curve[k] = max(curve[k - 1] - float(np.max(gains)), 0.0)
        return order, curve

    def curve(self, probe: Callable[[Plan], float] | None, method: str
              ) -> tuple[list[int], np.ndarray]:
        """The order and the error curve in the units of the other groups' curves: output
        energy normalized, then rescaled by one measured trial at half the heads (how much
        of the error reaches the model's outputs)."""
        order, curve = self.order()
        curve = curve / self.error_scale()
        if probe is None or self.group.size < 2:
            return order, curve
        k = max(1, self.group.size // 2)
        measured = max(probe({self.group.id: self.plan(np.asarray(order[:k]), True, method)}),
                       0.0)
        if curve[k] > 1e-9 * max(float(curve[0]), 1e-30):
            return order, curve * max(measured, 1e-12) / float(curve[k])
        # predicted free (the kept heads explain the rest exactly) but measured: every
        # removal is charged what was measured, never taken for nothing
        flat = np.full_like(curve, measured)
        flat[-1] = 0.0
        return order, flat

    def rows(self, keep: np.ndarray, compensate: bool = True
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per read point, the feature map (H*q, K*q) and offset (H*q): kept features as
        they are, removed ones rebuilt from all kept features by least squares."""
        kept = _features(np.sort(keep), self.q)
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for p, (_, s, m) in self.points.items():
            mix = np.zeros((len(m), len(kept)))
            offset = np.zeros(len(m))
            mix[kept, np.arange(len(kept))] = 1.0
            removed = np.setdiff1d(np.arange(len(m)), kept)
            if compensate and len(removed):
                mix[removed], offset[removed] = _solve(s, m, kept, removed)
            out[p] = (mix, offset)
        return out

    def plan(self, keep: np.ndarray, compensate: bool, method: str) -> GroupPlan:
        """Keep heads `keep`; the consumers fold the per-feature maps (plan.features)."""
        keep = np.sort(np.asarray(keep, dtype=np.int64))
        removed = self.group.size - len(keep)
        zero = {p: (np.zeros((removed, len(keep))), np.zeros(removed))
                for p in self.group.read_points}
        base = removal_plan(self.group.size, keep, self.group.read_points, zero, method)
        base.features = self.rows(keep, compensate)
        return base


def _features(heads: np.ndarray, q: int) -> np.ndarray:
    return (np.asarray(heads)[:, None] * q + np.arange(q)[None, :]).ravel()


def _solve(s: np.ndarray, m: np.ndarray, kept: np.ndarray, removed: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of the removed features on the kept ones (centred)."""
    sss = s[np.ix_(kept, kept)]
    ridge = RIDGE * max(float(np.trace(sss)) / max(len(kept), 1), 1e-12)
    mix = np.linalg.solve(sss + ridge * np.eye(len(kept)), s[np.ix_(kept, removed)]).T
    return mix, m[removed] - mix @ m[kept]


class _Selection:
    """One read point's greedy state: A = Σ given the selected heads, Y = A B."""

    def __init__(self, q_mat: np.ndarray, sigma: np.ndarray, heads: int, q: int) -> None:
        self.q = q
        self.b = fanout_factor(q_mat)
        self.a = np.array(sigma, dtype=np.float64)
        self.y = self.a @ self.b
        self.error = float(np.sum(self.b * self.y))  # tr(Q Σ)
        self.tol = 1e-9 * max(float(np.max(np.diag(self.a), initial=0.0)), 1e-30)

    def _inverse(self, j: np.ndarray) -> np.ndarray:
        """Pseudo-inverse of A_JJ: directions the selected heads explain gain nothing."""
        return scipy.linalg.pinvh(self.a[np.ix_(j, j)], atol=self.tol)

    def gains(self, left: list[int]) -> np.ndarray:
        out = np.zeros(len(left))
        for i, h in enumerate(left):
            j = _features(np.array([h]), self.q)
            yj = self.y[j]
            out[i] = max(float(np.sum(yj * (self._inverse(j) @ yj))), 0.0)
        return out

    def select(self, head: int) -> None:
        j = _features(np.array([head]), self.q)
        inv = self._inverse(j)
        cols = self.a[:, j]
        yj = self.y[j].copy()
        self.a -= cols @ inv @ cols.T
        self.y -= cols @ (inv @ yj)


def head_models(graph: Graph, groups: GroupSet,
                features: dict[tuple[str, int], Moments]) -> dict[int, HeadModel]:
    """A HeadModel for every unfrozen head group with feature statistics at each read
    point; tied read points (one shared weight) take the statistics of all of them."""
    models: dict[int, HeadModel] = {}
    for g in groups.active():
        if not is_heads(g) or g.size < 2:
            continue
        points: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name in g.read_points:
            st = features.get((name, g.id))
            views = consumers(graph, groups, name, g.id)
            if st is None or not views:
                break
            q = sum(_feature_columns(v.block) @ _feature_columns(v.block).T for v in views)
            points[name] = (q, st.cov, st.mean)
        else:
            if points:
                width = next(iter(points.values()))[1].shape[0]
                models[g.id] = HeadModel(g, width // g.size, _pool_ties(points, g, features))
    return models


def _feature_columns(block: np.ndarray) -> np.ndarray:
    """(C*q, everything each feature feeds) from a consumer block (out, C, q, *kernel)."""
    out, c, q = block.shape[:3]
    return np.moveaxis(block.reshape(out, c * q, -1), 1, 0).reshape(c * q, -1)


def _pool_ties(points: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], g: ChannelGroup,
               features: dict[tuple[str, int], Moments]
               ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for tied in g.ties:
        pooled = Moments.pooled([features[(t, g.id)] for t in tied])
        for t in tied:
            points[t] = (points[t][0], pooled.cov, pooled.mean)
    return points
