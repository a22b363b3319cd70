"""Constant folding before analysis: weights and shapes written as computations become
plain initializers.

Exporters rarely hand us weights as initializers alone: paddle2onnx writes `Constant`
nodes and biases as ``Constant -> Reshape -> Add``; tf2onnx and others put weights behind
Identity / Cast / Transpose / Unsqueeze; shape targets are computed from `Shape`. Channel
analysis needs all of those as constants. onnxscript's constant folder (over onnx-ir)
evaluates them with the ONNX reference semantics and knows partial shapes, which a
hand-written folder would re-implement op by op.

Only the passes that keep the graph recognisable run: functions are inlined, constants
folded, dead nodes removed and constants lifted to initializers. Deduplicating equal
initializers or merging common subexpressions would turn private weights into shared
ones (which freezes their groups), so those passes are left out. Quantize/Dequantize
nodes are never folded: a quantized graph stays as it was (out of scope, reported).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer import fold_constants_ir

from . import weights

log = logging.getLogger(__name__)

#: Largest constant (elements) an op may read or write to be folded: weights up to this
#: size are transposed, cast or reshaped ahead of time (a 3x3 conv with 512 in and out
#: channels has 2.4 M).
FOLD_LIMIT = 1 << 24
_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _should_fold(node: ir.Node) -> bool | None:
    """Never quantization; never a computation on a weight that other nodes read too:
    folding GPT-2's tied ``lm_head = Transpose(wte)`` writes a second copy of the embedding
    (a 50257 x 768 one is 154 MB more), and a tied autoencoder's or a twice-cast float16
    weight would be stored twice as well. The output would grow more than slimming such a
    layer saves, so it stays as it is (its readers see a computed weight, and freeze)."""
    if node.op_type in _NEVER_FOLD or any(_shared_weight(v) for v in node.inputs):
        return False
    if node.op_type == "ConstantOfShape":  # the folder keeps them all; small ones build
        return _small_shape(node.inputs[0]) or None  # TorchScript's F.pad pads
    return None


def _shared_weight(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and len(value.uses()) > 1 and \
        value.const_value is not None and value.const_value.size > weights.SMALL_ELEMENTS


def _small_shape(value: ir.Value | None) -> bool:
    if value is None or value.const_value is None:
        return False
    dims = value.const_value.numpy().reshape(-1)
    return bool(dims.size) and 0 <= int(np.prod(dims)) <= weights.SMALL_ELEMENTS


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model with every constant-only computation replaced by its value; the model
    as it was when the folder cannot handle it (folding is an aid, never a requirement)."""
    try:
        return _fold(model)
    except Exception as exc:  # a third-party pass on an unusual model: analyse it unfolded
        log.warning("constant folding skipped: %s: %s", type(exc).__name__, exc)
        return model


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    work = ir.serde.deserialize_model(model)
    _locate_stored(work)
    common.InlinePass()(work)
    fold_constants_ir(work, onnx_shape_inference=False, input_size_limit=FOLD_LIMIT,
                      output_size_limit=FOLD_LIMIT, should_fold=_should_fold)
    common.RemoveUnusedNodesPass()(work)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
    common.LiftSubgraphInitializersToMainGraphPass()(work)
    out = ir.serde.serialize_model(work)
    out.ir_version = model.ir_version
    return out


def _locate_stored(model: ir.Model) -> None:
    """Weights in slim's store (weights.py) are external tensors relative to its directory:
    tell the folder where, so it reads them (mapped) when it folds one; untouched ones are
    written back as the same references."""
    store = weights.current()
    if store is None:
        return
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and (store.dir / tensor.location).is_file():
            value.const_value = ir.ExternalTensor(
                tensor.location, tensor.offset, tensor.length, tensor.dtype,
                shape=tensor.shape, name=tensor.name, base_dir=store.dir)
