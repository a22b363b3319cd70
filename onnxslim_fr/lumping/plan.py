"""Plans: what happens to each channel group, independent of how it was decided.

Per group: the kept channels and, per read point, "old channel values ≈ mix @ kept +
offset". A consumer folds it as ``W_kept' = W @ mix`` and ``bias' = bias + W @ offset``.
Identity: all kept. Duplicate or positive multiple: a row with one positive entry.
Dead or constant: a zero row plus the constant. Redundancy: least-squares rows. A refit
(onnxslim_fr/refit.py) may also re-solve the kept rows against the original activations, so
only exact plans promise identity rows for kept channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..channels.structures import GroupSet, Role


@dataclass
class GroupPlan:
    size: int
    keep: np.ndarray
    mix: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    method: str = "exact"
    #: per read point, optional: the same relation feature by feature, (C*q, K*q) and
    #: (C*q,) over the q features of each channel (channel-major), for channels that are
    #: blocks of features (attention heads, lumping/head_merge.py); consumers fold it
    #: instead of `mix` there
    features: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return self.size - len(self.keep)

    @property
    def changes(self) -> bool:
        """Whether applying the plan edits the model (removes or re-mixes channels)."""
        if self.removed:
            return True
        return any(not np.array_equal(mix, np.eye(len(mix))) or np.any(offset)
                   for mix, offset in [*self.mix.values(), *self.features.values()])

    def check(self, read_points: list[str]) -> None:
        """Invariants every planner must meet; a violation is a bug, not a user error."""
        assert np.all(np.diff(self.keep) > 0), "keep must be sorted and unique"
        assert 0 < len(self.keep) <= self.size, "a group keeps at least one channel"
        for name in read_points:
            mix, offset = self.mix[name]
            assert mix.shape == (self.size, len(self.keep)), f"mix shape at {name}"
            assert offset.shape == (self.size,), f"offset shape at {name}"
            if self.method == "exact":
                assert np.allclose(mix[self.keep], np.eye(len(self.keep))), "kept rows: identity"
                assert np.allclose(offset[self.keep], 0.0), "kept channels have no offset"
        for name, (mix, offset) in self.features.items():
            assert mix.shape[0] == len(offset) and \
                mix.shape[1] * self.size == mix.shape[0] * len(self.keep), f"features at {name}"


Plan = dict[int, GroupPlan]


def removal_plan(size: int, keep: np.ndarray, read_points: list[str],
                 rows: dict[str, tuple[np.ndarray, np.ndarray]], method: str) -> GroupPlan:
    """Build a plan from per-read-point (mix, offset) rows given only for removed channels."""
    keep = np.asarray(sorted(keep), dtype=np.int64)
    mixes = {}
    for name in read_points:
        mix = np.zeros((size, len(keep)))
        mix[keep, np.arange(len(keep))] = 1.0
        offset = np.zeros(size)
        removed_mix, removed_off = rows[name]
        removed = np.setdiff1d(np.arange(size), keep)
        mix[removed] = removed_mix
        offset[removed] = removed_off
        mixes[name] = (mix, offset)
    return GroupPlan(size, keep, mixes, method)


def methods_by_producer(groups: GroupSet, plans: Plan) -> dict[str, str]:
    """The method that planned each group, keyed by its producers' node names (node names
    survive rewrites, group ids do not), for the report's groups table."""
    return {m.node: p.method for gid, p in plans.items()
            for m in groups.groups[gid].members if m.role is Role.PRODUCER}
