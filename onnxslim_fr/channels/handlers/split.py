"""Split and Slice: index-coupled pieces of one channel group.

Along the channel axis, output k takes the elements [a_k, b_k). The analysis refines the
groups there so that every cut is a segment boundary (AnalysisContext.cut); each piece is
then a group with a keep set of its own, wherever the group appears. The rewrite writes
the kept counts into private copies of the split sizes or slice bounds (the `split`
attribute before opset 13, `num_outputs` becomes explicit sizes at opset 18). Bounds
computed from shapes (torch's `chunk`: Shape -> Gather -> Div -> Slice) are evaluated
and written as constants, since the shape they read changes. Along any other axis every
output maps each channel over positions alone: layouts pass unchanged, relations hold.

    conv (A, 8) -> Split [3, 5]           outputs (A1, 3) and (A2, 5)
    plans: A1 keeps 2, A2 keeps 4    =>   Split [2, 4]
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import onnx

from ...errors import InternalError
from ...graph import Graph
from ...shape_taint import entry_taints, shape_reads
from ...shape_values import value_of
from ..context import AnalysisContext
from ..layout import Layout
from ..structures import Unsupported
from .base import OpHandler, RewriteContext, Take, Transfer, attr

Bounds = dict[int, tuple[int | str | None, int | str | None, int]]  # axis -> start, end, step


def _opset(graph: Graph) -> int:
    for o in graph.model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _ints(name: str, graph: Graph) -> list[int] | None:
    """A small integer tensor's value when every entry is a known number."""
    value = value_of(name, graph) if name else None
    if value is None or not all(isinstance(v, int) for v in value):
        return None
    return [int(v) for v in value]


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in pairwise(np.cumsum([0, *sizes]))]


