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
the drift from upstream: refitting only the slimmed ones halved a ResNet-50's refit, but
the digits CNN at 0.35 of its FLOPs then lost 2.2 points of accuracy instead of 0.6 (its
hidden Gemm layer, unslimmed, is the last place to correct the convolutions' drift).
Attention heads are refit feature by feature (plan.features): the output projection is
re-solved against the original block's input over every kept feature, Kwon et al.'s
layer-wise reconstruction (lumping/head_merge.py). Statistics are O(C²) per read point,
from at most calibrate.ROWS_PER_CHANNEL observations per channel (positions subsampled as
calibration does); the values kept between stages are bounded by MAX_SAMPLES and
CACHE_BYTES, never by the calibration set's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx
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
from .refit_stats import Folds
from .runtime import session
from .subgraph import cut, slice_of

MAX_SAMPLES = 2048  # per stage; conv maps give every sample many rows
CACHE_BYTES = 1 << 30  # kept read-point values of both models, all stages


@progress.phase("sequential refit")
@threadpool_limits.wrap(limits=1, user_api="blas")  # skinny products: BLAS threads
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
