"""What op handlers see during the channel sweep: layouts, union-find groups, members."""

from __future__ import annotations

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
        self._frozen: dict[int, str] = {}
        self._members: list[Member] = []

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

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self._parent[rb] = ra
        if rb in self._frozen:
            self._frozen.setdefault(ra, self._frozen.pop(rb))

    def freeze(self, layout: Layout | None, reason: str) -> None:
        for g in layout.groups() if layout else []:
            self._frozen.setdefault(self.find(g), reason)

    # layouts and roles --------------------------------------------------------------
    def layout(self, name: str) -> Layout | None:
        return self.layouts.get(name) if name else None

    def set_layout(self, name: str, layout: Layout) -> None:
        self.layouts[name] = layout

    def add_member(self, node: onnx.NodeProto, role: Role, tensor: str) -> None:
        self._members.append(Member(node.name, role, tensor))

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
        canon = {g: self.find(g) for g in range(len(self._parent))}
        layouts = {name: _canonical(lay, canon) for name, lay in self.layouts.items()}
        groups: dict[int, ChannelGroup] = {}
        for root in sorted(set(canon.values())):
            groups[root] = ChannelGroup(root, self._size[root], frozen=self._frozen.get(root))
        roles: dict[str, list[Member]] = {}
        for member in self._members:
            roles.setdefault(member.node, []).append(member)
            for gid in layouts[member.tensor].groups():
                group = groups[gid]
                group.members.append(member)
                if member.role is Role.CONSUMER and member.tensor not in group.read_points:
                    group.read_points.append(member.tensor)
        return GroupSet(groups, layouts, roles)


def _canonical(layout: Layout, canon: dict[int, int]) -> Layout:
    segs = tuple(Segment(canon[s.group], s.length, s.stride) if s.group is not None else s
                 for s in layout.segments)
    return Layout(layout.axis, segs, layout.outer)
