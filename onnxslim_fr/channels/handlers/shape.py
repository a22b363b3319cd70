"""Ops that move channels without changing them: Flatten, Reshape, Squeeze, Unsqueeze,
Transpose, Concat. They change where the channel axis is and how features are laid out;
a Reshape whose shape constant spells out the flattened size gets that number rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import Graph
from ..context import AnalysisContext
from ..layout import Layout, concat, opaque
from ..structures import Unsupported
from .base import OpHandler, RewriteContext, attr


def _merge(ctx: AnalysisContext, node: onnx.NodeProto, start: int) -> Layout:
    """Layout after merging input axes [start, rank) into one axis at `start`."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay.axis < start:
        raise Unsupported(f"{node.op_type} merges the channel axis into an earlier one")
    if lay.outer != 1 and lay.axis != start:
        raise Unsupported(f"{node.op_type} of already flattened features")
    outer = int(np.prod([ctx.dim(node.input[0], a) for a in range(start, lay.axis)]))
    inner = int(np.prod([ctx.dim(node.input[0], a) for a in range(lay.axis + 1, rank)]))
    return lay.flattened(inner, outer).with_axis(start)


class FlattenHandler(OpHandler):
    ops = ("Flatten",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        start = int(attr(node, "axis", 1)) % max(ctx.rank(node.input[0]), 1)
        if start == 0:
            raise Unsupported("Flatten(axis=0) merges channels into the batch")
        ctx.set_layout(node.output[0], _merge(ctx, node, start).with_axis(1))


class ReshapeHandler(OpHandler):
    """Only the flattening kind: output (N, features) with N the input's first axis."""

    ops = ("Reshape",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        target = ctx.graph.const(node.input[1])
        out_shape = ctx.graph.shape(node.output[0])
        if target is None or out_shape is None:
            raise Unsupported("Reshape to a computed shape")
        batch = (ctx.graph.shape(node.input[0]) or (None,))[0]
        keeps_batch = target.size == 2 and int(target[0]) in (0, -1, batch)
        if len(out_shape) != 2 or not keeps_batch:
            raise Unsupported("Reshape other than flattening to (batch, features)")
        lay = _merge(ctx, node, 1)
        if out_shape[1] is not None and out_shape[1] != lay.size:
            raise Unsupported("Reshape other than flattening to (batch, features)")
        ctx.set_layout(node.output[0], lay)

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        return []  # the shape constant is copied privately when it changes, never shared

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        target = rw.graph.const(node.input[1]).copy()
        old, new = rw.layout(node.output[0]).size, rw.new_layout(node.output[0]).size
        if int(target[1]) == old:
            target[1] = new
            rw.add_input(node, 1, target)


class SqueezeHandler(OpHandler):
    ops = ("Squeeze", "Unsqueeze")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        axes = attr(node, "axes", None)
        if axes is None:
            value = ctx.graph.const(node.input[1]) if len(node.input) > 1 else None
            if value is None:
                raise Unsupported(f"{node.op_type} axes are not constant")
            axes = value.tolist()
        if node.op_type == "Squeeze":
            rank = ctx.rank(node.input[0])
            axes = [a % rank for a in axes]
            if lay.axis in axes:
                raise Unsupported("Squeeze of the channel axis")
            axis = lay.axis - sum(1 for a in axes if a < lay.axis)
        else:
            rank = ctx.rank(node.output[0])
            axis = lay.axis
            for a in sorted(x % rank for x in axes):
                if a <= axis:
                    axis += 1
        ctx.set_layout(node.output[0], lay.with_axis(axis))


class TransposeHandler(OpHandler):
    ops = ("Transpose",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        rank = ctx.rank(node.input[0])
        perm = list(attr(node, "perm", None) or range(rank - 1, -1, -1))
        ctx.set_layout(node.output[0], lay.with_axis(perm.index(lay.axis)))


class ConcatHandler(OpHandler):
    ops = ("Concat",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        rank = ctx.rank(node.output[0])
        axis = int(attr(node, "axis", 0)) % rank
        layouts = [ctx.layout(n) for n in node.input]
        tracked = [lay for lay in layouts if lay is not None]
        if any(lay.axis != axis for lay in tracked):
            raise Unsupported("Concat along an axis other than the channels")
        if any(lay.outer != 1 for lay in tracked):
            raise Unsupported("Concat of channels-last flattened features")
        parts = [lay if lay is not None else opaque(axis, ctx.dim(name, axis))
                 for name, lay in zip(node.input, layouts, strict=True)]
        ctx.set_layout(node.output[0], concat(parts, axis))


HANDLERS = (FlattenHandler(), ReshapeHandler(), SqueezeHandler(), TransposeHandler(),
            ConcatHandler())
