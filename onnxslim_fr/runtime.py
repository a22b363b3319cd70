"""onnxruntime for the library: sessions, runs, and the inputs a model declares."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BadDataError

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
}


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[tuple[int | None, ...], type]]:
    """Shape (None for dynamic dims) and numpy dtype of each real graph input."""
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        specs[vi.name] = (dims, _NP_TYPES.get(t.elem_type, np.float32))
    return specs


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # idle onnxruntime threads would otherwise spin and starve numpy's BLAS between runs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | ort.InferenceSession,
        feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    try:
        return sess.run(None, dict(feeds))
    except Exception as exc:  # onnxruntime raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadDataError(f"onnxruntime rejected the inputs: {first}") from None
