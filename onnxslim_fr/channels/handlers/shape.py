"""Ops that move channels without changing them: Flatten, Reshape, Squeeze, Unsqueeze,
Transpose, Concat (and Shape / Size, which read only the dimensions). They change where
the channel axis is and how features are laid out; a Reshape target that spells out the
channel axis's size gets that number rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...errors import InternalError
from ...graph import Graph
from ...shape_taint import channel_dependent
from ...shape_values import target_shape, value_of
from ..context import AnalysisContext
from ..layout import Layout, Segment, concat, opaque
from ..reshape_map import AxisMove, move_axis, unify
from ..structures import Unsupported
from .base import OpHandler, RewriteContext, attr
from .normalization import GROUP_NORM_DECOMPOSED, decomposed_group_norm
from .packed import (
    batch_heads,
    end_target,
    follows_heads,
    merged_heads,
    packed_split,
    packed_target,
    start_target,
)
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
        if merged_heads(node, ctx) or batch_heads(node, ctx):
            return
        move = move_axis(list(src), list(dst), lay.axis)
        if move is None:
            raise Unsupported(GROUP_NORM_DECOMPOSED if decomposed_group_norm(node, ctx.graph)
                              else _why_mixed(list(dst)))
        if move.split:
            if len(move.split) != 2 or not packed_split(node, ctx, *move.split,
                                                        move.out_axes[0]):
                _split_heads(node, ctx, move)
            return
        axis = move.out_axes[0]
        if axis == 0 and lay.axis != 0:
            raise Unsupported("Reshape merges the channels into the batch axis")
        _target_entry(node, ctx.graph, axis)
        ctx.set_layout(node.output[0], lay.flattened(move.inner, move.outer).with_axis(axis))

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        return []  # the shape constant is copied privately when it changes, never shared

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        if not _tracked(rw, node.output[0]) or not _tracked(rw, node.input[0]):
            _rewrite_chain_end(node, rw)
            return
        lay = rw.layout(node.output[0])
        # shapes from the analysis graph: a refit stage's slice of the model has none
        where = _target_entry(node, rw.analysis, lay.axis)
        if where is None:
            return
        holder, index, offset = where
        if holder is not node and not any(n.name == holder.name for n in rw.graph.nodes) \
                and _private_target(node, rw.analysis, lay.axis) is not None:
            offset = None  # a slice of the model (probe, refit stage) reads the target
        if offset is None:  # the entry sits in a shared or computed target: a private one
            size = rw.new_layout(node.output[0]).size
            rw.add_input(node, 1, np.asarray(_private_target(node, rw.analysis, lay.axis, size),
                                             dtype=np.int64))
            rw.set_attr(node, "allowzero", None)
            return
        value = rw.analysis.const(holder.input[index]).copy()
        if int(value[offset]) not in (-1, 0):
            value[offset] = rw.new_layout(node.output[0]).size
            rw.add_input(holder, index, value)


def _tracked(rw: RewriteContext, name: str) -> bool:
    try:
        rw.layout(name)
    except KeyError:
        return False
    return True


def _rewrite_chain_end(node: onnx.NodeProto, rw: RewriteContext) -> None:
    """First or last Reshape of a chain whose inner tensors have no layout (packed.py)."""
    layout_of = lambda name: rw.layout(name) if _tracked(rw, name) else None  # noqa: E731
    if _tracked(rw, node.output[0]):
        lay = rw.new_layout(node.output[0])
        target = end_target(node, rw.analysis, lay.axis, lay.channels)
        follows = follows_heads(node, rw.analysis, layout_of, rw.layout(node.output[0]),
                                lay.axis, rw.layout(node.output[0]).channels)
    else:
        axis = rw.layout(node.input[0]).axis
        grows = len(rw.analysis.shape(node.output[0]) or ()) > len(
            rw.analysis.shape(node.input[0]) or ())
        target = (packed_target if grows else start_target)(node, rw.analysis, axis)
        follows = not grows and follows_heads(node, rw.analysis, layout_of,
                                              rw.layout(node.input[0]), None, axis - 1)
    if target is None and follows:
        return  # a computed target that reads the new head count by itself
    if target is None:
        raise InternalError(f"Reshape {node.name}: no private target")
    rw.add_input(node, 1, np.asarray(target, dtype=np.int64))
    rw.set_attr(node, "allowzero", None)


#: Ops whose integer results follow the shapes they read (index / axis inputs constant).
_SHAPE_ARITHMETIC = ("Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast",
                     "Identity", "Mul", "ReduceProd", "Size")


def _target_entry(node: onnx.NodeProto, graph: Graph, axis: int
                  ) -> tuple[onnx.NodeProto, int, int | None] | None:
    """(node, input index, offset) of the constant that spells the channel axis's size in
    the Reshape target, or None when the entry follows the shapes by itself; offset None:
    the entry is a literal in a target shared with other Reshapes (dynamo writes one
    ``[B, T, 4, 16]`` for every layer) or computed, so the rewrite gives this Reshape a
    private target (`_private_target`). Unsupported when it would not follow the new
    channel count."""
    target = node.input[1]
    if graph.const(target) is not None:
        return node, 1, axis
    maker = graph.producer.get(target)
    if maker is not None and maker.op_type == "Concat":
        start = 0
        for k, part in enumerate(maker.input):
            length = (graph.shape(part) or (None,))[0]
            if length is None:
                break
            if start <= axis < start + length:
                if graph.const(part) is not None:
                    # a literal in a part or a Concat other nodes read too: not here
                    if int(graph.const(part)[axis - start]) > 0 and \
                            max(graph.users(part), graph.users(target)) > 1:
                        return _privately(node, graph, axis)
                    return maker, k, axis - start
                if _private_target(node, graph, axis) is not None:
                    return node, 1, None  # a shape read elsewhere may not follow
                return _follows_shapes(part, graph)
            start += length
    value = value_of(target, graph)
    if value is not None and axis < len(value) and isinstance(value[axis], int) \
            and value[axis] > 0 and _private_target(node, graph, axis) is not None:
        return node, 1, None  # a literal here (or a static size) would not follow
    return _follows_shapes(target, graph)


def _privately(node: onnx.NodeProto, graph: Graph, axis: int) -> tuple[onnx.NodeProto, int, None]:
    if _private_target(node, graph, axis) is None:
        raise Unsupported("Reshape target spells the channel count in a value shared with "
                          "other nodes")
    return node, 1, None


def _private_target(node: onnx.NodeProto, graph: Graph, axis: int, size: int | None = None
                    ) -> list[int] | None:
    """A constant target that follows any channel count: 0 (copy the input dimension)
    before the channel axis, -1 on it, the literal sizes after it (the rewrite drops
    allowzero: no 0 in it means a zero size). One dimension before it that is not the
    input's at the same index (``[T, B, H, d] -> [T*B, H*d]``) takes the -1 instead, and
    the channel axis its new size `size` (the current one while analysing). None when
    that does not work or a dimension after it is not a known number."""
    src = graph.symbolic_shape(node.input[0])
    dst = target_shape(node, graph) or graph.symbolic_shape(node.output[0])
    if src is None or dst is None:
        return None
    dst = unify(list(src), list(dst))  # one unmatched symbol each: the same size
    after = list(dst[axis + 1:])
    start = _channel_start(list(src), list(dst[axis:]))
    if start is None or not all(isinstance(d, int) and d > 0 for d in after):
        return None
    # GPT-2's ['B*16', C] -> [B, 16, C]: [-1, 16, C]; tf2onnx's [X, C] -> [B, 16, 16, C] too.
    # 0 copies an input dimension before the channels only: at or after them it would
    # copy the channel count (['B*16', 16] -> [B, 16, 16] is not [-1, 0, 16])
    before = [0 if i < start and src[i] == dst[i] else dst[i]
              if isinstance(dst[i], int) and dst[i] > 0 else -1 for i in range(axis)]
    if before.count(-1) > 1:
        return None
    channel = -1
    if -1 in before:
        channel = size if size is not None else dst[axis]
        if not isinstance(channel, int) or channel <= 0:
            return None
    return before + [channel] + [int(d) for d in after]


def _channel_start(src: list, tail: list) -> int | None:
    """The first input axis of the shortest run at the end of `src` holding as many
    elements as `tail` (the output's channel axis and what follows it), or None."""
    if not all(isinstance(d, int) for d in tail):
        return None
    want, have = int(np.prod(tail)), 1
    for k in range(len(src) - 1, -1, -1):
        if not isinstance(src[k], int):
            return None
        have *= src[k]
        if have == want:
            return k
        if have > want:
            return None
    return None


def _why_mixed(dst: list) -> str:
    """The reason a Reshape's channel axis cannot be followed, as precise as the shapes
    allow: heads merged with the batch (``[T, B*H, d]``, nn.MultiheadAttention) say so, and
    so do a CNN's planes moved into the batch (``[B*C, 1, H, W]``)."""
    if any(isinstance(d, str) and "*" in d for d in dst):
        if len(dst) != 3:
            return "Reshape merges the channel axis into the batch axis"
        return ("Reshape merges attention heads with the batch axis ([T, B*H, d] layout); "
                "heads are followed in the [B, T, H, d] layout only")
    return "Reshape mixes the channel axis with other axes"


def _split_heads(node: onnx.NodeProto, ctx: AnalysisContext, move: AxisMove) -> None:
    """``[B, T, H*d] -> [B, T, H, d]``: the channels become heads of d features (the
    groups are coarsened, channels/context.py); the head axis carries them, d stays
    whole. The target's H entry is rewritten like any channel count."""
    if len(move.out_axes) != 2 or move.out_axes[1] != move.out_axes[0] + 1:
        raise Unsupported("Reshape splits the channel axis into more than two axes")
    head_axis, unit = move.out_axes[0], int(move.split[1])
    if head_axis == 0:
        raise Unsupported("Reshape splits the channels into the batch axis")
    if unit < 2:
        raise Unsupported("Reshape splits the channel axis into heads of one feature")
    _target_entry(node, ctx.graph, head_axis)
    lay = ctx.coarsen(ctx.layout(node.input[0]), unit)
    segs = tuple(Segment(s.group, s.length, s.stride // unit) if s.group is not None
                 else Segment(None, s.length * s.stride // unit) for s in lay.segments)
    ctx.set_layout(node.output[0], Layout(head_axis, segs))


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
        # values that read only other dimensions (the batch size of an LSTM state) stay
        dependent = channel_dependent(node, ctx.layout(node.input[0]).axis, ctx.graph)
        todo, seen = [t for t in node.output[:1] if t in dependent], set()
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
                if user.op_type == "Resize" and list(user.input).index(tensor) == 3 and \
                        user.input[0] == node.input[0]:
                    continue  # its own sizes: the Resize handler checks they follow it
                # Add/Sub/Div (torch's chunk) pass: only a Slice / Split bound, written as a
                # constant, may take them; the Reshape handler refuses them in a target
                if user.op_type not in (*_SHAPE_ARITHMETIC, "Add", "Sub", "Div") or \
                        user.op_type in ("Shape", "Size"):
                    raise Unsupported(f"{node.op_type} of the channels is used as a value by "
                                      f"{user.op_type} node {user.name}")
                todo.extend(o for o in user.output if o in dependent)


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
