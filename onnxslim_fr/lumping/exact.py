"""Exact lumping (data-free): remove channels whose function another channel already has.

MISSION.md method 1. At every read point a removed channel j must be, for every input,
``v_j = ratio * v_rep + offset`` (duplicate, positive multiple, sign flip through odd
activations), a constant (offset only), or unread (zero fan-out). The offset folds into
the consumer's bias, which is exact only when the consumer has no zero padding (a padded
Conv sees zeros at the borders, not the constant), so there it must be 0.
"""

from __future__ import annotations

import numpy as np

from ..channels.structures import ChannelGroup, GroupSet
from ..graph import Graph
from .consumers import ConsumerView, consumers, segment_of
from .plan import GroupPlan, Plan, removal_plan
from .relations import CONST, Relation, compute

OFFSET_RTOL, OFFSET_ATOL = 1e-5, 1e-7


def plan(graph: Graph, groups: GroupSet) -> Plan:
    """Exact plans for every active group that has something to remove."""
    relations = compute(graph, groups)
    plans: Plan = {}
    for group in groups.active():
        p = _plan_group(graph, groups, group, relations)
        if p is not None and p.removed:
            plans[group.id] = p
    return plans


def _plan_group(graph: Graph, groups: GroupSet, group: ChannelGroup,
                relations: dict[str, Relation]) -> GroupPlan | None:
    points = group.read_points
    if not points:
        return None
    views: dict[str, list[ConsumerView]] = {}
    rels: dict[str, Relation] = {}
    for name in points:
        where = segment_of(groups, name, group.id)
        if where is None:
            return None
        views[name] = consumers(graph, groups, name, group.id)
        r, start = relations[name], where[1]
        sl = slice(start, start + group.size)
        rels[name] = Relation(r.cls[sl], r.lam[sl], r.mu[sl])
    return _decide(group.size, points, views, rels)


def _decide(size: int, points: list[str], views: dict[str, list[ConsumerView]],
            rels: dict[str, Relation]) -> GroupPlan | None:
    dead = np.ones(size, dtype=bool)
    for name in points:
        for v in views[name]:
            dead &= ~np.any(v.column_matrix() != 0, axis=1)
    folds = {name: all(v.folds_offset for v in views[name]) for name in points}
    targets: dict[int, int | None] = {int(j): None for j in np.flatnonzero(dead)}
    const = np.all([rels[n].cls == CONST for n in points], axis=0) & ~dead
    for j in np.flatnonzero(const):
        if all(folds[n] or _small(rels[n].mu[j], 0.0) for n in points):
            targets[int(j)] = None
    live = [j for j in range(size) if j not in targets and not const[j]]
    keys = np.stack([rels[n].cls for n in points], axis=1)
    reps: dict[tuple[int, ...], int] = {}
    for j in live:
        rep = reps.setdefault(tuple(keys[j]), j)
        if rep != j and _offsets_fold(rep, j, points, rels, folds):
            targets[j] = rep
    if not targets:
        return None
    keep = np.array([j for j in range(size) if j not in targets])
    if keep.size == 0:
        keep = np.array([min(targets)])
        targets.pop(int(keep[0]))
    return removal_plan(size, keep, points, _rows(targets, keep, points, rels), "exact")


def _small(x: float, ref: float) -> bool:
    return abs(x) <= OFFSET_ATOL + OFFSET_RTOL * abs(ref)


def _offsets_fold(rep: int, j: int, points: list[str], rels: dict[str, Relation],
                  folds: dict[str, bool]) -> bool:
    for n in points:
        r = rels[n]
        if r.lam[rep] == 0 or r.lam[j] == 0:  # relations keep lam nonzero; never divide by 0
            return False
        ratio = r.lam[j] / r.lam[rep]
        if not folds[n] and not _small(r.mu[j] - ratio * r.mu[rep], abs(r.mu[j]) + 1.0):
            return False
    return True


def _rows(targets: dict[int, int | None], keep: np.ndarray, points: list[str],
          rels: dict[str, Relation]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mix and offset rows, in removal order (ascending channel index), per read point."""
    removed = sorted(targets)
    col = {int(k): i for i, k in enumerate(keep)}
    rows = {}
    for n in points:
        r = rels[n]
        mix = np.zeros((len(removed), len(keep)))
        offset = np.zeros(len(removed))
        for i, j in enumerate(removed):
            rep = targets[j]
            if rep is None:
                offset[i] = r.mu[j] if r.cls[j] == CONST else 0.0
            else:
                ratio = r.lam[j] / r.lam[rep]
                mix[i, col[rep]] = ratio
                offset[i] = r.mu[j] - ratio * r.mu[rep]
        rows[n] = (mix, offset)
    return rows
