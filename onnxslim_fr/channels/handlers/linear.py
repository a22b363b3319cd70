"""Conv, ConvTranspose, Gemm and MatMul with constant weights: they produce and consume channels.

A consumer reads its input channels through its weight's input axis, so a plan folds as
``W' = W @ mix`` on that axis; the offsets become ``bias += W @ offset``. A producer writes
one channel per output row, sliced by the plan's keep set. Depthwise Conv and depthwise
ConvTranspose are carriers; Conv with 1 < group < C is in grouped.py. Every handler shows
lumping one canonical weight (out, in, ...): ConvTranspose's [Cin, Cout, k...] is swapped,
MatMul(x, W) is Wᵀ, MatMul(W, x) is W itself.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import Graph
from ..context import AnalysisContext
from ..layout import Layout, Segment
from ..structures import Role, Unsupported
from .attention import batched_matmul
from .base import (
    Depthwise,
    OpHandler,
    RewriteContext,
    ShapeOf,
    Transfer,
    attr,
    known,
    require_plain,
)


class LinearHandler(OpHandler):
    """Shared shape of the three: canonical weight (out, in, ...) and an optional bias."""

    def weight(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        """Weight as (out, in, ...), with any scale the op applies (Gemm alpha) included."""
        raise NotImplementedError

    def bias(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        """Effective per-output bias (zeros when absent)."""
        raise NotImplementedError

    def can_fold_offset(self, node: onnx.NodeProto) -> bool:
        """A constant input offset folds into the bias exactly (no zero padding)."""
        return True

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        """Weight and bias are inputs 1 and 2 (Conv, ConvTranspose, Gemm)."""
        return [n for n in node.input[1:3] if n]

    def _fold_and_slice(self, node: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None,
                        rw: RewriteContext, bias_scale: float = 1.0, data: int = 0
                        ) -> tuple[np.ndarray, np.ndarray | None]:
        """Fold the plans of input `data` into canonical `w` (out, in, ...), then keep output
        rows."""
        if rw.touched(node.input[data]):
            w, delta = rw.fold(w, node.input[data])
            b = _add_bias(b, bias_scale * delta, w.dtype)
        if rw.touched(node.output[0]):
            keep = rw.keep_index(node.output[0])
            w = w[keep]
            b = b[keep] if b is not None else None
        return w, b

    def starts_group(self, node: onnx.NodeProto, graph: Graph) -> bool:
        return self._weight_const(node, graph) is not None

    def _weight_const(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray | None:
        return graph.const(node.input[1]) if len(node.input) > 1 else None

    @staticmethod
    def _constant_elements(names: list[str], graph: Graph) -> int:
        """Weight elements: the constant operands among `names` (activations count 0)."""
        return sum(_prod(graph.shape(n)) for n in names if n in graph.initializers)

    def _constant_shape(self, node: onnx.NodeProto, graph: Graph) -> tuple[int, ...] | None:
        name = node.input[1] if len(node.input) > 1 else ""
        return tuple(graph.shape(name)) if name in graph.initializers else None

    def _produce(self, node: onnx.NodeProto, ctx: AnalysisContext, axis: int, n: int) -> None:
        ctx.set_layout(node.output[0], Layout(axis, (Segment(ctx.new_group(n), n),)))
        ctx.add_member(node, Role.PRODUCER, node.output[0])

    def _consume(self, node: onnx.NodeProto, ctx: AnalysisContext, axis: int,
                 data: int = 0) -> None:
        lay = ctx.layout(node.input[data])
        if lay is None:
            return
        if lay.axis != axis:
            raise Unsupported(f"{node.op_type} reduces axis {axis}, channels are on {lay.axis}")
        ctx.add_member(node, Role.CONSUMER, node.input[data])


class ConvHandler(LinearHandler):
    """Conv with group 1 or depthwise; ConvTranspose subclasses it with its weight layout and
    coverage rules, grouped.GroupedConvHandler (the registered Conv) with 1 < group < C."""

    ops = ("Conv",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        w = self._weight_const(node, ctx.graph)
        if w is None:
            raise Unsupported(f"{node.op_type} weight is not constant")
        if len(node.input) > 2 and node.input[2] and ctx.graph.const(node.input[2]) is None:
            raise Unsupported(f"{node.op_type} bias is not constant")
        group = int(attr(node, "group", 1))
        if group == 1:
            self._consume(node, ctx, 1)
            self._produce(node, ctx, 1, self._outputs(node, w.shape))
        elif self._depthwise(node, w):
            lay = ctx.layout(node.input[0])
            if lay.axis != 1:
                raise Unsupported(f"depthwise {node.op_type} filters axis 1, channels are on "
                                  f"axis {lay.axis}")
            require_plain(ctx, node.input[0])
            ctx.set_layout(node.output[0], lay)
            ctx.add_member(node, Role.CARRIER, node.output[0])
        else:
            self._propagate_grouped(node, ctx, group, w)

    def _propagate_grouped(self, node: onnx.NodeProto, ctx: AnalysisContext, group: int,
                           w: np.ndarray) -> None:
        """1 < group < C: refused (GroupedConvHandler follows the pieces of a Conv)."""
        raise Unsupported(f"grouped {node.op_type} (group={group}): each group mixes only "
                          f"its own channels, so a plan would have to remove the same "
                          f"number from every group")

    def starts_group(self, node: onnx.NodeProto, graph: Graph) -> bool:
        return super().starts_group(node, graph) and int(attr(node, "group", 1)) == 1

    @staticmethod
    def _depthwise(node: onnx.NodeProto, w: np.ndarray) -> bool:
        """One filter per channel: [C, 1, k...] for Conv and ConvTranspose alike."""
        group = int(attr(node, "group", 1))
        return group > 1 and w.shape[0] == group and w.shape[1] == 1

    @staticmethod
    def _canonical(w: np.ndarray) -> np.ndarray:
        """The stored weight as (out, in, k...); its own inverse."""
        return w

    def _outputs(self, node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
        """Output channels from the stored weight's shape."""
        return int(shape[0])

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        """Each output element reads Cin/group channels over the kernel: the weight's
        (Cin/group, *kernel) block, so grouped and depthwise Conv come out right."""
        out, w = shape_of(node.output[0]), shape_of(node.input[1])
        if not known(out) or not known(w):
            return None
        return _prod(out) * _prod(w[1:]), self._constant_elements(node.input[1:3], graph)

    def out_channels(self, node: onnx.NodeProto, graph: Graph) -> int | None:
        w = self._constant_shape(node, graph)
        return self._outputs(node, w) if w else None

    def weight(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        return self._canonical(graph.const(node.input[1]))

    def bias(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        if len(node.input) > 2 and node.input[2]:
            return graph.const(node.input[2]).astype(np.float64)
        return np.zeros(self._outputs(node, graph.const(node.input[1]).shape))

    def can_fold_offset(self, node: onnx.NodeProto) -> bool:
        pads = attr(node, "pads", None) or []
        return not any(pads) and _auto_pad(node) in ("NOTSET", "VALID")

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        w = graph.const(node.input[1])  # depthwise: [C, 1, k...] in both layouts
        return Depthwise(w.reshape(w.shape[0], -1).astype(np.float64), self.bias(node, graph),
                         not self.can_fold_offset(node))

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        w = rw.array(node.input[1])
        b = rw.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if self._depthwise(node, rw.graph.const(node.input[1])):
            keep = rw.keep_index(node.output[0])
            rw.stage(node.input[1], w[keep])
            if b is not None:
                rw.stage(node.input[2], b[keep])
            rw.set_attr(node, "group", len(keep))
            return
        _write_bias(node, 2, self._fold_weight(node, w, b, rw), rw)

    def _fold_weight(self, node: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None,
                     rw: RewriteContext) -> np.ndarray | None:
        """Fold and slice the stored weight `w`, stage it, and return the new bias."""
        w, b = self._fold_and_slice(node, self._canonical(w), b, rw)
        rw.stage(node.input[1], np.ascontiguousarray(self._canonical(w)))
        return b


class ConvTransposeHandler(ConvHandler):
    """ConvTranspose: weight [Cin, Cout/group, k...], so the canonical (out, in, k...) weight
    is its first two axes swapped. Each input position scatters the kernel over the output;
    an output position near a border (or between strided taps) receives fewer taps, so a
    constant input channel adds a per-position amount, not a bias, unless coverage is full.
    """

    ops = ("ConvTranspose",)

    @staticmethod
    def _canonical(w: np.ndarray) -> np.ndarray:
        return np.swapaxes(w, 0, 1)

    def _outputs(self, node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
        return int(shape[1]) * int(attr(node, "group", 1))

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        """Each input element is scattered over Cout/group channels and the kernel."""
        x, w = shape_of(node.input[0]), shape_of(node.input[1])
        if not known(x) or not known(w):
            return None
        return _prod(x) * _prod(w[1:]), self._constant_elements(node.input[1:3], graph)

    def can_fold_offset(self, node: onnx.NodeProto) -> bool:
        """Every output position receives every kernel tap exactly once only with stride 1
        and pads that crop the partial borders: pads_begin >= (k-1)*d and
        pads_end >= (k-1)*d + output_padding. Otherwise the offset is position-dependent."""
        kernel = attr(node, "kernel_shape", None)
        if kernel is None or attr(node, "output_shape", None) is not None or \
                _auto_pad(node) != "NOTSET":
            return False
        n = len(kernel)
        strides = attr(node, "strides", None) or [1] * n
        dilations = attr(node, "dilations", None) or [1] * n
        pads = attr(node, "pads", None) or [0] * (2 * n)
        extra = attr(node, "output_padding", None) or [0] * n
        return all(s == 1 and pads[i] >= (k - 1) * d and pads[i + n] >= (k - 1) * d + e
                   for i, (k, s, d, e) in enumerate(zip(kernel, strides, dilations, extra,
                                                        strict=True)))


class GemmHandler(LinearHandler):
    ops = ("Gemm",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        w = self._weight_const(node, ctx.graph)
        if w is None and ctx.graph.const(node.input[0]) is not None:
            raise Unsupported("Gemm with a constant A and a computed B: channels of B on its "
                              "contraction axis are not followed")
        if w is None or w.ndim != 2:
            raise Unsupported("Gemm weight is not a constant matrix")
        if ctx.layout(node.input[0]) is not None and attr(node, "transA", 0):
            raise Unsupported("Gemm with transA reads channels on axis 0")
        n = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        if len(node.input) > 2 and node.input[2]:
            c = ctx.graph.const(node.input[2])
            if c is None or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
                raise Unsupported("Gemm bias is not a per-output constant")
        self._consume(node, ctx, 1)
        self._produce(node, ctx, 1, n)

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        """(M, K) x (K, N): M*N outputs of K products each; K is A's axis 0 under transA."""
        a, out = shape_of(node.input[0]), shape_of(node.output[0])
        if not known(a) or len(a) != 2 or not known(out):
            return None
        k = a[0] if attr(node, "transA", 0) else a[1]
        return _prod(out) * int(k), self._constant_elements(node.input[1:3], graph)

    def out_channels(self, node: onnx.NodeProto, graph: Graph) -> int | None:
        w = self._constant_shape(node, graph)
        if w is None or len(w) != 2:
            return None
        return int(w[0] if attr(node, "transB", 0) else w[1])

    def _raw(self, node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
        return w if attr(node, "transB", 0) else w.T

    def weight(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        return float(attr(node, "alpha", 1.0)) * self._raw(node, graph.const(node.input[1]))

    def bias(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        n = self._raw(node, graph.const(node.input[1])).shape[0]
        if len(node.input) > 2 and node.input[2]:
            c = graph.const(node.input[2]).astype(np.float64)
            return float(attr(node, "beta", 1.0)) * np.broadcast_to(c.reshape(-1), (n,))
        return np.zeros(n)

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        alpha = float(attr(node, "alpha", 1.0))
        w = self._raw(node, rw.array(node.input[1]))
        b = self.bias(node, rw.graph) if len(node.input) > 2 and node.input[2] else None
        w, b = self._fold_and_slice(node, w, b, rw, bias_scale=alpha)
        rw.stage(node.input[1], self._raw(node, w))
        if b is not None:
            rw.set_attr(node, "beta", 1.0)
        _write_bias(node, 2, b, rw)


class MatMulHandler(LinearHandler):
    """MatMul(x, W) with W [K, N]: reads x's last axis, writes N channels on it (canonical
    weight Wᵀ). MatMul(W, x) with a constant W [M, K] first: reads x's axis -2, writes M
    channels on the output's axis -2 (canonical weight W, a 1x1 conv over the last axis)."""

    ops = ("MatMul",)

    @staticmethod
    def _first(node: onnx.NodeProto, graph: Graph) -> bool:
        """The constant is the first operand: MatMul(W, x)."""
        return graph.const(node.input[1]) is None and graph.const(node.input[0]) is not None

    def _weight_const(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray | None:
        return graph.const(node.input[0 if self._first(node, graph) else 1])

    def starts_group(self, node: onnx.NodeProto, graph: Graph) -> bool:
        w = self._weight_const(node, graph)
        return w is not None and w.ndim == 2

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        w = self._weight_const(node, ctx.graph)
        if w is None:  # attention: heads on a batch axis (handlers/attention.py)
            batched_matmul(node, ctx)
            return
        if w.ndim != 2:
            raise Unsupported("MatMul weight is not a constant matrix (batched weight)")
        first = self._first(node, ctx.graph)
        if first and ctx.graph.users(node.input[0]) > 1:  # sharing assumes the weight is input 1
            raise Unsupported(f"MatMul(W, x) with a weight {node.input[0]} shared with another "
                              f"node")
        rank = ctx.rank(node.input[int(first)])
        if rank < 2:
            raise Unsupported("MatMul on a vector")
        axis = rank - 2 if first else rank - 1
        self._consume(node, ctx, axis, int(first))
        self._produce(node, ctx, axis, w.shape[0] if first else w.shape[1])

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        if self._weight_const(node, graph) is None:
            return []
        return [node.input[0 if self._first(node, graph) else 1]]

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        """Every output element is a dot product over A's last axis K, whether B is a weight
        or another activation (attention); only constant operands count as parameters."""
        a, out = shape_of(node.input[0]), shape_of(node.output[0])
        if not known(a) or not a or not known(out):
            return None
        return _prod(out) * int(a[-1]), self._constant_elements(list(node.input[:2]), graph)

    def out_channels(self, node: onnx.NodeProto, graph: Graph) -> int | None:
        if self._first(node, graph):
            w = graph.shape(node.input[0])
            return int(w[0]) if len(w) == 2 else None
        w = self._constant_shape(node, graph)
        return int(w[-1]) if w is not None and len(w) >= 2 else None

    def weight(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        w = self._weight_const(node, graph)
        return w if self._first(node, graph) else w.T

    def bias(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        return np.zeros(self.weight(node, graph).shape[0])

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        if self._weight_const(node, rw.graph) is None:
            return  # attention MatMul: no parameters
        first = self._first(node, rw.graph)
        name = node.input[0 if first else 1]
        w = rw.array(name)
        w, b = self._fold_and_slice(node, w if first else w.T, None, rw, data=int(first))
        rw.stage(name, np.ascontiguousarray(w if first else w.T))
        if b is not None:  # a bias on the output's channel axis: the last, or -2 for MatMul(W, x)
            rw.bias_after[node.name] = b.reshape(-1, 1) if first else b


def _auto_pad(node: onnx.NodeProto) -> str:
    value = attr(node, "auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def _prod(shape: tuple[int | None, ...] | None) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _add_bias(b: np.ndarray | None, delta: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    if b is None:
        return delta.astype(dtype) if np.any(delta) else None
    return (b.astype(np.float64) + delta).astype(dtype)


def _write_bias(node: onnx.NodeProto, index: int, b: np.ndarray | None,
                rw: RewriteContext) -> None:
    if b is None:
        return
    if len(node.input) > index and node.input[index]:
        rw.stage(node.input[index], b.reshape(-1))
    else:
        rw.add_input(node, index, b.reshape(-1))


HANDLERS = (ConvTransposeHandler(), GemmHandler(), MatMulHandler())
