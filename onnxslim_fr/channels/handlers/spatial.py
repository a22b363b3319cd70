"""Pooling, Pad, Resize and spatial reductions: each channel is mapped over positions alone.

Average-like ops are linear, so scaling of either sign and constant shifts pass through;
max-like ops commute with positive scaling only. Constant padding (Pad, pooling that counts
pads) breaks constant shifts at the borders, and a nonzero pad value c breaks scaling too:
``Pad_c(x) = Pad_0(x - c) + c``, so 2x stays related to x only when c == 0.
"""

from __future__ import annotations

import onnx

from ...graph import Graph
from ...shape_taint import entry_taints, shape_reads
from ...shape_values import value_of
from ..context import AnalysisContext
from ..structures import Unsupported
from .base import OpHandler, Spatial, Transfer, attr, require_plain


def _axes(node: onnx.NodeProto, graph: Graph) -> list[int] | None:
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.const(node.input[1])
        if value is None:
            raise Unsupported(f"{node.op_type} axes are not constant")
        axes = value.tolist()
    if axes is None or not len(axes):  # no or empty axes: every axis, or none at all
        if attr(node, "noop_with_empty_axes", 0):
            raise Unsupported(f"{node.op_type} with empty axes that does nothing")
        return None
    return None if axes is None else [int(a) for a in axes]


class PoolHandler(OpHandler):
    ops = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
           "GlobalLpPool")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        if lay.axis != 1:
            raise Unsupported(f"{node.op_type} pools per channel of axis 1, channels are on "
                              f"axis {lay.axis}")
        require_plain(ctx, node.input[0])
        if len(node.output) > 1 and ctx.graph.consumers.get(node.output[1]):
            raise Unsupported("MaxPool indices are used")
        ctx.set_layout(node.output[0], lay)

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        op = node.op_type
        padded = any(attr(node, "pads", None) or []) or \
            attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
        if "Max" in op:
            return Spatial(linear=False, keeps_offset=True)
        if "Lp" in op:
            return Spatial(linear=False, keeps_offset=False)
        counts_pads = bool(attr(node, "count_include_pad", 0))
        return Spatial(linear=True, keeps_offset=not (padded and counts_pads))


class ReduceHandler(OpHandler):
    """ReduceMean / ReduceMax / ReduceSum over positions only (Keras' global pooling,
    torch's ``x.sum((2, 3))``)."""

    ops = ("ReduceMean", "ReduceMax", "ReduceSum")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        rank = ctx.rank(node.input[0])
        axes = _axes(node, ctx.graph)
        if axes is None:
            raise Unsupported(f"{node.op_type} over every axis")
        axes = sorted(a % rank for a in axes)
        if lay.axis in axes or 0 in axes:
            raise Unsupported(f"{node.op_type} over the channel or batch axis")
        require_plain(ctx, node.input[0])
        keep = int(attr(node, "keepdims", 1))
        shift = 0 if keep else sum(1 for a in axes if a < lay.axis)
        ctx.set_layout(node.output[0], lay.with_axis(lay.axis - shift))

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        if node.op_type == "ReduceSum":  # a shift c sums to c times the (dynamic) positions
            return Spatial(linear=True, keeps_offset=False)
        return Spatial(linear=node.op_type == "ReduceMean", keeps_offset=True)


class PadHandler(OpHandler):
    ops = ("Pad",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        pads = self._pads(node, ctx.graph)
        rank = ctx.rank(node.input[0])
        if pads is None or pads[lay.axis] or pads[lay.axis + rank]:
            raise Unsupported("Pad along the channel axis (or pads not constant)")
        if len(node.input) > 2 and node.input[2] and ctx.graph.const(node.input[2]) is None:
            raise Unsupported("Pad value is not constant")
        require_plain(ctx, node.input[0])
        ctx.set_layout(node.output[0], lay)

    @staticmethod
    def _value(node: onnx.NodeProto, graph: Graph) -> float:
        """The border value: input 2 from opset 11, the `value` attribute before."""
        if len(node.input) > 2 and node.input[2]:
            return float(graph.const(node.input[2]).reshape(-1)[0])
        return float(attr(node, "value", 0.0))

    @staticmethod
    def _pads(node: onnx.NodeProto, graph: Graph) -> list[int] | None:
        pads = attr(node, "pads", None)
        if pads is None and len(node.input) > 1:
            value = graph.const(node.input[1])
            pads = None if value is None else value.tolist()
        if len(node.input) > 3 and node.input[3]:
            return None  # explicit axes: keep it simple and refuse
        return pads

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        if _text(node, "mode", "constant") != "constant":  # edge / reflect / wrap copy values
            return Spatial(linear=True, keeps_offset=True)
        return Spatial(linear=True, keeps_offset=False, border=self._value(node, graph))


class ResizeHandler(OpHandler):
    ops = ("Resize", "Upsample")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        if len(node.input) > 3 and node.input[3]:
            if not self._sizes_follow(node, ctx, lay.axis):
                raise Unsupported(f"{node.op_type} with explicit sizes (they name the channel "
                                  f"count)")
        else:
            shape_in = ctx.graph.shape(node.input[0])
            shape_out = ctx.graph.shape(node.output[0])
            if shape_in is None or shape_out is None or \
                    shape_out[lay.axis] != shape_in[lay.axis]:
                raise Unsupported(f"{node.op_type} may change the channel axis")
        require_plain(ctx, node.input[0])
        ctx.set_layout(node.output[0], lay)

    @staticmethod
    def _sizes_follow(node: onnx.NodeProto, ctx: AnalysisContext, axis: int) -> bool:
        """Sizes whose channel entry is the input's own channel count, read through Shape,
        and whose other entries do not read it (torch's ``interpolate(size=...)`` writes
        Concat(Shape(x)[:2], [H, W])): they follow any slimming by themselves."""
        sizes = node.input[3]
        seeds = {t: ctx.layout(t).axis for t in shape_reads(sizes, ctx.graph)
                 if ctx.layout(t) is not None}
        taint = entry_taints(sizes, ctx.graph, seeds)  # reads some channel count
        others = entry_taints(sizes, ctx.graph,  # reads another tensor's channel count
                              {t: a for t, a in seeds.items() if t != node.input[0]})
        value = value_of(sizes, ctx.graph)  # read, not computed from: 2C would mix
        channels = (ctx.graph.shape(node.input[0]) or [None] * (axis + 1))[axis]
        return taint is not None and others is not None and not any(others) and \
            axis < len(taint) and taint[axis] and \
            not any(t for a, t in enumerate(taint) if a != axis) and value is not None and \
            axis < len(value) and channels is not None and value[axis] == channels

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        """Interpolation weights sum to 1, so shifts pass, except where tf_crop_and_resize
        samples outside the image and writes `extrapolation_value` instead."""
        if _text(node, "coordinate_transformation_mode", "") == "tf_crop_and_resize":
            return Spatial(linear=True, keeps_offset=False,
                           border=float(attr(node, "extrapolation_value", 0.0)))
        return Spatial(linear=True, keeps_offset=True)


def _text(node: onnx.NodeProto, name: str, default: str) -> str:
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


HANDLERS = (PoolHandler(), ReduceHandler(), PadHandler(), ResizeHandler())
