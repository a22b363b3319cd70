from __future__ import annotations

import os

import onnx
from hypothesis import settings

from onnxslim_fr import slim
from onnxslim_fr.testing import assert_same_function

# CI runs the same examples on every clone (a random draw once failed CI on a case no local
# run had seen); HYPOTHESIS_PROFILE=explore draws new ones, and hypothesis keeps failures.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def slim_exact(model: onnx.ModelProto):
    """Slim, then assert the three things every test checks: valid, same function."""
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-5, atol=1e-5)
    return result


def removed(result) -> int:
    """Channels removed from channel groups (a residual group counts each channel once)."""
    return sum(g["size"] - g["kept"] for g in result.report.groups)