def _kept(keep: np.ndarray, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges in the slimmed axis: kept elements before each bound."""
    return [(int(np.searchsorted(keep, a)), int(np.searchsorted(keep, b))) for a, b in ranges]


def rewrites_bounds(node: onnx.NodeProto, shaped: str, ctx: AnalysisContext) -> bool:
    """Whether this Split / Slice, whose sizes or bounds are computed from the shape of
    `shaped`, writes them as constants whenever that shape changes: they must be known
    numbers, and its data must hold every group of `shaped` (a plan that changes
    `shaped` then touches this node, and the rewrite replaces what the shape computed)."""
    data, source = ctx.layout(node.input[0]), ctx.layout(shaped)
    if data is None or source is None or not set(source.groups()) <= set(data.groups()):
        return False
    return all(_ints(name, ctx.graph) is not None for name in _computed(node, ctx.graph))


def _computed(node: onnx.NodeProto, graph: Graph) -> list[str]:
    """The sizes / bounds inputs that are not constants (computed from shapes)."""
    slots = (1,) if node.op_type == "Split" else (1, 2)
    return [node.input[i] for i in slots
            if len(node.input) > i and node.input[i] and graph.const(node.input[i]) is None]


def _write_computed(node: onnx.NodeProto, rw: RewriteContext) -> None:
    """Computed sizes / bounds as constants where a shape they read changes; the others
    stay computed (``x[:, :, :H // 2]`` on a dynamic H is no known number)."""
    for name in _computed(node, rw.analysis):
        if not _reads_changed_shape(name, rw):
            continue
        values = _ints(name, rw.analysis)
        if values is None:
            raise InternalError(f"{node.op_type} {node.name}: {name} is not a known number")
        rw.add_input(node, list(node.input).index(name),
                     np.asarray(values, dtype=_dtype(node, rw.analysis)))


def _reads_changed_shape(name: str, rw: RewriteContext) -> bool:
    """Whether `name` reads the channel count of a tensor the rewrite slims, through a
    Shape / Size (``x[:, :, :r.shape[2] // 2]`` reads only r's height: it stays computed)."""
    seeds = {}
    for source in shape_reads(name, rw.analysis):
        try:
            if rw.new_layout(source).size != rw.layout(source).size:
                seeds[source] = rw.layout(source).axis
        except KeyError:  # no channel layout: its shape stays
            continue
    if not seeds:
        return False
    taint = entry_taints(name, rw.analysis, seeds)
    return taint is None or any(taint)


def _take(ctx: AnalysisContext, node: onnx.NodeProto, lay: Layout,
          ranges: list[tuple[int, int]]) -> None:
    """Refine the groups at the ranges' bounds and give each output its piece."""
    if lay.outer != 1:
        raise Unsupported(f"{node.op_type} of interleaved channels (a channel shuffle, or "
                          "channels-last features flattened)")
    if any(a >= b for a, b in ranges):
        raise Unsupported(f"{node.op_type} output with no channels")
    cut = ctx.cut(lay, [p for r in ranges for p in r])
    for out, (a, b) in zip(node.output, ranges, strict=True):
        ctx.set_layout(out, cut.take(a, b))


class SplitHandler(OpHandler):
    ops = ("Split",)

    @staticmethod
    def _axis(node: onnx.NodeProto, rank: int) -> int:
        return int(attr(node, "axis", 0)) % rank

    @staticmethod
    def _sizes(node: onnx.NodeProto, graph: Graph, n: int) -> list[int]:
        """Output lengths along the split axis of length `n`, in every opset's form."""
        k = len(node.output)
        parts = attr(node, "num_outputs", None)
        if len(node.input) > 1 and node.input[1]:
            sizes = _ints(node.input[1], graph)
            if sizes is None:
                raise Unsupported("Split sizes depend on dynamic dimensions")
        elif attr(node, "split", None) is not None:
            sizes = [int(v) for v in attr(node, "split")]
        elif parts is not None:
            chunk = -(-n // int(parts))
            sizes = [chunk] * (int(parts) - 1) + [n - chunk * (int(parts) - 1)]
        else:
            sizes = [n // k] * k
        if len(sizes) != k or sum(sizes) != n or min(sizes) < 0:
            raise Unsupported(f"Split sizes {sizes} do not add up to the axis length {n}")
        return sizes

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        if self._axis(node, ctx.rank(node.input[0])) != lay.axis:
            for out in node.output:
                if out:
                    ctx.set_layout(out, lay)
            return
        _take(ctx, node, lay, _ranges(self._sizes(node, ctx.graph, lay.size)))

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        shape = graph.shape(node.input[0])
        axis = self._axis(node, len(shape))
        if shape[axis] is None:
            return Take(tuple({} for _ in node.output))
        sizes = self._sizes(node, graph, int(shape[axis]))
        return Take(tuple({axis: r} for r in _ranges(sizes)))

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        lay = rw.layout(node.input[0])
        if self._axis(node, len(rw.analysis.shape(node.input[0]))) != lay.axis:
            _write_computed(node, rw)
            return
        sizes = self._sizes(node, rw.analysis, lay.size)
        new = [b - a for a, b in _kept(rw.keep_index(node.input[0]), _ranges(sizes))]
        if new == sizes:
            _write_computed(node, rw)
            return
        if _opset(rw.analysis) < 13:
            rw.set_attr(node, "split", new)
            return
        rw.add_input(node, 1, np.asarray(new, dtype=np.int64))
        if attr(node, "num_outputs", None) is not None:
            rw.set_attr(node, "num_outputs", None)


class SliceHandler(OpHandler):
    """Slice with step 1 on the channel axis takes a run of channels; on other axes (any
    step: Focus's ``x[..., ::2, ::2]``) it is a per-channel op."""

    ops = ("Slice",)

    @staticmethod
    def _bounds(node: onnx.NodeProto, graph: Graph, rank: int) -> Bounds:
        """Per sliced axis (start, end, step); a start or end not known is None."""
        if attr(node, "starts", None) is not None:  # before opset 10: attributes
            starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
            axes, steps = attr(node, "axes", None), None
        else:
            starts, ends = (value_of(n, graph) if n else None for n in node.input[1:3])
            axes = _ints(node.input[3], graph) if len(node.input) > 3 else None
            steps = _ints(node.input[4], graph) if len(node.input) > 4 else None
            if len(node.input) > 3 and node.input[3] and axes is None:
                raise Unsupported("Slice axes are not constant")
            if len(node.input) > 4 and node.input[4] and steps is None:
                raise Unsupported("Slice steps are not constant")
        if axes is None and starts is None and ends is None:
            raise Unsupported("Slice axes are not known")
        length = len(axes) if axes is not None else len(starts if starts is not None else ends)
        axes = [int(a) % rank for a in (axes if axes is not None else range(length))]
        steps = steps or [1] * length

        def entry(values: list | None, i: int) -> int | str | None:
            return values[i] if values is not None and len(values) == length else None

        return {a: (entry(starts, i), entry(ends, i), int(steps[i])) for i, a in enumerate(axes)}

    @staticmethod
    def _channel_range(node: onnx.NodeProto, bounds: Bounds, lay: Layout) -> tuple[int, int]:
        start, end, step = bounds[lay.axis]
        if step != 1:
            raise Unsupported(f"Slice of the channel axis with step {step}")
        if not isinstance(start, int) or not isinstance(end, int):
            raise Unsupported("Slice of the channel axis with bounds that are not known")
        a, b, _ = slice(start, end).indices(lay.size)
        return a, max(a, b)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        bounds = self._bounds(node, ctx.graph, ctx.rank(node.input[0]))
        if lay.axis not in bounds:
            ctx.set_layout(node.output[0], lay)
            return
        if not all(self._writable(node, ctx.graph, i) for i in (1, 2)):
            raise Unsupported("Slice bounds depend on dynamic dimensions")
        _take(ctx, node, lay, [self._channel_range(node, bounds, lay)])

    @staticmethod
    def _writable(node: onnx.NodeProto, graph: Graph, index: int) -> bool:
        """Bounds the rewrite can write back as constants: attributes or known numbers."""
        return attr(node, "starts", None) is not None or _ints(node.input[index], graph) \
            is not None

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        shape = graph.shape(node.input[0])
        ranges = {}
        for axis, (start, end, step) in self._bounds(node, graph, len(shape)).items():
            if step == 1 and isinstance(start, int) and isinstance(end, int) \
                    and shape[axis] is not None:
                a, b, _ = slice(start, end).indices(int(shape[axis]))
                ranges[axis] = (a, max(a, b))
        return Take((ranges,))

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        lay = rw.layout(node.input[0])
        bounds = self._bounds(node, rw.analysis, len(rw.analysis.shape(node.input[0])))
        if lay.axis not in bounds or rw.new_layout(node.input[0]).size == lay.size:
            _write_computed(node, rw)
            return
        [(a, b)] = _kept(rw.keep_index(node.input[0]),
                         [self._channel_range(node, bounds, lay)])
        position = list(bounds).index(lay.axis)
        for index, name, value in ((1, "starts", a), (2, "ends", b)):
            if attr(node, name, None) is not None:
                values = list(attr(node, name))
                values[position] = value
                rw.set_attr(node, name, values)
                continue
            values = np.asarray(_ints(node.input[index], rw.analysis),
                                dtype=_dtype(node, rw.analysis))
            values[position] = value
            rw.add_input(node, index, values)


def _dtype(node: onnx.NodeProto, graph: Graph) -> type:
    """Slice's index type (int32 or int64), from a constant bound or the declared type."""
    for name in node.input[1:3]:
        const = graph.const(name)
        if const is not None:
            return const.dtype.type
    return np.int32 if graph.elem_type(node.input[1]) == onnx.TensorProto.INT32 else np.int64


HANDLERS = (SplitHandler(), SliceHandler())
