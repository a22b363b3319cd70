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
from .consumers import ConsumerView, consumers, occurrences
from .heads import plan_heads
from .plan import GroupPlan, Plan, removal_plan
from .relations import CONST, Relation, compute

OFFSET_RTOL, OFFSET_ATOL = 1e-5, 1e-7


def plan(graph: Graph, groups: GroupSet) -> Plan:
    """Exact plans for every active group that has something to remove. Attention heads
    are lumped as whole heads (lumping/heads.py); per-channel relations never follow
    them (a head is not one value per position)."""
    channels = _without_heads(groups)
    relations = compute(graph, channels)
    plans: Plan = {}
    for group in groups.active():
        if group.unit > 1:
            p = plan_heads(graph, groups, group)
        elif all(name in channels.layouts for name in group.read_points):
            p = _plan_group(graph, groups, group, relations)
        else:
            p = None  # read where heads are too: no per-channel relations there
        if p is not None and p.removed:
            plans[group.id] = p
    return plans


def _without_heads(groups: GroupSet) -> GroupSet:
    """The analysis with every tensor that holds attention heads left out."""
    layouts = {name: lay for name, lay in groups.layouts.items()
               if all(groups.groups[g].unit == 1 for g in lay.groups())}
    return GroupSet(groups.groups, layouts, groups.roles)


def _plan_group(graph: Graph, groups: GroupSet, group: ChannelGroup,
                relations: dict[str, Relation]) -> GroupPlan | None:
    points = group.read_points
    if not points:  # nothing reads it (a Split piece no node takes): one channel stays
        return removal_plan(group.size, np.array([0]), [], {}, "exact") \
            if group.size > 1 else None
    views: dict[str, list[ConsumerView]] = {}
    sites: list[tuple[str, Relation]] = []  # one per occurrence of the group at a read point
    for name in points:
        places = occurrences(groups, name, group.id)
        if not places:
            return None
        views[name] = consumers(graph, groups, name, group.id)
        r = relations[name]
        for _, start in places:
            sl = slice(start, start + group.size)
            sites.append((name, Relation(r.cls[sl], r.lam[sl], r.mu[sl])))
    return _decide(group.size, points, views, sites, _classes(points, group.ties))


def _classes(points: list[str], ties: list[list[str]]) -> list[list[str]]:
    """Read points that must take one plan: tied ones together, the others alone."""
    classes: list[list[str]] = []
    for name in points:
        joined = [c for c in classes if any(name in t and c[0] in t for t in ties)]
        if joined:
            joined[0].append(name)
        else:
            classes.append([name])
    return classes


def _decide(size: int, points: list[str], views: dict[str, list[ConsumerView]],
            sites: list[tuple[str, Relation]], classes: list[list[str]]) -> GroupPlan | None:
    """Remove what every site (occurrence at a read point) agrees on. The rows of a class of
    read points come from its first site; a removal whose row differs at another site of
    the class (another occurrence, a tied read point) is dropped, so one plan holds."""
    targets, dead = _targets(size, points, views, sites)
    first = {n: next(r for m, r in sites if m in c) for c in classes for n in c}
    targets = {j: rep for j, rep in targets.items()
               if dead[j] or all(_same_row(j, rep, first[n], r) for n, r in sites)}
    if not targets:
        return None
    keep = np.array([j for j in range(size) if j not in targets])
    if keep.size == 0:
        keep = np.array([min(targets)])
        targets.pop(int(keep[0]))
    return removal_plan(size, keep, points, _rows(targets, keep, points, first), "exact")


def _targets(size: int, points: list[str], views: dict[str, list[ConsumerView]],
             sites: list[tuple[str, Relation]]) -> tuple[dict[int, int | None], np.ndarray]:
    """Removable channels -> the kept channel they follow (None: dead or constant), and
    which channels nothing reads."""
    dead = np.ones(size, dtype=bool)
    for name in points:
        for v in views[name]:
            dead &= ~np.any(v.column_matrix() != 0, axis=1)
    folds = {name: all(v.folds_offset for v in views[name]) for name in points}
    targets: dict[int, int | None] = {int(j): None for j in np.flatnonzero(dead)}
    const = np.all([r.cls == CONST for _, r in sites], axis=0) & ~dead
    for j in np.flatnonzero(const):
        if all(folds[n] or _small(r.mu[j], 0.0) for n, r in sites):
            targets[int(j)] = None
    live = [j for j in range(size) if j not in targets and not const[j]]
    keys = np.stack([r.cls for _, r in sites], axis=1)
    reps: dict[tuple[int, ...], list[int]] = {}  # kept channels of each expression
    for j in live:
        kept = reps.setdefault(tuple(keys[j]), [])
        rep = next((r for r in kept if _offsets_fold(r, j, sites, folds)), None)
        if rep is None:  # the first of its kind, or no offset that folds: it stays
            kept.append(j)
        else:
            targets[j] = rep
    return targets, dead


def _row(j: int, rep: int | None, r: Relation) -> tuple[float, float]:
    """(ratio to the representative, offset) of removed channel j under relation r."""
    if rep is None:
        return 0.0, float(r.mu[j]) if r.cls[j] == CONST else 0.0
    ratio = r.lam[j] / r.lam[rep]
    return float(ratio), float(r.mu[j] - ratio * r.mu[rep])


def _same_row(j: int, rep: int | None, a: Relation, b: Relation) -> bool:
    (ra, oa), (rb, ob) = _row(j, rep, a), _row(j, rep, b)
    return _small(ra - rb, abs(ra)) and _small(oa - ob, abs(oa) + 1.0)


def _small(x: float, ref: float) -> bool:
    return abs(x) <= OFFSET_ATOL + OFFSET_RTOL * abs(ref)


def _offsets_fold(rep: int, j: int, sites: list[tuple[str, Relation]],
                  folds: dict[str, bool]) -> bool:
    for n, r in sites:
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
        mix = np.zeros((len(removed), len(keep)))
        offset = np.zeros(len(removed))
        for i, j in enumerate(removed):
            ratio, offset[i] = _row(j, targets[j], rels[n])
            if targets[j] is not None:
                mix[i, col[targets[j]]] = ratio
        rows[n] = (mix, offset)
    return rows
