"""Per-op knowledge, the extension point: one module per op family, explicit tuples.

Adding an op means adding a handler to one of these tuples; nothing registers itself on
import. Ops from other domains than the default ONNX one are never handled.
"""

from __future__ import annotations

import onnx

from . import (
    affine,
    attention,
    elementwise,
    embedding,
    grouped,
    linear,
    recurrent,
    shape,
    spatial,
    split,
)
from .base import OpHandler
from .normalization import FREEZING

_BY_OP: dict[str, OpHandler] = {
    op: handler
    for family in (linear.HANDLERS, grouped.HANDLERS, affine.HANDLERS, elementwise.HANDLERS,
                   spatial.HANDLERS, shape.HANDLERS, recurrent.HANDLERS, embedding.HANDLERS,
                   split.HANDLERS, attention.HANDLERS, FREEZING)
    for handler in family
    for op in handler.ops
}

#: Ops whose channels can be slimmed (FREEZING handlers only give a precise freeze reason).
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(set(_BY_OP) - {op for h in FREEZING
                                                               for op in h.ops}))

#: Quantized ops: out of scope (slim the float model, then quantize); named in notes.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention"})


def handler_for(node: onnx.NodeProto) -> OpHandler | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return _BY_OP.get(node.op_type)
