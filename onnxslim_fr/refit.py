"""Sequential refit: re-solve every merge against the original model, input to output.

A one-shot merge reconstructs removed channels from kept ones as they are in the
*unslimmed* model. Once earlier layers are slimmed, the kept channels themselves drift,
and errors compound with depth. The refit walks the read points in graph order; at each
one it runs the original and the current slimmed model side by side over the calibration
data and solves, by ridge least squares on centred paired statistics,

    original channels  ≈  mix @ kept channels (slimmed model) + offset

(every original channel, kept ones included), then folds that into the consumers. Each
layer thus reconstructs the *original* input of its consumers from what actually reaches
it, compensating the errors of all layers before it: He et al.'s and ThiNet's sequential
reconstruction, post-training. Groups with nothing removed are refit too, so they absorb
the drift from upstream. Attention heads are refit feature by feature (plan.features): the
output projection is re-solved against the original block's input over every kept
feature, Kwon et al.'s layer-wise reconstruction (lumping/head_merge.py). Statistics
are O(C²) per read point, from at most calibrate.ROWS_PER_CHANNEL observations per channel
(positions subsampled as calibration does); the values kept between stages are bounded
by MAX_SAMPLES and CACHE_BYTES, never by the calibration set's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx
from scipy.linalg import cho_factor, cho_solve
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from . import progress, rewrite
from .calibrate import ROWS_PER_CHANNEL, Dataset, channel_rows, row_stride
from .channels.layout import Layout
from .channels.structures import GroupSet
from .graph import Graph
from .lumping import head_merge
from .lumping.consumers import occurrences
from .lumping.plan import GroupPlan, Plan
from .runtime import session
from .subgraph import cut, slice_of

RIDGE = 1e-4  # relative to the mean variance of the regressors
MAX_SAMPLES = 2048  # per stage; conv maps give every sample many rows
CACHE_BYTES = 1 << 30  # kept read-point values of both models, all stages


@dataclass
class PairedStats:
    """Running sums of (original channels o, slimmed kept channels s) at one read point,
    of the values less a shift (their first batch's means; zero for sums built whole).

    Products run in float32 (BLAS, twice float64's speed) and add up in float64: the shift
    keeps float32's rounding relative to the values' spread, not to a large mean. `kept`
    (optional) names the columns of o that s's columns are; their cross products are taken
    as s's Gram plus the drift's (o_kept - s), exactly s's Gram when nothing drifted, so an
    unslimmed channel fits itself exactly: a near-singular covariance would amplify any
    rounding difference between ``o.T @ s`` and ``s.T @ s`` past the ridge."""

    count: int
    sum_o: np.ndarray  # Σ (o - shift_o), rows in `order` when it is set
    sum_s: np.ndarray
    gram_ss: np.ndarray  # Σ (s - shift_s)(s - shift_s)ᵀ
    cross_os: np.ndarray
    kept: np.ndarray | None = None
    order: np.ndarray | None = None  # kept columns of o first, then the rest (add's order)
    shift_o: np.ndarray | None = None  # float32, in `order`: the drift's for kept columns
    shift_s: np.ndarray | None = None

    @classmethod
    def empty(cls, c: int, k: int, kept: np.ndarray | None = None) -> PairedStats:
        return cls(0, np.zeros(c), np.zeros(k), np.zeros((k, k)), np.zeros((c, k)), kept)

    def add(self, o: np.ndarray, s: np.ndarray) -> None:
        o, s = np.asarray(o, np.float32), np.asarray(s, np.float32)
        if len(o) == 0:
            return
        k = 0 if self.kept is None else len(self.kept)
        if self.order is None:  # kept columns first: their rows of the sums are one slice
            kept = np.arange(0) if self.kept is None else self.kept
            self.order = np.concatenate([kept, np.setdiff1d(np.arange(o.shape[1]), kept)])
        rest = o[:, self.order]  # copies: o_kept - s, then the rest, shifted in place
        if k:
            rest[:, :k] -= s
        if self.shift_s is None:  # the first batch's means (float32: the same shifts below)
            self.shift_s, self.shift_o = _mean32(s), _mean32(rest)
        sc = s - self.shift_s
        rest -= self.shift_o  # [drift of the kept columns | other columns], centred
        gram = sc.T @ sc
        cross = rest.T @ sc
        if k:
            cross[:k] += gram  # o_kept = s + drift: exactly s's Gram when nothing drifted
        self.gram_ss += gram
        self.cross_os += cross
        sum_s = np.sum(sc, axis=0, dtype=np.float64)
        self.sum_s += sum_s
        self.sum_o += np.sum(rest, axis=0, dtype=np.float64)
        if k:
            self.sum_o[:k] += sum_s
        self.count += len(o)

    def merged(self, other: PairedStats) -> PairedStats:
        """Both sums at zero shift, added (a repeated read point pools its samples)."""
        a, b = self.unshifted(), other.unshifted()
        return PairedStats(a.count + b.count, a.sum_o + b.sum_o, a.sum_s + b.sum_s,
                           a.gram_ss + b.gram_ss, a.cross_os + b.cross_os, self.kept)

    def unshifted(self) -> PairedStats:
        """The same sums of the values themselves, rows in o's order: Σ (x + a)(y + b)ᵀ
        from Σ x yᵀ, one formula for every product, so equal inputs stay bitwise equal."""
        if self.shift_s is None:
            return self
        n, k = self.count, 0 if self.kept is None else len(self.kept)
        b = self.shift_s.astype(np.float64)
        a = self.shift_o.astype(np.float64)
        if k:
            a[:k] += b  # a kept column's shift is s's plus its drift's
        sum_o, cross = np.empty_like(self.sum_o), np.empty_like(self.cross_os)
        sum_o[self.order] = self.sum_o + n * a
        cross[self.order] = _unshift(self.cross_os, self.sum_o, a, self.sum_s, b, n)
        return PairedStats(n, sum_o, self.sum_s + n * b,
                           _unshift(self.gram_ss, self.sum_s, b, self.sum_s, b, n), cross,
                           self.kept)

    def solve(self, prior: np.ndarray, ridge: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares (mix, offset) with ``o ≈ mix @ s + offset``, ridge-regularized toward
        `prior` (the plan's mix so far: identity for kept channels), not toward zero: where
        the statistics are uninformative (nearly collinear channels) the plan stays as it
        was, and refitting an unslimmed model gives back exactly the identity. `ridge` is
        relative to the regressors' mean variance (None: `ridge_for`)."""
        if self.shift_s is not None:
            return self.unshifted().solve(prior, ridge)
        n = max(self.count, 1)
        mo, ms = self.sum_o / n, self.sum_s / n
        cov_ss = self.gram_ss / n - np.outer(ms, ms)
        cov_os = self.cross_os / n - np.outer(mo, ms)
        rel = ridge_for(len(ms), n) if ridge is None else ridge
        lam = rel * max(float(np.trace(cov_ss)) / max(len(ms), 1), 1e-12)
        mix = _ridge_solve(cov_ss + lam * np.eye(len(ms)), (cov_os + lam * prior).T).T
        return mix, mo - mix @ ms

    def outputs(self, rows: np.ndarray) -> PairedStats:
        """The statistics of some original channels only: each is its own regression on
        the same kept channels, so a subset estimates a ridge's loss at a fraction of the
        cost."""
        raw = self.unshifted()
        return PairedStats(raw.count, raw.sum_o[rows], raw.sum_s, raw.gram_ss,
                           raw.cross_os[rows])

    def loss(self, mix: np.ndarray, offset: np.ndarray) -> float:
        """Mean squared error of ``o ≈ mix @ s + offset`` on these rows, less the constant
        mean of |o|² (enough to compare fits)."""
        if self.shift_s is not None:
            return self.unshifted().loss(mix, offset)
        n = max(self.count, 1)
        fitted = (float(np.sum((mix @ self.gram_ss) * mix)) + 2 * offset @ (mix @ self.sum_s)
                  + n * offset @ offset)
        return (fitted - 2 * float(np.sum(mix * self.cross_os)) - 2 * offset @ self.sum_o) / n


def _mean32(x: np.ndarray) -> np.ndarray:
    return np.mean(x, axis=0, dtype=np.float64).astype(np.float32)


def _unshift(product: np.ndarray, sum_x: np.ndarray, a: np.ndarray, sum_y: np.ndarray,
             b: np.ndarray, n: int) -> np.ndarray:
    """Σ (x + a)(y + b)ᵀ from Σ x yᵀ and the sums of x and y."""
    return product + np.outer(sum_x, b) + np.outer(a, sum_y) + n * np.outer(a, b)


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative ridges a refit chooses among
PLENTY = 10  # rows per kept feature beyond which the ridge is not chosen by halves
CHOICE_ROWS = 48  # original channels whose fits choose the ridge (a sample of them)


@dataclass
class Folds:
    """Paired statistics of two halves of the calibration rows (each batch's first and
    second half: its samples, for sample-major values).

    The refit overfits its calibration samples where they are few for the kept channels:
    on PaddleOCR's recogniser (128 text lines) it cut the calibration set's output error by
    a third and raised the test set's by a tenth (0.0169 -> 0.0185; 0.0178 with the ridge
    chosen here). Each solve takes the ridge whose fit on one half predicts the other half
    best (both ways); with a single row, `ridge_for`."""

    halves: tuple[PairedStats, PairedStats]

    @classmethod
    def empty(cls, c: int, k: int, kept: np.ndarray | None = None) -> Folds:
        return cls((PairedStats.empty(c, k, kept), PairedStats.empty(c, k, kept)))

    def add(self, o: np.ndarray, s: np.ndarray) -> None:
        half = len(o) // 2
        self.halves[0].add(o[:half], s[:half])
        self.halves[1].add(o[half:], s[half:])

    def merged(self, other: Folds) -> Folds:
        return Folds((self.halves[0].merged(other.halves[0]),
                      self.halves[1].merged(other.halves[1])))

    def solve(self, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.halves
        whole = a.merged(b)
        if min(a.count, b.count) == 0:
            return whole.solve(prior)
        if whole.count >= PLENTY * len(whole.sum_s):
            # overfitting is about kept / rows of the noise: negligible here, and choosing
            # costs twelve solves (it tripled a ResNet-50's refit, whose rows are conv maps)
            return whole.solve(prior, RIDGE)
        rows = np.unique(np.linspace(0, len(prior) - 1, CHOICE_ROWS).astype(int))
        a, b, sub = a.outputs(rows), b.outputs(rows), prior[rows]

        def crossed(ridge: float) -> float:
            return b.loss(*a.solve(sub, ridge)) + a.loss(*b.solve(sub, ridge))

        # the best ridge falls about as 1 / rows: the whole has twice a half's
        return whole.solve(prior, max(RIDGE, _first_minimum(RIDGES, crossed) / 2))


def _first_minimum(ridges: tuple[float, ...], loss: Callable[[float], float]) -> float:
    """The ridge of least `loss`, trying them in increasing order and stopping once the loss
    rises: the held-out loss is U-shaped in the ridge, and each try costs two k x k
    factorizations (most of a ResNet-50's refit when every ridge was tried)."""
    best, best_loss = ridges[0], loss(ridges[0])
    for ridge in ridges[1:]:
        value = loss(ridge)
        if value >= best_loss:
            break
        best, best_loss = ridge, value
    return best


def _ridge_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a⁻¹ b for a ridge-regularized covariance `a` (symmetric positive definite): by
    Cholesky, half LU's work; LU where rounding left `a` indefinite."""
    try:
        return cho_solve(cho_factor(a, check_finite=False), b, check_finite=False)
    except np.linalg.LinAlgError:
        return np.linalg.solve(a, b)


def ridge_for(regressors: int, observations: int, ridge: float = RIDGE) -> float:
    """The relative ridge of a refit with `regressors` kept channels from `observations`
    rows: at least regressors / observations.

    A read point behind a global pool (a squeeze-and-excitation input) sees one row per
    sample: PaddleOCR's recogniser refits 352 kept channels from 128 rows there, and a
    ridge of 1e-4 interpolates the calibration samples, noise included. Ordinary least
    squares overfits by about p / (n - p) of the noise; a ridge
    of p / n of the mean variance tames it where n ~ p, and with conv maps (hundreds of
    rows per channel) it stays below 1%."""
    return max(ridge, regressors / max(observations, 1))


@progress.phase("sequential refit")
@threadpool_limits.wrap(limits=1, user_api="blas")  # skinny float64 products: BLAS
def refit(work: onnx.ModelProto, graph: Graph, groups: GroupSet, plans: Plan,
          data: Dataset, gids: list[int], max_samples: int = MAX_SAMPLES
          ) -> tuple[onnx.ModelProto, Plan]:
    """Refit the read points of groups `gids` (planned or not) in graph order.

    Each stage runs only the layers since the previous read points (their values are
    kept while a later stage reads them), on at most `max_samples` calibration samples:
    the whole refit costs about one forward pass of each model over those samples.
    Returns the final slimmed model and the refit plans (same keep sets as `plans`)."""
    plans = dict(plans)
    for gid in gids:
        if gid not in plans:
            size = groups.groups[gid].size
            plans[gid] = GroupPlan(size, np.arange(size), {
                t: (np.eye(size), np.zeros(size)) for t in groups.groups[gid].read_points},
                "refit")
    stages = _by_tensor(_stages(graph, groups, gids))
    batches = data.head(min(max_samples, _affordable([t for t, _ in stages], graph)))
    values = _StagedValues(graph, batches, [t for t, _ in stages])

    def slimmed(sub: onnx.ModelProto) -> onnx.ModelProto:
        """The same slice with the plans as they are now."""
        return rewrite.apply(sub, Graph(sub), groups, plans, finalize=False, analysis=graph)

    pooled: dict[tuple[int, str], Folds] = {}
    bar = tqdm(stages, desc="refitting", unit="layer", disable=not progress.shown(),
               leave=False)
    for tensor, stage_gids in bar:
        lay = groups.layouts[tensor]
        shrunk = lay.resized({g: len(p.keep) for g, p in plans.items()})
        q = {g: _features_per_channel(groups, tensor, g) for g in stage_gids}
        paired = {g: Folds.empty(plans[g].size * q[g], len(plans[g].keep) * q[g],
                                 _kept_columns(plans[g].keep, q[g])) for g in stage_gids}
        for ref, now in zip(*values.advance(tensor, slimmed), strict=True):
            for g in stage_gids:
                for k, _ in occurrences(groups, tensor, g):  # a repeated group pools them
                    _observe(paired[g], ref, now, lay, shrunk, k, values.count, q[g] > 1)
        for g in stage_gids:
            tied = _tied(groups.groups[g].ties, tensor)
            if len(tied) > 1:  # one weight reads them all: solve on all their samples so far
                paired[g] = pooled[(g, tied[0])] = pooled[(g, tied[0])].merged(paired[g]) \
                    if (g, tied[0]) in pooled else paired[g]
            plans[g] = _resolved(plans[g], paired[g], tensor, tied, q[g])
    return rewrite.apply(work, graph, groups, plans), plans


def _features_per_channel(groups: GroupSet, tensor: str, gid: int) -> int:
    """q for a head group (refit feature by feature, lumping/head_merge.py), else 1."""
    if not head_merge.is_heads(groups.groups[gid]):
        return 1
    k = occurrences(groups, tensor, gid)[0][0]
    return int(groups.layouts[tensor].feature_index(k).shape[1])


def _kept_columns(keep: np.ndarray, q: int) -> np.ndarray:
    """The original's columns that the slimmed values' columns are: kept channels, or the
    features of kept heads (channel-major, head_merge.feature_rows)."""
    keep = np.asarray(keep, dtype=np.int64)
    return (keep[:, None] * q + np.arange(q)).ravel()


def _observe(paired: Folds, ref: np.ndarray, now: np.ndarray, lay: Layout,
             shrunk: Layout, k: int, batches: int, per_feature: bool) -> None:
    """One batch of (original, slimmed) values of segment k: channels, or the features
    of each head (a head is rebuilt feature by feature, never as another head's multiple)."""
    if per_feature:
        step = head_merge.feature_stride(ref, lay, k, batches, ROWS_PER_CHANNEL)
        paired.add(head_merge.feature_rows(ref, lay, k)[::step],
                   head_merge.feature_rows(now, shrunk, k)[::step])
        return
    step = row_stride(ref, lay, k, batches)  # as calibration does
    paired.add(channel_rows(ref, lay, k)[::step], channel_rows(now, shrunk, k)[::step])


def _resolved(plan: GroupPlan, paired: Folds, tensor: str, tied: list[str], q: int
              ) -> GroupPlan:
    """`plan` with the least-squares map at `tensor` (and the read points tied to it),
    ridge-regularized toward the map it had: per feature for heads (q > 1)."""
    if q == 1:
        mix = paired.solve(plan.mix[tensor][0])
        return replace(plan, mix={**plan.mix, **{t: mix for t in tied}})
    prior = plan.features[tensor][0] if tensor in plan.features else \
        head_merge.expand(*plan.mix[tensor], q)[0]
    mix = paired.solve(prior)
    return replace(plan, features={**plan.features, **{t: mix for t in tied}})


def _stages(graph: Graph, groups: GroupSet, gids: list[int]) -> list[tuple[str, int]]:
    """(read point, group) pairs in graph order of the node writing the read point."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    pairs = [(t, g) for g in gids for t in groups.groups[g].read_points
             if occurrences(groups, t, g)]

    def where(t: str) -> int:
        node = graph.producer.get(t)
        return -1 if node is None else position[id(node)]

    return sorted(pairs, key=lambda p: (where(p[0]), p[0], p[1]))


def _tied(ties: list[list[str]], tensor: str) -> list[str]:
    """The read points that must take the same plan as `tensor` (itself included)."""
    return next((t for t in ties if tensor in t), [tensor])


def _by_tensor(stages: list[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = []
    for tensor, g in stages:
        if out and out[-1][0] == tensor:
            out[-1][1].append(g)
        else:
            out.append((tensor, [g]))
    return out


def _affordable(tensors: list[str], graph: Graph, live: int = 4) -> int:
    """Samples whose kept values fit CACHE_BYTES: about `live` float32 read points (two
    models, a residual branch each) of the largest size at once."""
    largest = max((int(np.prod([d or 1 for d in (graph.shape(t) or (1,))[1:]])) for t in
                   tensors), default=1)
    return max(32, CACHE_BYTES // (4 * live * largest))


class _StagedValues:
    """Both models' values at successive read points, each stage computed from the ones
    before: a stage runs only the layers since the read points it needs.

    Valid because a refit only edits consumers of the current read point, which are
    downstream of every earlier one. The slimmed stage is the same slice of the original
    with the current plans applied, so a stage costs its slice, not the whole model. A kept
    value is dropped after its last reader."""

    def __init__(self, work: Graph, batches: list[dict[str, np.ndarray]],
                 tensors: list[str]) -> None:
        self.work = work
        self.ref = {name: [b[name] for b in batches] for name in batches[0]}
        self.now = dict(self.ref)
        self.count = len(batches)
        self.last_use: dict[str, int] = {}
        available = set(self.ref)
        for stage, tensor in enumerate(tensors):
            for name in slice_of(work, [tensor], available)[1]:
                self.last_use[name] = stage
            available.add(tensor)
        self.available = set(self.ref)
        self.stage = 0

    def advance(self, tensor: str, slimmed: Callable[[onnx.ModelProto], onnx.ModelProto]
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Values of `tensor` in the original and in the slimmed model, per batch."""
        sub = cut(self.work, [tensor], self.available)
        ref, now = self._run(sub, self.ref, tensor), self._run(slimmed(sub), self.now, tensor)
        self.available.add(tensor)
        for name in [n for n, last in self.last_use.items() if last <= self.stage]:
            self.ref.pop(name, None)
            self.now.pop(name, None)
            del self.last_use[name]
        self.stage += 1
        return ref, now

    def _run(self, model: onnx.ModelProto, cache: dict[str, list[np.ndarray]],
             tensor: str) -> list[np.ndarray]:
        names = [i.name for i in model.graph.input]
        sess = session(model)
        out = [sess.run(None, {n: cache[n][b] for n in names})[0] for b in range(self.count)]
        if tensor in self.last_use:
            cache[tensor] = out
        return out
