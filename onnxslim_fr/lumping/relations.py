"""Symbolic per-channel relations: which channels compute the same function up to scale.

Every channel of a tracked tensor is written ``v = lam * E[cls] + mu``: `cls` names an
expression shared by related channels (CONST: the channel is the constant `mu`). Two
channels with the same `cls` satisfy ``v_j = (lam_j / lam_i) v_i + (mu_j - ratio mu_i)``
for every input. Each op maps (cls, lam, mu) through its per-channel transfer; where a
relation is lost (a shift through ReLU, a scale through sigmoid) the shift or scale
becomes part of a fresh expression key, so only provably exact relations survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..channels.handlers import handler_for
from ..channels.handlers.base import (
    Activation,
    Affine,
    Depthwise,
    Join,
    Normalize,
    Spatial,
    Take,
)
from ..channels.layout import Layout
from ..channels.structures import GroupSet, Role
from ..graph import Graph

CONST = -1
RTOL, ATOL = 1e-5, 1e-9
#: A weight equals the other row's within this share of itself (8 float32 roundings):
#: copies of one filter with BatchNorm folded in differ by one or two, while a different
#: filter may differ only in weights far below the row's largest, which large inputs make
#: count, or by 50 roundings in every weight, which a consumer taking the two channels'
#: difference makes the whole output.
ROW_RTOL = 1e-6


@dataclass
class Relation:
    cls: np.ndarray
    lam: np.ndarray
    mu: np.ndarray

    def __len__(self) -> int:
        return len(self.cls)


class _Ids:
    """Fresh expression ids; channels with equal keys (within tolerance) share one."""

    def __init__(self) -> None:
        self.next = 0

    def fresh(self, n: int) -> np.ndarray:
        self.next += n
        return np.arange(self.next - n, self.next)

    def label(self, *columns: np.ndarray) -> np.ndarray:
        labels = np.zeros(len(columns[0]), dtype=np.int64)
        for col in columns:
            labels = _refine(labels, np.asarray(col, dtype=np.float64))
        return self.fresh(int(labels.max()) + 1 if len(labels) else 0)[labels]


def _refine(labels: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Split each label by `col`; values within tolerance of a run's first value stay."""
    out = np.empty_like(labels)
    cur, start_lab, start_val = -1, None, 0.0
    for i in np.lexsort((col, labels)):
        v = col[i]
        if labels[i] != start_lab or abs(v - start_val) > ATOL + RTOL * max(abs(v),
                                                                            abs(start_val)):
            cur, start_lab, start_val = cur + 1, labels[i], v
        out[i] = cur
    return out


def row_labels(rows: np.ndarray) -> np.ndarray:
    """Labels of equal rows: sort by a random projection, then verify weight by weight.

    Each weight must match within ROW_RTOL of itself, not of the row's largest: a weight of
    1e-5 against 0 is a different filter, and an input feature of 1e5 (raw tabular or
    sensor data) makes it count as much as the largest weight."""
    n = len(rows)
    labels = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return labels
    gauss = np.random.default_rng(0).standard_normal(rows.shape[1])
    proj = rows @ gauss
    # |proj_j - proj_i| <= sum_k |r_jk - r_ik| |g_k| <= ROW_RTOL sum_k max(|r_jk|, |r_ik|) |g_k|
    window = 2 * ROW_RTOL * float(np.max(np.abs(rows) @ np.abs(gauss)))
    order = np.argsort(proj)
    for a, i in enumerate(order):
        if labels[i] >= 0:
            continue
        labels[i] = i
        for j in order[a + 1:]:
            if proj[j] - proj[i] > window:
                break
            if labels[j] < 0 and np.all(np.abs(rows[j] - rows[i]) <= ROW_RTOL * np.maximum(
                    np.abs(rows[j]), np.abs(rows[i]))):
                labels[j] = i
    return labels


