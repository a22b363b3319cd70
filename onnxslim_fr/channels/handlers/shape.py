"""Ops that move channels without changing them: Flatten, Reshape, Squeeze, Unsqueeze,
Transpose, Concat (and Shape / Size, which read only the dimensions). They change where
the channel axis is and how features are laid out; a Reshape target that spells out the
channel axis's size gets that number rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import Graph
from ...shape_values import target_shape
from ..context import AnalysisContext
from ..layout import Layout, concat, opaque
from ..reshape_map import move_axis
from ..structures import Unsupported
from .base import OpHandler, RewriteContext, attr
from .split import rewrites_bounds


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
    """Any Reshape that keeps the channel axis whole or merges it with its neighbours,
    told from the symbolic input and output shapes (channels/reshape_map.py), so computed
    targets (``Shape -> Gather -> Concat``) work as well as constant ones. The target entry
    for the channel axis must follow the new channel count: a literal is rewritten (in a
    private copy of the constant, or of the constant part of a Concat), -1 and 0 follow by
    themselves, and a value computed from Shape follows the shapes it reads."""

    ops = ("Reshape",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        src = ctx.graph.symbolic_shape(node.input[0])
        dst = target_shape(node, ctx.graph) or ctx.graph.symbolic_shape(node.output[0])
        if src is None or dst is None:
            raise Unsupported("Reshape with shapes shape inference cannot tell")
        move = move_axis(list(src), list(dst), lay.axis)
        if move is None or move.split:
            raise Unsupported("Reshape mixes the channel axis with other axes")
        axis = move.out_axes[0]
        if axis == 0 and lay.axis != 0:
            raise Unsupported("Reshape merges the channels into the batch axis")
        _target_entry(node, ctx.graph, axis)
        ctx.set_layout(node.output[0], lay.flattened(move.inner, move.outer).with_axis(axis))

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        return []  # the shape constant is copied privately when it changes, never shared

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        lay = rw.layout(node.output[0])
        where = _target_entry(node, rw.graph, lay.axis)
        if where is None:
            return
        holder, index, offset = where
        value = rw.graph.const(holder.input[index]).copy()
        if int(value[offset]) not in (-1, 0):
            value[offset] = rw.new_layout(node.output[0]).size
            rw.add_input(holder, index, value)


#: Ops whose integer results follow the shapes they read (index / axis inputs constant).
_SHAPE_ARITHMETIC = ("Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast",
                     "Identity", "Mul", "ReduceProd", "Size")


def _target_entry(node: onnx.NodeProto, graph: Graph, axis: int
                  ) -> tuple[onnx.NodeProto, int, int] | None:
    """(node, input index, offset) of the constant that spells the channel axis's size in
    the Reshape target, or None when the entry follows the shapes by itself; Unsupported
    when it would not follow the new channel count."""
    target = node.input[1]
    if graph.const(target) is not None:
        return node, 1, axis
    maker = graph.producer.get(target)
    if maker is not None and maker.op_type == "Concat" and graph.users(target) == 1:
        start = 0
        for k, part in enumerate(maker.input):
            length = (graph.shape(part) or (None,))[0]
            if length is None:
                break
            if start <= axis < start + length:
                if graph.const(part) is not None:
                    if graph.users(part) > 1 and int(graph.const(part)[axis - start]) > 0:
                        raise Unsupported("Reshape target constant shared with another node")
                    return maker, k, axis - start
                return _follows_shapes(part, graph)
            start += length
    return _follows_shapes(target, graph)


def _follows_shapes(name: str, graph: Graph) -> None:
    """Accept a value computed only from Shape reads and index constants."""
    todo, seen = [name], set()
    while todo:
        tensor = todo.pop()
        if tensor in seen or graph.const(tensor) is not None:
            continue
        seen.add(tensor)
        maker = graph.producer.get(tensor)
        if maker is None or maker.op_type not in _SHAPE_ARITHMETIC:
            raise Unsupported("Reshape target computed in a way that would not follow the "
                              "new channel count")
        if maker.op_type in ("Shape", "Size"):
            continue
        if maker.op_type == "Mul" and any(graph.const(i) is not None for i in maker.input):
            raise Unsupported("Reshape target scales a shape by a constant")
        todo.extend(i for i in maker.input if i)
    return None


#: Ops whose shape-like parameter inputs (index >= 1) their own handlers check.
_CHECKS_ITS_PARAMETERS = ("Reshape", "Slice", "Split")
#: Integer arithmetic a shape value may pass through on its way to such a parameter.
_SHAPE_VALUE_OPS = (*_SHAPE_ARITHMETIC, "Add", "Sub", "Div")


class ShapeHandler(OpHandler):
    """Shape and Size read only the dimensions. When their value only builds Reshape
    targets (through shape arithmetic), it follows the new channel count by itself and
    the Reshape handler checks the target; used as data anywhere else (a Size cast to
    float and multiplied in, a dimension compared), slicing would change that value, so
    the channels stay."""

    ops = ("Shape", "Size")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        todo, seen = [node.output[0]], set()
        while todo:
            tensor = todo.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            if tensor in ctx.graph.graph_outputs:
                raise Unsupported(f"{node.op_type} of the channels is a graph output")
            for user in ctx.graph.consumers.get(tensor, []):
                if user.op_type in _CHECKS_ITS_PARAMETERS and \
                        list(user.input).index(tensor) >= 1:
                    if user.op_type != "Reshape" and not rewrites_bounds(user, node.input[0],
                                                                         ctx):
                        raise Unsupported(f"{node.op_type} of the channels sets the bounds of "
                                          f"{user.op_type} node {user.name}")
                    continue  # a Reshape target or Slice / Split bound: its handler checks it
                # Add/Sub/Div (torch's chunk) pass: only a Slice / Split bound, written as a
                # constant, may take them; the Reshape handler refuses them in a target
                if user.op_type not in (*_SHAPE_ARITHMETIC, "Add", "Sub", "Div") or \
                        user.op_type in ("Shape", "Size"):
                    raise Unsupported(f"{node.op_type} of the channels is used as a value by "
                                      f"{user.op_type} node {user.name}")
                todo.extend(o for o in user.output if o)


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


HANDLERS = (FlattenHandler(), ReshapeHandler(), ShapeHandler(), SqueezeHandler(),
            TransposeHandler(), ConcatHandler())
