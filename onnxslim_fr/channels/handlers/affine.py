"""Per-channel affine carriers and the element-wise joins of two channel tensors.

BatchNormalization, bias Add/Sub, per-channel Mul/Div: ``y_c = a_c x_c + b_c``; their
parameters are sliced with the channels. InstanceNormalization and PRelu carry per-channel
parameters too. Add/Sub/Mul of two tracked tensors couples their groups (union).
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import Graph
from ..context import AnalysisContext
from ..structures import Role, Unsupported
from .attention import broadcast_join
from .base import (
    Activation,
    Affine,
    Join,
    Normalize,
    OpHandler,
    RewriteContext,
    ShapeOf,
    Transfer,
    attr,
    per_channel,
    require_plain,
)


class _ParamCarrier(OpHandler):
    """Output layout = input 0 layout; listed inputs are per-channel vectors to slice."""

    slots: tuple[int, ...] = ()
    axis: int | None = None  # the axis the op's parameters run along, when fixed by the op

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        if lay is None:
            raise Unsupported(f"{node.op_type} parameters are computed, not constant")
        if self.axis is not None and lay.axis != self.axis:
            raise Unsupported(f"{node.op_type} normalizes axis {self.axis}, channels are on "
                              f"axis {lay.axis}")
        require_plain(ctx, node.input[0])
        for i in self.slots:
            if ctx.graph.const(node.input[i]) is None:
                raise Unsupported(f"{node.op_type} parameter {node.input[i]} is not constant")
        if len([o for o in node.output if o]) > 1:
            raise Unsupported(f"{node.op_type} in training mode")
        ctx.set_layout(node.output[0], lay)
        ctx.add_member(node, Role.CARRIER, node.output[0])

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        return [node.input[i] for i in self.slots]

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        return parameter_cost(self.params(node, graph), graph)

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        keep = rw.keep_index(node.output[0])
        for i in self.slots:
            value = rw.array(node.input[i])
            if value.size > 1:
                rw.stage(node.input[i], value.reshape(-1)[keep].reshape(_kept_shape(value, keep)))


def parameter_cost(names: list[str], graph: Graph) -> tuple[int, int] | None:
    """(0 MACs, elements) of per-channel parameters: next to nothing in FLOPs, but
    ``--target params`` counts every parameter the slimming removes."""
    elements = sum(int(graph.const(n).size) for n in names if graph.const(n) is not None)
    return (0, elements) if elements else None


def _kept_shape(value: np.ndarray, keep: np.ndarray) -> tuple[int, ...]:
    return tuple(len(keep) if n > 1 else 1 for n in value.shape)


class BatchNormHandler(_ParamCarrier):
    ops = ("BatchNormalization",)
    slots = (1, 2, 3, 4)
    axis = 1

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        params = [ctx.graph.const(node.input[i]) for i in self.slots]
        if int(attr(node, "spatial", 1)) == 0 or any(p is not None and p.ndim != 1
                                                     for p in params):
            raise Unsupported("BatchNormalization with per-activation parameters (spatial=0)")
        super().propagate(node, ctx)

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        scale, b, mean, var = (graph.const(node.input[i]).astype(np.float64) for i in self.slots)
        a = scale / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
        return Affine(a, b - mean * a)


class InstanceNormHandler(_ParamCarrier):
    ops = ("InstanceNormalization",)
    slots = (1, 2)
    axis = 1

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        return Normalize(*(graph.const(node.input[i]).astype(np.float64) for i in self.slots))


class PReluHandler(_ParamCarrier):
    ops = ("PRelu",)
    slots = (1,)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        slope = ctx.graph.const(node.input[1])
        lay = ctx.layout(node.input[0])
        if slope is None or lay is None:
            raise Unsupported("PRelu slope is not constant")
        if per_channel(slope, ctx.rank(node.input[0]), lay.axis, lay.channels) is None:
            raise Unsupported("PRelu slope is not per-channel")
        super().propagate(node, ctx)

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        slope = graph.const(node.input[1]).astype(np.float64).reshape(-1)
        return Activation(lambda x: np.where(x > 0, x, slope * x), "homogeneous", slope[:, None])


class ArithmeticHandler(OpHandler):
    """Add/Sub/Mul/Div: with a per-channel constant a carrier, with a tracked tensor a join."""

    ops = ("Add", "Sub", "Mul", "Div")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        a, b = (ctx.layout(n) for n in node.input[:2])
        if a is not None and b is not None:
            self._join(node, ctx)
            return
        tracked = 0 if a is not None else 1
        const = ctx.graph.const(node.input[1 - tracked])
        if const is None and broadcast_join(node, ctx, tracked):
            return  # the attention mask, the same for every head
        if const is None:
            raise Unsupported(f"{node.op_type} with a tensor of unknown channels")
        if node.op_type == "Div" and tracked == 1:
            raise Unsupported("division by channels")
        lay = ctx.layout(node.input[tracked])
        vec = per_channel(const, ctx.rank(node.input[tracked]), lay.axis, lay.size)
        if vec is None:
            raise Unsupported(f"{node.op_type} constant is not per-channel")
        ctx.set_layout(node.output[0], lay)
        if vec.size > 1:
            require_plain(ctx, node.input[tracked])
            ctx.add_member(node, Role.CARRIER, node.output[0])

    def _join(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        if node.op_type == "Div":
            raise Unsupported("division of two channel tensors")
        a, b = (ctx.layout(n) for n in node.input[:2])
        if a.axis != b.axis:
            raise Unsupported(f"{node.op_type} of tensors with different channel layouts")
        ctx.set_layout(node.output[0], ctx.unify(a, b, node.op_type))

    def _const_side(self, node: onnx.NodeProto, graph: Graph) -> int | None:
        for i in (0, 1):
            if graph.const(node.input[i]) is not None:
                return i
        return None

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        side = self._const_side(node, graph)
        if side is None or graph.const(node.input[side]).size <= 1:
            return []
        return [node.input[side]]

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        return parameter_cost(self.params(node, graph), graph)

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        side = self._const_side(node, graph)
        if side is None:
            return Join(node.op_type.lower())
        c = graph.const(node.input[side]).astype(np.float64).reshape(-1)
        one, zero = np.ones_like(c), np.zeros_like(c)
        op = node.op_type
        if op == "Add":
            return Affine(one, c)
        if op == "Sub":
            return Affine(one, -c) if side == 1 else Affine(-one, c)
        if op == "Mul":
            return Affine(c, zero)
        return Affine(1.0 / c, zero)

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        for name in self.params(node, rw.graph):
            value = rw.array(name)
            keep = rw.keep_index(node.output[0])
            rw.stage(name, value.reshape(-1)[keep].reshape(_kept_shape(value, keep)))


HANDLERS = (BatchNormHandler(), InstanceNormHandler(), PReluHandler(), ArithmeticHandler())