def _normalized(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows with a fixed sign (first clear entry positive) and the signed norms."""
    norms = np.linalg.norm(rows, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = rows / safe[:, None]
    first = np.argmax(np.abs(unit) > 1e-3, axis=1)
    sign = np.where(unit[np.arange(len(unit)), first] < 0, -1.0, 1.0)
    return unit * sign[:, None], norms * sign


def compute(graph: Graph, groups: GroupSet) -> dict[str, Relation]:
    """Relations of every tracked tensor (every tracked output of a node), in one
    topological sweep."""
    ids = _Ids()
    rel: dict[str, Relation] = {}
    for node in graph.nodes:
        for index, out in enumerate(node.output):
            if not out or out not in groups.layouts:
                continue
            roles = {m.role for m in groups.roles.get(node.name, []) if m.tensor == out}
            handler = handler_for(node)
            if Role.PRODUCER in roles:
                rel[out] = _produce(handler.weight(node, graph), handler.bias(node, graph), ids)
            else:
                rel[out] = _through(node, index, graph, groups, rel, ids)
            rel[out] = _settled(rel[out], ids)
    return rel


def _settled(r: Relation, ids: _Ids) -> Relation:
    """Keep the invariant planners divide by: a related channel has a finite, nonzero lam.
    ``0 * E + mu`` is the constant mu; a channel whose lam or mu is not finite (an overflow,
    a division by a zero constant) is related to nothing and gets an expression of its own."""
    lost = ~(np.isfinite(r.lam) & np.isfinite(r.mu))
    const = (r.cls == CONST) | ((r.lam == 0) & ~lost)
    if not lost.any() and np.array_equal(const, r.cls == CONST):
        return r
    cls = np.where(const, CONST, r.cls)
    cls[lost] = ids.fresh(int(lost.sum()))
    lam = np.where(lost, 1.0, np.where(const, 0.0, r.lam))
    return Relation(cls, lam, np.where(lost, 0.0, r.mu))


def _produce(weight: np.ndarray, bias: np.ndarray, ids: _Ids) -> Relation:
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    unit, lam = _normalized(rows)
    cls = ids.fresh(len(rows))[row_labels(unit)]
    cls[lam == 0] = CONST
    return Relation(cls, lam, bias.astype(np.float64).copy())


def _through(node: onnx.NodeProto, index: int, graph: Graph, groups: GroupSet,
             rel: dict[str, Relation], ids: _Ids) -> Relation:
    """Relation of output `index` of a node that does not produce channels."""
    inputs = [rel.get(n) if n in groups.layouts else None for n in node.input]
    if node.op_type == "Concat":
        return _concat(node, graph, groups, inputs, ids)
    tracked = [r for r in inputs if r is not None]
    t = handler_for(node).transfer(node, graph)
    if isinstance(t, Join):
        return _join(t.op, tracked[0], tracked[1], ids)
    if not tracked:  # the end of a chain with untracked tensors inside (handlers/packed.py)
        n = groups.layouts[node.output[index]].channels
        return Relation(ids.fresh(n), np.ones(n), np.zeros(n))
    r = tracked[0]
    if isinstance(t, Take):
        return _take(r, t.ranges[index], groups.layouts[node.input[0]])
    if isinstance(t, Affine):
        return _affine(r, np.broadcast_to(t.scale, len(r)), np.broadcast_to(t.shift, len(r)))
    if isinstance(t, Activation):
        return _activation(r, t, ids)
    if isinstance(t, Spatial):
        return _spatial(r, t, ids)
    if isinstance(t, Depthwise):
        return _depthwise(r, t, ids)
    if isinstance(t, Normalize):
        return _normalize(r, t, ids)
    return r


def _take(r: Relation, ranges: dict[int, tuple[int, int]], lay: Layout) -> Relation:
    """A run of channels keeps their relations; positions taken on other axes keep all."""
    if lay.axis not in ranges:
        return r
    sl = slice(*lay.channel_span(*ranges[lay.axis]))
    return Relation(r.cls[sl], r.lam[sl], r.mu[sl])


def _concat(node: onnx.NodeProto, graph: Graph, groups: GroupSet,
            inputs: list[Relation | None], ids: _Ids) -> Relation:
    parts = []
    axis = groups.layouts[node.output[0]].axis
    for name, r in zip(node.input, inputs, strict=True):
        if r is None:
            n = int(graph.shape(name)[axis])
            r = Relation(ids.fresh(n), np.ones(n), np.zeros(n))
        parts.append(r)
    return Relation(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                      ("cls", "lam", "mu")))


def _affine(r: Relation, scale: np.ndarray, shift: np.ndarray) -> Relation:
    cls = np.where(scale == 0, CONST, r.cls)
    return Relation(cls, r.lam * scale, r.mu * scale + shift)


def _activation(r: Relation, t: Activation, ids: _Ids) -> Relation:
    const = r.cls == CONST
    sign = np.sign(r.lam)
    mag = np.where(const, 1.0, np.abs(r.lam))
    params = [] if t.params is None else \
        list(np.broadcast_to(t.params, (len(r), t.params.shape[1])).T)
    if t.kind == "homogeneous":
        keys, lam = [r.cls, sign, r.mu / mag], np.abs(r.lam)
    elif t.kind == "odd":
        keys, lam = [r.cls, np.abs(r.lam), r.mu * sign], sign
    else:
        keys, lam = [r.cls, r.lam, r.mu], np.ones(len(r))
    cls = ids.label(*keys, *params)
    return Relation(np.where(const, CONST, cls), np.where(const, 0.0, lam),
                    np.where(const, t.fn(r.mu), 0.0))


def _spatial(r: Relation, t: Spatial, ids: _Ids) -> Relation:
    if t.border and not t.keeps_offset:  # P_c(x) = P_0(x - c) + c: relate x - c, not x
        inner = _spatial(Relation(r.cls, r.lam, r.mu - t.border), Spatial(t.linear, False), ids)
        return Relation(inner.cls, inner.lam, inner.mu + t.border)
    const = r.cls == CONST
    if t.keeps_offset:
        keys = [r.cls] if t.linear else [r.cls, np.sign(r.lam)]
        return Relation(np.where(const, CONST, ids.label(*keys)), r.lam, r.mu)
    lam_safe = np.where(const, 1.0, r.lam)
    if t.linear:  # P(lam E + mu) = lam P(E + mu/lam); P(mu) = mu P(1)
        cls = ids.label(r.cls, np.where(const, 0.0, r.mu / lam_safe))
        lam = np.where(const, r.mu, r.lam)
    else:  # P(lam E + mu) = |lam| P(sE + mu/|lam|); a constant keys on its value
        cls = ids.label(r.cls, np.sign(r.lam), np.where(const, r.mu, r.mu / np.abs(lam_safe)))
        lam = np.where(const, 1.0, np.abs(r.lam))
    cls = np.where(const & (r.mu == 0), CONST, cls)
    return Relation(cls, np.where(cls == CONST, 0.0, lam), np.zeros(len(r)))


def _depthwise(r: Relation, t: Depthwise, ids: _Ids) -> Relation:
    unit, n = _normalized(t.weight)
    wlab = row_labels(unit).astype(np.float64)
    const = r.cls == CONST
    dead = n == 0
    if not t.padded:
        cls = ids.label(r.cls, wlab)
        out = Relation(np.where(const, CONST, cls), r.lam * n,
                       r.mu * t.weight.sum(axis=1) + t.bias)
    else:
        lam_safe = np.where(const, 1.0, r.lam)
        cls = ids.label(r.cls, wlab, np.where(const, 0.0, r.mu / lam_safe))
        lam = np.where(const, r.mu * n, r.lam * n)
        out = Relation(np.where(const & (r.mu == 0), CONST, cls), lam, t.bias.copy())
    out.cls[dead] = CONST
    out.mu[dead] = t.bias[dead]
    out.lam[out.cls == CONST] = 0.0
    return out


def _normalize(r: Relation, t: Normalize, ids: _Ids) -> Relation:
    """scale * norm(x) + shift: a constant input normalizes to 0 and a zero scale drops the
    input, so both leave the constant `shift` (not a 0/0 multiple of the others)."""
    scale, shift = np.broadcast_to(t.scale, len(r)), np.broadcast_to(t.shift, len(r))
    const = (r.cls == CONST) | (scale == 0)
    cls = ids.label(r.cls, np.where(const, 0.0, r.lam))
    return Relation(np.where(const, CONST, cls), np.where(const, 0.0, scale), shift.copy())


def _join(op: str, a: Relation, b: Relation, ids: _Ids) -> Relation:
    ca, cb = a.cls == CONST, b.cls == CONST
    if op in ("add", "sub"):
        s = 1.0 if op == "add" else -1.0
        lam_a_safe = np.where(ca, 1.0, a.lam)
        ratio = np.where(ca | cb, 0.0, s * b.lam / lam_a_safe)
        cls = ids.label(np.where(ca, -2, a.cls), np.where(cb, -2, b.cls), ratio)
        cls = np.where(ca & cb, CONST, np.where(ca, b.cls, np.where(cb, a.cls, cls)))
        lam = np.where(ca, s * b.lam, a.lam)
        return Relation(cls, np.where(cls == CONST, 0.0, lam), a.mu + s * b.mu)
    cls = ids.label(a.cls, a.lam, a.mu, b.cls, b.lam, b.mu)
    lam = np.where(ca, a.mu * b.lam, np.where(cb, b.mu * a.lam, 1.0))
    mu = np.where(ca, a.mu * b.mu, np.where(cb, b.mu * a.mu, 0.0))
    cls = np.where(ca & cb, CONST, np.where(ca, b.cls, np.where(cb, a.cls, cls)))
    cls = np.where(lam == 0, CONST, cls)
    return Relation(cls, np.where(cls == CONST, 0.0, lam), mu)
