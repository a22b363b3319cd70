"""Channel groups: one topological sweep over the graph, pure analysis, no edits.

Every tensor whose channel axis is understood gets a Layout; every node touching such a
tensor gets a role. Residual Add/Sub/Mul joins the groups of its two inputs (union-find);
Split/Slice refine a group into pieces. Anything not understood freezes the groups it
touches, with the reason. A read is a read wherever it happens: a tensor an If/Loop/Scan
body reads from the outer scope freezes too.

One initializer read by several nodes (a time-distributed Dense unrolled into MatMuls
sharing a weight, a Conv applied twice) is slimmed once for all of them: the channels it
writes (producer rows, carrier vectors) become one group, and the read points of the
consumers that fold plans into it are tied (one plan must hold at all of them). Where
that cannot be arranged the groups freeze, with the reason.
"""

from __future__ import annotations

import onnx

from ..graph import Graph, normalize
from .context import AnalysisContext
from .handlers import handler_for
from .handlers.linear import LinearHandler
from .layout import Layout
from .structures import ChannelGroup, GroupSet, Member, Role, Unsupported

__all__ = ["ChannelGroup", "GroupSet", "Member", "Role", "Unsupported", "build_groups",
           "kept_channels"]


def build_groups(graph: Graph) -> GroupSet:
    """Assign layouts and roles in one topological sweep; freeze what is not understood."""
    ctx = AnalysisContext(graph)
    editors: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.nodes:
        tracked = [ctx.layout(i) for i in node.input if ctx.layout(i) is not None]
        _freeze_subgraph_reads(node, ctx)
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
        for name in handler.params(node, graph):
            editors.setdefault(name, []).append(node)
    for name, nodes in editors.items():
        if graph.users(name) > 1:
            _share_param(name, nodes, ctx)
    for name in graph.graph_outputs:
        ctx.freeze(ctx.layout(name), f"reaches graph output {name}")
    return ctx.finish()


def kept_channels(first: GroupSet, final: Graph) -> dict[int, int]:
    """Channels (whole heads for head groups) each group of `first` still has in the slimmed
    model `final`, measured on its producer's output there (producer names survive rewrites,
    and a Split refines the slimmed model at the same places, since every piece keeps a
    channel). Counted in features, then divided by the features of one channel: a slimmed
    model may no longer see heads (one head left), and a packed Q/K/V in-projection holds
    the group three times."""
    if all(len(first.layouts[m.tensor].segments) < 2 for g in first.groups.values()
           for m in g.members if m.role is Role.PRODUCER):
        return {}  # no producer writes pieces: its output channels tell every group
    model = onnx.ModelProto()
    model.CopyFrom(final.model)
    final = Graph(normalize(model))  # the unchanged model comes back as it was given
    now = build_groups(final)
    nodes = {n.name: n for n in final.nodes}
    kept = {}
    for g in first.groups.values():
        m = next((m for m in g.members if m.role is Role.PRODUCER), None)
        node = nodes.get(m.node) if m is not None else None
        if node is not None:
            n = _kept(first.layouts[m.tensor], g.id, now.layouts.get(node.output[0]),
                      handler_for(node).out_channels(node, final))
            if n is not None:
                kept[g.id] = n
    return kept


def _kept(before: Layout, gid: int, after: Layout | None, written: int | None) -> int | None:
    """Channels of group `gid` in the producer's slimmed output, whose layout was `before`
    and is `after` now (None: not analysed); `written`: the features it writes now."""
    segs = before.segments
    k = next(i for i, s in enumerate(segs) if s.group == gid)
    per = segs[k].stride  # features of one channel (head_dim on a head group's producer)
    if after is not None and len(after.segments) == len(segs):
        return after.segments[k].length * after.segments[k].stride // per
    if all(s.group == gid for s in segs):  # the group alone, once or packed several times
        total = after.unit if after is not None else written
        return None if total is None else total // (len(segs) * per)
    return None


def _freeze_subgraph_reads(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """An If/Loop/Scan body reading an outer tensor expects its width as it is: the sweep
    does not follow channels into subgraphs, so those channels must stay."""
    direct = set(node.input)
    for name in ctx.graph.inputs_of(node):
        if name not in direct:
            ctx.freeze(ctx.layout(name), f"read inside the subgraph of {_op(node)} node "
                                         f"{node.name}")


def _share_param(name: str, editors: list[onnx.NodeProto], ctx: AnalysisContext) -> None:
    """Make every node that edits the shared initializer `name` edit it the same way."""
    ids = {id(n) for n in editors}
    others = [n.name for n in ctx.graph.consumers[name] if id(n) not in ids]
    touched = [ctx.layout(t) for n in editors for t in [*n.input, *n.output]]
    if others:  # a reader that would not follow the edit
        for lay in touched:
            ctx.freeze(lay, f"initializer {name} shared with node {others[0]}")
        return
    if len(editors) < 2:
        return
    written = [n.output[0] for n in editors if _writes(n, ctx)]
    try:
        for t in written[1:]:
            ctx.unify(ctx.layout(written[0]), ctx.layout(t), f"initializer {name}")
    except Unsupported:
        for lay in touched:
            ctx.freeze(lay, f"initializer {name} shared with node {editors[1].name} "
                            "writes different channels")
    _tie_reads(name, [n for n in editors if _folds(n, name)], ctx)


def _tie_reads(name: str, users: list[onnx.NodeProto], ctx: AnalysisContext) -> None:
    """Consumers folding plans into one weight must read one group under one plan."""
    reads = [n.input[0] for n in users if any(m.role is Role.CONSUMER for m in ctx.roles(n))]
    if not reads:
        return
    blind = [n.name for n in users if n.input[0] not in reads]
    try:
        if blind:
            raise Unsupported(blind[0])
        for t in reads[1:]:
            ctx.unify(ctx.layout(reads[0]), ctx.layout(t), f"initializer {name}")
    except Unsupported:
        other = blind[0] if blind else users[1].name
        for t in reads:
            ctx.freeze(ctx.layout(t), f"initializer {name} shared with node {other} reads "
                                      "different channels")
        return
    ctx.tie(reads)


def _writes(node: onnx.NodeProto, ctx: AnalysisContext) -> bool:
    """Whether the node's parameters are indexed by its output channels."""
    return any(m.role in (Role.PRODUCER, Role.CARRIER) and m.tensor == node.output[0]
               for m in ctx.roles(node))


def _folds(node: onnx.NodeProto, name: str) -> bool:
    """Whether `name` is the weight a consumer folds its input plan into."""
    return isinstance(handler_for(node), LinearHandler) and len(node.input) > 1 \
        and node.input[1] == name


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
