"""Gather: an embedding lookup produces channels; a gather of positions moves them.

``Gather(table[V, D], ids)`` on axis 0 with a constant table writes D channels on the last
axis of its output (rank ids.rank + 1). Row v of the output is table[ids]: a linear map of
the one-hot id, so the canonical (out, in) weight is tableᵀ (out = D channels, in = V ids)
with no bias, and exact lumping finds duplicate, multiple and all-zero columns the way it
finds them among Conv filters. Slimming slices the table's columns.

Gather of a tracked tensor along another axis than its channels picks positions (a time
step, a token): every channel is treated alike, so the layout moves with the axes.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import Graph
from ..context import AnalysisContext
from ..structures import Unsupported
from .base import RewriteContext, ShapeOf, attr
from .linear import LinearHandler


class GatherHandler(LinearHandler):
    ops = ("Gather",)

    @staticmethod
    def _table(node: onnx.NodeProto, graph: Graph) -> np.ndarray | None:
        """The constant [V, D] table an axis-0 Gather looks rows up in, else None."""
        table = graph.const(node.input[0])
        if table is None or table.ndim != 2 or int(attr(node, "axis", 0)) % 2 != 0:
            return None
        return table

    def starts_group(self, node: onnx.NodeProto, graph: Graph) -> bool:
        return self._table(node, graph) is not None

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        if lay is not None:
            self._positions(node, ctx)
            return
        table = self._table(node, ctx.graph)
        if table is None:
            raise Unsupported("Gather indices carry channels")
        self._produce(node, ctx, ctx.rank(node.input[1]), table.shape[1])

    @staticmethod
    def _positions(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        """Gather along a non-channel axis: the channel axis shifts by the indices' rank - 1
        when it comes after the gathered axis."""
        lay = ctx.layout(node.input[0])
        axis = int(attr(node, "axis", 0)) % ctx.rank(node.input[0])
        if axis == lay.axis:
            raise Unsupported("Gather along the channel axis")
        shift = ctx.rank(node.input[1]) - 1 if axis < lay.axis else 0
        ctx.set_layout(node.output[0], lay.with_axis(lay.axis + shift))

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        return [node.input[0]] if self._table(node, graph) is not None else []

    def weight(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        return self._table(node, graph).T

    def bias(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        return np.zeros(self._table(node, graph).shape[1])

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        if self._table(node, rw.graph) is None or not rw.touched(node.output[0]):
            return  # a gather of positions has nothing to edit
        keep = rw.keep_index(node.output[0])
        rw.stage(node.input[0], np.ascontiguousarray(rw.array(node.input[0])[:, keep]))

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        """A lookup multiplies nothing; the table is the parameters."""
        table = self._table(node, graph)
        return None if table is None else (0, int(table.size))

    def out_channels(self, node: onnx.NodeProto, graph: Graph) -> int | None:
        table = self._table(node, graph)
        return None if table is None else int(table.shape[1])


HANDLERS = (GatherHandler(),)
