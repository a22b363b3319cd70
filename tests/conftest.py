from __future__ import annotations

import onnx

from onnxslim_fr import slim
from onnxslim_fr.testing import assert_same_function


def slim_exact(model: onnx.ModelProto):
    """Slim, then assert the three things every test checks: valid, same function."""
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-5, atol=1e-5)
    return result


def removed(result) -> int:
    """Channels removed from channel groups (a residual group counts each channel once)."""
    return sum(g["size"] - g["kept"] for g in result.report.groups)
