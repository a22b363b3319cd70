"""Attention heads: the ops between the Q/K/V projections and the output projection.

A Reshape ``[B, T, H*d] -> [B, T, H, d]`` makes each channel of the Q, K and V groups a
head of d features (handlers/shape.py, channels/context.py). From there on the head axis
is a *batch* axis of every op: ``MatMul(Q, Kᵀ)`` contracts d within each head, the scale,
the additive mask (broadcast over heads) and Softmax (over the key axis) act on each head
alone, ``MatMul(P, V)`` combines one head's probabilities with the same head's values.
So Q, K and V become one group (the batched MatMuls unite them), read by the output
projection after the Reshape back to ``[B, T, H*d]``; removing a head slices the Q, K and
V rows and the output projection's columns, and rewrites the H in the Reshape targets.

    q, k, v: (G, 4, stride 16) -> Reshape -> (G, 4) on axis 2 -> Transpose -> axis 1
    MatMul(q, kᵀ) unites q's and k's groups; MatMul(p, v) unites p's and v's
    Transpose, Reshape [B, T, 64] -> (G, 4, stride 16): the output projection reads it

Ops that are not understood (fused ``com.microsoft.Attention``, heads merged with the
batch axis) freeze the groups they touch, with the reason.
"""

from __future__ import annotations

import onnx

from ..context import AnalysisContext
from ..layout import Layout
from ..structures import Unsupported
from .base import OpHandler, attr, require_plain


def batched_matmul(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """MatMul of two computed tensors whose channels sit on a batch axis (heads): each
    channel's output reads only that channel of each input, so both inputs must be one
    group, at the same batch axis; a side with no channels must broadcast along it."""
    a, b = (ctx.layout(n) for n in node.input[:2])
    ranks = [ctx.rank(n) for n in node.input[:2]]
    out_rank = ctx.rank(node.output[0])
    tracked = [(lay, r, name) for lay, r, name in zip((a, b), ranks, node.input[:2],
                                                     strict=True) if lay is not None]
    axes = {out_rank - r + lay.axis for lay, r, _ in tracked}  # aligned from the end
    if len(axes) != 1 or any(lay.axis >= r - 2 for lay, r, _ in tracked):
        raise Unsupported("MatMul of two computed tensors with channels on a matrix axis")
    axis = axes.pop()
    for lay, _, name in tracked:
        require_plain(ctx, name)
        if any(ctx.unit(g) == 1 for g in lay.groups()):
            raise Unsupported("MatMul of two computed tensors whose channels are not "
                              "attention heads")
    if a is not None and b is not None:
        lay = ctx.unify(a, b, "MatMul")
    else:
        lay = a if a is not None else b
        other = node.input[1] if a is not None else node.input[0]
        other_rank = ranks[1] if a is not None else ranks[0]
        pos = axis - (out_rank - other_rank)
        if pos >= 0 and ctx.dim(other, pos) != 1:
            raise Unsupported("MatMul of channels with a computed tensor that varies along "
                              "the channel axis")
    ctx.set_layout(node.output[0], Layout(axis, lay.segments))


def broadcast_join(node: onnx.NodeProto, ctx: AnalysisContext, tracked: int) -> bool:
    """Add / Sub / Mul of channels with a computed tensor of no channels (the attention
    mask) that is broadcast along the channel axis: every channel gets the same values,
    so channels pass as they are. Only for heads: exact lumping reasons about them as
    whole heads (lumping/exact.py), never through per-channel relations. False when it
    does not apply (the caller then refuses the op)."""
    lay = ctx.layout(node.input[tracked])
    other = node.input[1 - tracked]
    if node.op_type not in ("Add", "Sub", "Mul") or not lay.groups() or \
            any(ctx.unit(g) == 1 for g in lay.groups()):
        return False
    shape = ctx.graph.shape(other)
    rank = ctx.rank(node.input[tracked])
    if shape is None or ctx.rank(node.output[0]) != rank:
        return False
    pos = lay.axis - (rank - len(shape))
    if pos >= 0 and shape[pos] != 1:
        return False
    ctx.set_layout(node.output[0], lay)
    return True


class SoftmaxHandler(OpHandler):
    """Softmax over an axis other than the heads: each head normalizes its own scores."""

    ops = ("Softmax",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        rank = ctx.rank(node.input[0])
        opset = next((o.version for o in ctx.graph.model.opset_import
                      if o.domain in ("", "ai.onnx")), 13)
        axis = int(attr(node, "axis", -1 if opset >= 13 else 1)) % rank
        if opset < 13 and axis <= lay.axis:
            raise Unsupported(f"{node.op_type} before opset 13 flattens the channel axis")
        if axis == lay.axis:
            raise Unsupported(f"unsupported op {node.op_type} over the channel axis")
        if any(ctx.unit(g) == 1 for g in lay.groups()):
            raise Unsupported(f"unsupported op {node.op_type} on channels that are not "
                              "attention heads")
        ctx.set_layout(node.output[0], lay)


class HeadSelectHandler(OpHandler):
    """``Where(IsNaN(P), 0, P)`` after Softmax (scaled_dot_product_attention with a mask,
    both exporters; a fully masked row is NaN) and ``Where(mask, scores, -inf)``: element
    by element, so each head's values come from the same head of the tracked inputs (one
    group, at one axis) and from untracked inputs broadcast along the heads. Heads only,
    like Softmax: exact lumping reasons about whole heads, not per-channel relations."""

    ops = ("IsNaN", "Where")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        rank = ctx.rank(node.output[0])
        tracked = [(n, ctx.layout(n)) for n in node.input if ctx.layout(n) is not None]
        lay = tracked[0][1]
        for name, other in tracked:
            if ctx.rank(name) != rank or other.axis != lay.axis or \
                    any(ctx.unit(g) == 1 for g in other.groups()):
                raise Unsupported(f"{node.op_type} of channels that are not attention heads")
            lay = ctx.unify(lay, other, node.op_type) if other is not lay else lay
        for name in node.input:
            shape = ctx.graph.shape(name) if ctx.layout(name) is None else None
            if ctx.layout(name) is None and (shape is None or (
                    lay.axis - (rank - len(shape)) >= 0 and
                    shape[lay.axis - (rank - len(shape))] != 1)):
                raise Unsupported(f"{node.op_type} with a tensor that varies along the heads")
        ctx.set_layout(node.output[0], lay)


HANDLERS = (SoftmaxHandler(), HeadSelectHandler())
