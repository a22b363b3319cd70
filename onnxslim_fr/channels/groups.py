"""Channel groups: one topological sweep over the graph, pure analysis, no edits.

Every tensor whose channel axis is understood gets a Layout; every node touching such a
tensor gets a role. Residual Add/Sub/Mul joins the groups of its two inputs (union-find);
anything not understood freezes the groups it touches, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import onnx

from ..graph import Graph
from .layout import Layout, Segment


class Role(Enum):
    PRODUCER = "producer"  # writes the channels: output rows are sliced
    CARRIER = "carrier"  # per-channel parameters are sliced
    CONSUMER = "consumer"  # reads the channels: the plan is folded into its weights


class Unsupported(Exception):
    """A handler cannot follow the channels through this node; the reason is shown to users."""


@dataclass
class Member:
    node: str
    role: Role
    tensor: str


@dataclass
class ChannelGroup:
    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    read_points: list[str] = field(default_factory=list)
    frozen: str | None = None


@dataclass
class GroupSet:
    """Result of the analysis: groups, each tensor's layout, each node's roles."""

    groups: dict[int, ChannelGroup]
    layouts: dict[str, Layout]
    roles: dict[str, list[Member]]

    def active(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.frozen is None]


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


def build_groups(graph: Graph) -> GroupSet:
    """Assign layouts and roles in one topological sweep; freeze what is not understood."""
    from .handlers import handler_for

    ctx = AnalysisContext(graph)
    for node in graph.nodes:
        tracked = [ctx.layout(i) for i in node.input if ctx.layout(i) is not None]
        handler = handler_for(node)
        if handler is None:
            for lay in tracked:
                ctx.freeze(lay, f"unsupported op {_op(node)} at node {node.name}")
            continue
        if not tracked and not handler.starts_group(node, graph):
            continue
        before = len(ctx._members)
        try:
            handler.propagate(node, ctx)
        except Unsupported as why:
            del ctx._members[before:]
            for out in node.output:
                ctx.layouts.pop(out, None)
            for lay in tracked:
                ctx.freeze(lay, f"{why} at node {node.name}")
            continue
        _freeze_shared_params(node, handler.params(node, graph), ctx)
    for name in graph.graph_outputs:
        ctx.freeze(ctx.layout(name), f"reaches graph output {name}")
    return ctx.finish()


def _freeze_shared_params(node: onnx.NodeProto, params: list[str], ctx: AnalysisContext) -> None:
    for name in params:
        if ctx.graph.users(name) > 1:
            others = [n.name for n in ctx.graph.consumers[name] if n.name != node.name]
            reason = f"initializer {name} shared with node {others[0] if others else '?'}"
            for tensor in [*node.input, *node.output]:
                ctx.freeze(ctx.layout(tensor), reason)


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
