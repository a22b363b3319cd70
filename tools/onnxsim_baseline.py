"""Benchmark baseline: onnxsim 0.8.1 structured Wanda pruning + ridge refit.

What onnxsim does
-----------------
``onnxsim.pruning.apply_structured_wanda_pruning`` looks for *chains*
``producer -> [elementwise ops / depthwise Conv] -> consumer`` of MatMul/Gemm
or Conv layers (also SwiGLU pairs, ``Add`` residual groups and ``Concat``
groups) and physically removes the producer's lowest-ranked output channels
together with the matching consumer input channels (smaller tensors, not
zeros). Channels are ranked by ``||W_row||_2 * ||X||_2``: weight-row norm
times the calibration activation norm at the consumer's input. Anything else
is left untouched: the final layer; a Conv whose output reaches a MatMul/Gemm
through ``Flatten``/``Reshape`` (with or without ``GlobalAveragePool``: the C++
path behind this function has no Conv -> MatMul/Gemm chain); a Conv followed by
an unfused ``BatchNormalization``; residual spines whose group cannot be
closed (e.g. one ending in the ``Flatten`` of a classifier head).

``onnxsim.finetune.apply_pruning_finetune`` then re-solves the MatMul/Gemm
weights (never Conv) by closed-form ridge regression, so that each layer
reproduces the original layer's outputs on the original activations. So the
only layers that change are MatMul/Gemm consumers that lost input channels but
kept all outputs (the last layer of a pruned chain). A layer that only lost
outputs, or lost nothing, gets its own weights back exactly; a layer pruned on
both axes is skipped. Conv layers are never refit, so on a CNN it can only help
a pruned Gemm -> Gemm head.

The knob
--------
``amount`` is onnxsim's ``sparsity``: the fraction of output channels removed
from *each* matched producer (per layer, not global; at least one channel is
kept). Each consumer loses the same fraction of its input channels, so a layer
that is both (inside a stack) loses ``1 - (1 - amount) ** 2`` of its MACs,
while unmatched layers lose none. The model's FLOP reduction is therefore
``amount`` for a single hidden layer, more for deep stacks (0.5 -> 0.66 on a
64-128-128-10 MLP), and less when unmatched layers dominate.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnxsim.finetune import apply_pruning_finetune
from onnxsim.pruning import apply_structured_wanda_pruning

DEFAULT_BATCH = 64
_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _batch_size(model: onnx.ModelProto) -> tuple[int, bool]:
    """(chunk size, whether it is fixed): the inputs' static batch dim, else ``DEFAULT_BATCH``."""
    for inp in _graph_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value, True
    return DEFAULT_BATCH, False


def _to_feeds(model: onnx.ModelProto, calib: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split ``{input: [N, ...]}`` into onnxsim's list of ``{input: batch}`` feeds."""
    inputs = _graph_inputs(model)
    missing = [i.name for i in inputs if i.name not in calib]
    if missing:
        raise ValueError(f"calibration data lacks model inputs {missing}")
    arrays = {
        i.name: np.asarray(
            calib[i.name], dtype=onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        )
        for i in inputs
    }
    n = min(a.shape[0] for a in arrays.values())
    step, fixed = _batch_size(model)
    stop = n - step + 1 if fixed else n  # a fixed batch dim cannot take a partial chunk
    if stop <= 0:
        raise ValueError(f"need at least {step} calibration samples, got {n}")
    return [{name: a[s : s + step] for name, a in arrays.items()} for s in range(0, stop, step)]


def onnxsim_prune(
    model: onnx.ModelProto, calib: dict[str, np.ndarray], amount: float
) -> onnx.ModelProto:
    """Wanda structured pruning at `amount` (fraction of channels removed, 0..1) then onnxsim's
    ridge refit on the calibration data; returns a new model that runs in onnxruntime."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    original = onnx.ModelProto()
    original.CopyFrom(model)
    feeds = _to_feeds(original, calib)
    pruned = apply_structured_wanda_pruning(original, calibration_data=feeds, sparsity=amount)
    refit = apply_pruning_finetune(original, pruned, calibration_data=feeds)
    return _drop_stale_shapes(refit)


def _drop_stale_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim leaves pre-pruning ``value_info`` shapes behind; drop them and re-infer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of all tensors after shape inference (unknown dims -> 1)."""
    inferred = _drop_stale_shapes(model)
    infos = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {
        vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        for vi in infos
        if vi.type.tensor_type.HasField("shape")
    }


def _node_macs(node: onnx.NodeProto, weights: dict[str, np.ndarray], shapes: dict) -> int:
    """MACs of one Conv/Gemm/MatMul node for one sample."""
    w = weights.get(node.input[1])
    out = shapes.get(node.output[0])
    if w is None or out is None:
        return 0
    if node.op_type == "Conv":
        return int(np.prod(out[1:])) * int(np.prod(w.shape[1:]))
    return int(np.prod(out[1:])) * int(w.size // max(out[-1], 1))


def count_params_and_macs(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameter count, per-sample MACs of Conv/Gemm/MatMul layers)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shapes = _shapes(model)
    macs = sum(
        _node_macs(n, weights, shapes) for n in model.graph.node if n.op_type in _COMPUTE_OPS
    )
    return sum(int(w.size) for w in weights.values()), macs
