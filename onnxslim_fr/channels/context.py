"""What op handlers see during the channel sweep: layouts, groups, members.

Groups live in a union-find that can also be *refined*: a Split or Slice that takes
channels [a, b) of a group cuts it into pieces, and each piece is a group of its own
(its own keep set) everywhere the group appears: in the producer's output, in carriers,
in residual partners already united with it, in flattened segments. A refined group keeps
its id as the parent of its pieces; `leaves` expands an id into the current pieces, so
layouts stored before a refinement read correctly after it.

    conv -> (A, 8) ; Split [3, 5] refines A into pieces A1 (3), A2 (5)
    conv output now reads (A1, 3), (A2, 5); a residual Add with (B, 8) refines B alike
    and unites A1 with B1, A2 with B2.

A group can also be *coarsened*: a Reshape that splits its channel axis into heads
(``[B, T, H*d] -> [B, T, H, d]``) makes each channel a head of d features, everywhere the
group appears, so plans keep or remove whole heads:

    q = MatMul(x, Wq) -> (Q, 64) ; Reshape [B, T, 4, 16] coarsens Q to 4 channels
    q now reads (Q, 4, stride 16); the reshaped tensor's axis 2 reads (Q, 4)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from itertools import pairwise

import onnx

from ..graph import Graph
from .layout import Layout, Segment
from .structures import ChannelGroup, GroupSet, Member, Role, Unsupported


class AnalysisContext:
    """What handlers see and may change while the sweep runs."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.layouts: dict[str, Layout] = {}
        self._parent: list[int] = []
        self._size: list[int] = []
        self._pieces: dict[int, list[int]] = {}  # refined root -> its pieces, in order
        self._frozen: dict[int, str] = {}  # leaf -> reason
        self._members: list[Member] = []
        self._ties: list[list[str]] = []
        self._unit: dict[int, int] = {}  # coarsened leaf -> features per channel

    # groups -------------------------------------------------------------------------
    def new_group(self, size: int) -> int:
        self._parent.append(len(self._parent))
        self._size.append(size)
        return len(self._parent) - 1

    def find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def leaves(self, g: int) -> list[int]:
        """The unrefined groups `g` consists of now, in channel order."""
        out, todo = [], [self.find(g)]
        while todo:
            root = self.find(todo.pop())
            if root in self._pieces:
                todo.extend(reversed(self._pieces[root]))
            else:
                out.append(root)
        return out

    def refine(self, g: int, cuts: Iterable[int]) -> list[int]:
        """Cut group `g` at channel offsets `cuts` (relative to g); returns its leaves."""
        start = 0
        for leaf in self.leaves(g):
            size = self._size[leaf]
            inner = sorted({c - start for c in cuts if start < c < start + size})
            if inner:
                self._split_leaf(leaf, inner)
            start += size
        return self.leaves(g)

    def _split_leaf(self, leaf: int, cuts: list[int]) -> None:
        bounds = [0, *cuts, self._size[leaf]]
        pieces = [self.new_group(b - a) for a, b in pairwise(bounds)]
        self._pieces[leaf] = pieces
        if leaf in self._unit:
            self._unit.update(dict.fromkeys(pieces, self._unit[leaf]))
        reason = self._frozen.pop(leaf, None)
        if reason is not None:
            for p in pieces:
                self._frozen[p] = reason

    def union(self, a: int, b: int) -> None:
        """Make `a` and `b` one group. Refined groups are first cut to their common
        refinement, then united piece by piece."""
        if self._size[self.find(a)] != self._size[self.find(b)]:
            raise Unsupported("joins channel groups of different sizes")
        la, lb = self.leaves(a), self.leaves(b)
        while self._offsets(la) != self._offsets(lb):  # until no cut adds another (a and b
            self.refine(a, self._offsets(lb))           # may share pieces)
            self.refine(b, self._offsets(la))
            la, lb = self.leaves(a), self.leaves(b)
        for x, y in zip(la, lb, strict=True):
            self._union_roots(self.find(x), self.find(y))
        ra, rb = self.find(a), self.find(b)
        if ra != rb and ra in self._pieces and rb in self._pieces:
            self._parent[rb] = ra

    def _offsets(self, leaves: list[int]) -> list[int]:
        """Where the leaves after the first start, relative to their group."""
        out, pos = [], 0
        for leaf in leaves[:-1]:
            pos += self._size[leaf]
            out.append(pos)
        return out

    def _union_roots(self, ra: int, rb: int) -> None:
        if ra == rb:
            return
        if self._unit.get(ra, 1) != self._unit.get(rb, 1):
            raise Unsupported("joins attention heads with channels of another width")
        self._parent[rb] = ra
        if rb in self._frozen:
            self._frozen.setdefault(ra, self._frozen.pop(rb))

    def freeze(self, layout: Layout | None, reason: str) -> None:
        for g in layout.groups() if layout else []:
            for leaf in self.leaves(g):
                self._frozen.setdefault(leaf, reason)

    def unit(self, g: int) -> int:
        """Features per channel of group `g` (head_dim once coarsened into heads)."""
        return self._unit.get(self.find(g), 1)

    def coarsen(self, layout: Layout, unit: int) -> Layout:
        """Count the groups of `layout` (a plain channel axis) in channels of `unit`
        features from now on, in every stored layout; returns `layout` so counted. A group
        already counted so stays; Unsupported when a run is not whole blocks of `unit`."""
        lay = self.expand(layout)
        if lay.outer != 1:
            raise Unsupported("heads of channels-last flattened features")
        todo: set[int] = set()
        for seg, start in zip(lay.segments, lay.boundaries(), strict=False):
            size = seg.length * seg.stride
            if size % unit or start % unit:
                raise Unsupported(f"channels split into blocks of {unit} that cut a group")
            if seg.group is None or (seg.stride == unit and self.unit(seg.group) == unit):
                continue
            if seg.stride != 1 or self.unit(seg.group) != 1:
                raise Unsupported("channels split into heads of another width")
            todo.add(seg.group)
        if todo:
            self.layouts = {n: self._coarsened(self.expand(v), todo, unit)
                            for n, v in self.layouts.items()}
            for g in todo:
                self._size[g] //= unit
                self._unit[g] = unit
        return self._coarsened(lay, todo, unit)

    @staticmethod
    def _coarsened(lay: Layout, groups: set[int], unit: int) -> Layout:
        segs = tuple(Segment(s.group, s.length // unit, s.stride * unit)
                     if s.group in groups else s for s in lay.segments)
        return Layout(lay.axis, segs, lay.outer)

    # refinement of layouts ------------------------------------------------------------
    def expand(self, layout: Layout) -> Layout:
        """`layout` with every group replaced by its current pieces (canonical ids)."""
        segs: list[Segment] = []
        for s in layout.segments:
            if s.group is None:
                segs.append(s)
                continue
            segs.extend(Segment(leaf, self._size[leaf], s.stride) for leaf in self.leaves(s.group))
        return Layout(layout.axis, tuple(segs), layout.outer)

    def cut(self, layout: Layout, points: Iterable[int]) -> Layout:
        """Refine the groups of `layout` so that every element offset in `points` (within
        one repeat of the axis) falls on a segment boundary; returns the refined layout.
        Unsupported when a point falls inside one channel's flattened features."""
        points = sorted(set(points))
        lay = self.expand(layout)
        for seg, lo, hi in zip(lay.segments, lay.boundaries()[:-1], lay.boundaries()[1:],
                               strict=True):
            inner = [p - lo for p in points if lo < p < hi]
            if any(p % seg.stride for p in inner):
                raise Unsupported("cut inside one channel's flattened features")
            if inner and seg.group is not None:
                self.refine(seg.group, [p // seg.stride for p in inner])
        lay = self.expand(lay)
        segs: list[Segment] = []
        for seg, lo, hi in zip(lay.segments, lay.boundaries()[:-1], lay.boundaries()[1:],
                               strict=True):
            inner = [lo, *(p for p in points if lo < p < hi), hi]
            segs.extend(replace(seg, length=(b - a) // seg.stride) for a, b in pairwise(inner))
        return Layout(lay.axis, tuple(segs), lay.outer)

    def unify(self, a: Layout, b: Layout, what: str) -> Layout:
        """Join two layouts element by element (residual Add, a shared weight): both are
        cut at each other's boundaries, then the groups at the same place are united.
        Returns the joined layout (`a`'s axis)."""
        if a.outer != b.outer or a.unit != b.unit:
            raise Unsupported(f"{what} of tensors with different channel layouts")
        points: set[int] = set()
        while True:  # cutting one may cut the other again where they share a group
            ca, cb = self.cut(a, points), self.cut(b, points)
            if set(ca.boundaries()) | set(cb.boundaries()) <= points:
                break
            points |= set(ca.boundaries()) | set(cb.boundaries())
        for sa, sb in zip(ca.segments, cb.segments, strict=True):
            if (sa.group is None) != (sb.group is None):
                raise Unsupported(f"{what} of tracked and untracked channels")
            if sa.stride != sb.stride:
                raise Unsupported(f"{what} of tensors with different channel layouts")
        for sa, sb in zip(ca.segments, cb.segments, strict=True):
            if sa.group is not None:
                self.union(sa.group, sb.group)
        return self.expand(ca)

    # layouts and roles --------------------------------------------------------------
    def layout(self, name: str) -> Layout | None:
        """The tensor's layout with its groups' current pieces."""
        lay = self.layouts.get(name) if name else None
        return self.expand(lay) if lay is not None else None

    def set_layout(self, name: str, layout: Layout) -> None:
        self.layouts[name] = layout

    def add_member(self, node: onnx.NodeProto, role: Role, tensor: str) -> None:
        self._members.append(Member(node.name, role, tensor))

    def roles(self, node: onnx.NodeProto) -> list[Member]:
        return [m for m in self._members if m.node == node.name]

    def tie(self, tensors: list[str]) -> None:
        """Read points whose consumers share one weight: one plan must hold at all of them."""
        self._ties.append(list(dict.fromkeys(tensors)))

    def rank(self, name: str) -> int:
        shape = self.graph.shape(name)
        if shape is None:
            raise Unsupported(f"unknown rank of {name}")
        return len(shape)

    def dim(self, name: str, axis: int) -> int:
        shape = self.graph.shape(name)
        if shape is None or shape[axis] is None:
            raise Unsupported(f"dynamic dimension {axis} of {name}")
        return int(shape[axis])

    # result ---------------------------------------------------------------------------
    def finish(self) -> GroupSet:
        layouts = {name: self.expand(lay) for name, lay in self.layouts.items()}
        groups: dict[int, ChannelGroup] = {}
        for g in range(len(self._parent)):
            if self._parent[g] == g and g not in self._pieces:
                groups[g] = ChannelGroup(g, self._size[g], frozen=self._frozen.get(g),
                                         unit=self._unit.get(g, 1))
        roles: dict[str, list[Member]] = {}
        for member in self._members:
            roles.setdefault(member.node, []).append(member)
            for gid in dict.fromkeys(layouts[member.tensor].groups()):
                group = groups[gid]
                group.members.append(member)
                if member.role is Role.CONSUMER and member.tensor not in group.read_points:
                    group.read_points.append(member.tensor)
        for tied in self._ties:
            for gid in dict.fromkeys(g for t in tied for g in layouts[t].groups()):
                points = [t for t in tied if gid in layouts[t].groups()]
                if len(points) > 1:
                    groups[gid].ties.append(points)
        return GroupSet(groups, layouts, roles)
