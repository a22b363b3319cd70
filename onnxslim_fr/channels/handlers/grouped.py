"""Conv with 1 < group < C (ResNeXt, ShuffleNet, RegNet): per-group pieces of one group.

Group j of the conv reads input piece j and writes output piece j, so every piece must keep
as many channels: the input's pieces are united (index-coupled, as a Split's would be after
a Concat of equal parts) and the output is one new group repeated once per piece. The
weight is seen block-diagonal [Cout, Cin, k...] everywhere (relations, consumer views,
folds): two outputs with equal rows in different groups read different channels.

    Conv(8 -> 8, group=2): input (A, 4) (A, 4), output (G, 4) (G, 4)
    plans: A keeps 3, G keeps 2   =>   weight [4, 3, k, k], group 2
"""

from __future__ import annotations

import numpy as np
import onnx

from ...errors import InternalError
from ...graph import Graph
from ..context import AnalysisContext
from ..layout import Layout, Segment
from ..structures import Role, Unsupported
from .base import RewriteContext, attr, require_plain
from .linear import ConvHandler


class GroupedConvHandler(ConvHandler):
    """The Conv handler: ConvHandler's group 1 and depthwise, plus 1 < group < C here."""

    def _propagate_grouped(self, node: onnx.NodeProto, ctx: AnalysisContext, group: int,
                           w: np.ndarray) -> None:
        """Unite the input's `group` pieces (channel i of every piece goes or stays with the
        others) and write one new group of n / group channels once per piece."""
        n = int(w.shape[0])
        lay = ctx.layout(node.input[0])
        if n % group:
            raise Unsupported(f"grouped Conv with {n} outputs in {group} groups")
        if lay is not None:
            if lay.axis != 1:
                raise Unsupported(f"grouped Conv reads axis 1, channels are on axis {lay.axis}")
            require_plain(ctx, node.input[0])
            width = lay.size // group
            cut = ctx.cut(lay, [j * width for j in range(1, group)])
            first = cut.take(0, width)
            for j in range(1, group):
                first = ctx.unify(first, cut.take(j * width, (j + 1) * width),
                                  f"grouped Conv (group={group})")
            ctx.add_member(node, Role.CONSUMER, node.input[0])
        g = ctx.new_group(n // group)
        ctx.set_layout(node.output[0], Layout(1, (Segment(g, n // group),) * group))
        ctx.add_member(node, Role.PRODUCER, node.output[0])

    def starts_group(self, node: onnx.NodeProto, graph: Graph) -> bool:
        """Group 1 or grouped: new channels; depthwise only carries its input's."""
        w = self._weight_const(node, graph)
        return w is not None and not self._depthwise(node, w)

    def weight(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        w = graph.const(node.input[1])
        group = int(attr(node, "group", 1))
        if group > 1 and not self._depthwise(node, w):
            return block_diagonal(w, group)
        return super().weight(node, graph)

    def _fold_weight(self, node: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None,
                     rw: RewriteContext) -> np.ndarray | None:
        """Fold into the block-diagonal weight; stage its diagonal blocks again."""
        group = int(attr(node, "group", 1))
        if group > 1:
            w, b = self._fold_and_slice(node, block_diagonal(w, group), b, rw)
            rw.stage(node.input[1], diagonal_blocks(w, group, node.name))
            return b
        return super()._fold_weight(node, w, b, rw)


def block_diagonal(w: np.ndarray, group: int) -> np.ndarray:
    """A grouped Conv weight [Cout, Cin/g, k...] as the dense [Cout, Cin, k...] it applies:
    output block j reads input block j only.

        w [4, 1, k] with g=2  ->  [[w0, 0], [w1, 0], [0, w2], [0, w3]]
    """
    out, width = w.shape[0] // group, w.shape[1]
    dense = np.zeros((w.shape[0], width * group, *w.shape[2:]), dtype=w.dtype)
    for j in range(group):
        dense[j * out:(j + 1) * out, j * width:(j + 1) * width] = w[j * out:(j + 1) * out]
    return dense


def diagonal_blocks(dense: np.ndarray, group: int, name: str) -> np.ndarray:
    """The inverse of block_diagonal after a rewrite; the blocks off the diagonal must
    still be zero (every piece kept as many channels, each folded within its own block)."""
    if dense.shape[0] % group or dense.shape[1] % group:
        raise InternalError(f"Conv {name}: {dense.shape[:2]} channels in {group} groups")
    out, width = dense.shape[0] // group, dense.shape[1] // group
    blocks = [dense[j * out:(j + 1) * out, j * width:(j + 1) * width] for j in range(group)]
    if not np.isclose(np.abs(dense).sum(), sum(np.abs(b).sum() for b in blocks)):
        raise InternalError(f"Conv {name}: a fold crossed its groups")
    return np.ascontiguousarray(np.concatenate(blocks))


HANDLERS = (GroupedConvHandler(),)
