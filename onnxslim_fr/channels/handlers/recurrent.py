"""LSTM, GRU and RNN reading tracked channels: consumers whose input weight takes the plan.

Every gate of every direction reads the input only through ``X Wᵀ + Wb`` (the recurrent
term ``H Rᵀ + Rb`` never sees X), so a plan folds exactly into W's input columns and the
offsets into the input bias Wb, the first half of B. The hidden size is out of scope: the
outputs Y, Y_h, Y_c carry no group, and R, activations, clip, sequence_lens and initial
states are left as they are.

Worked example: a bidirectional LSTM, hidden 5, input 6: W [2, 20, 6] is shown to lumping
as the canonical (out, in) matrix [40, 6]; removing input channel 4 = channel 1 adds
W[:, :, 4] to W[:, :, 1] and drops column 4.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import Graph
from ..context import AnalysisContext
from ..structures import Unsupported
from .base import RewriteContext, ShapeOf, known
from .linear import LinearHandler

#: gates per op: the rows of W per direction are gates * hidden_size
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_B, _STATES = 3, range(4, 8)  # B; sequence_lens, initial_h, initial_c, P


class RecurrentHandler(LinearHandler):
    ops = tuple(GATES)

    def starts_group(self, node: onnx.NodeProto, graph: Graph) -> bool:
        return False  # the hidden size is not slimmed: the outputs start no group

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        op = node.op_type
        w = ctx.graph.const(node.input[1])
        if w is None or w.ndim != 3:
            raise Unsupported(f"{op} input weight W is not constant")
        b = _input(node, _B)
        if b and ctx.graph.const(b) is None:
            raise Unsupported(f"{op} bias B is not constant")
        for i in _STATES:  # a tracked initial state or peephole is hidden-size data
            ctx.freeze(ctx.layout(_input(node, i)),
                       f"{op} reads channels as its hidden state at node {node.name}")
        if ctx.layout(node.input[0]) is None:
            return
        if ctx.rank(node.input[0]) != 3:
            raise Unsupported(f"{op} input is not [seq, batch, input]")
        self._consume(node, ctx, 2)

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        return [n for n in (node.input[1], _input(node, _B)) if n]

    def weight(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        """W [dirs, gates*hidden, input] as (dirs*gates*hidden, input)."""
        w = graph.const(node.input[1])
        return w.reshape(-1, w.shape[-1])

    def bias(self, node: onnx.NodeProto, graph: Graph) -> np.ndarray:
        """The input bias Wb, flattened like `weight`'s rows (zeros when B is absent)."""
        w = graph.const(node.input[1])
        b = _input(node, _B)
        if not b:
            return np.zeros(w.shape[0] * w.shape[1])
        return graph.const(b)[:, :w.shape[1]].astype(np.float64).reshape(-1)

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        if not rw.touched(node.input[0]):
            return
        w = rw.array(node.input[1])
        dirs, rows, _ = w.shape
        canon, delta = rw.fold(w.reshape(dirs * rows, -1), node.input[0])
        rw.stage(node.input[1], canon.reshape(dirs, rows, -1))
        if not np.any(delta):
            return
        b = _input(node, _B)
        new = rw.array(b).astype(np.float64) if b else np.zeros((dirs, 2 * rows))
        new[:, :rows] += delta.reshape(dirs, rows)
        if b:
            rw.stage(b, new)
        else:
            rw.add_input(node, _B, new.astype(w.dtype))

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        """Per step, batch row and direction: gates*hidden outputs of input + hidden
        products (the input and the recurrent projection); W and R are the parameters."""
        x, w, r = (shape_of(n) for n in node.input[:3])
        if not known(x) or len(x) != 3 or not known(w) or not known(r):
            return None
        steps = int(x[0]) * int(x[1])  # seq * batch in either layout
        macs = steps * int(w[0]) * int(w[1]) * (int(w[2]) + int(r[2]))
        return macs, self._constant_elements(list(node.input[1:3]), graph)

    def input_share(self, node: onnx.NodeProto, graph: Graph) -> float:
        """input / (input + hidden): removing input channels leaves H Rᵀ as it is."""
        w, r = graph.shape(node.input[1]), graph.shape(node.input[2])
        if not known(w) or not known(r) or len(w) != 3 or len(r) != 3:
            return 1.0
        return int(w[2]) / (int(w[2]) + int(r[2]))


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


HANDLERS = (RecurrentHandler(),)
