"""Per-op knowledge, the extension point: one module per op family, explicit tuples.

Adding an op means adding a handler to one of these tuples; nothing registers itself on
import. Ops from other domains than the default ONNX one are never handled.
"""

from __future__ import annotations

import onnx

from . import affine, attention, elementwise, embedding, linear, recurrent, shape, spatial, split
from .base import OpHandler

_BY_OP: dict[str, OpHandler] = {
    op: handler
    for family in (linear.HANDLERS, affine.HANDLERS, elementwise.HANDLERS, spatial.HANDLERS,
                   shape.HANDLERS, recurrent.HANDLERS, embedding.HANDLERS,
                   split.HANDLERS, attention.HANDLERS)
    for handler in family
    for op in handler.ops
}

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(_BY_OP))

#: Quantized ops: out of scope (slim the float model, then quantize); named in notes.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention"})


def handler_for(node: onnx.NodeProto) -> OpHandler | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return _BY_OP.get(node.op_type)
