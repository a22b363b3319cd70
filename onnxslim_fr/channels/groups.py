"""Channel groups: one topological sweep over the graph, pure analysis, no edits.

Every tensor whose channel axis is understood gets a Layout; every node touching such a
tensor gets a role. Residual Add/Sub/Mul joins the groups of its two inputs (union-find);
anything not understood freezes the groups it touches, with the reason. A read is a read
wherever it happens: a tensor an If/Loop/Scan body reads from the outer scope freezes too.
"""

from __future__ import annotations

import onnx

from ..graph import Graph
from .context import AnalysisContext
from .handlers import handler_for
from .structures import ChannelGroup, GroupSet, Member, Role, Unsupported

__all__ = ["ChannelGroup", "GroupSet", "Member", "Role", "Unsupported", "build_groups"]


def build_groups(graph: Graph) -> GroupSet:
    """Assign layouts and roles in one topological sweep; freeze what is not understood."""
    ctx = AnalysisContext(graph)
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
        _freeze_shared_params(node, handler.params(node, graph), ctx)
    for name in graph.graph_outputs:
        ctx.freeze(ctx.layout(name), f"reaches graph output {name}")
    return ctx.finish()


def _freeze_subgraph_reads(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """An If/Loop/Scan body reading an outer tensor expects its width as it is: the sweep
    does not follow channels into subgraphs, so those channels must stay."""
    direct = set(node.input)
    for name in ctx.graph.inputs_of(node):
        if name not in direct:
            ctx.freeze(ctx.layout(name), f"read inside the subgraph of {_op(node)} node "
                                         f"{node.name}")


def _freeze_shared_params(node: onnx.NodeProto, params: list[str], ctx: AnalysisContext) -> None:
    for name in params:
        if ctx.graph.users(name) > 1:
            others = [n.name for n in ctx.graph.consumers[name] if n.name != node.name]
            reason = f"initializer {name} shared with node {others[0] if others else '?'}"
            for tensor in [*node.input, *node.output]:
                ctx.freeze(ctx.layout(tensor), reason)


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
