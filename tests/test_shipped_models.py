"""Every shipped model, both exporters: slims without error, groups listed, masked filters go."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim_fr import analyze, slim
from onnxslim_fr.testing import run

MODELS = Path(__file__).resolve().parents[1] / "models"
ALL = sorted(p.name for p in MODELS.glob("*.onnx"))


def _test_data(name: str) -> dict[str, np.ndarray]:
    kind = "flat" if "mlp" in name else "img"
    return dict(np.load(MODELS / f"digits_{kind}_test.npz"))


@pytest.mark.parametrize("name", ALL)
def test_shipped_model_slims_and_keeps_its_outputs(name):
    model = onnx.load(MODELS / name)
    _, rows = analyze(model)
    assert rows and all(r["frozen"] is None or "logits" in r["frozen"] for r in rows)
    result = slim(model, latency_runs=0)
    data = _test_data(name)
    a = run(model, {"input": data["input"]})[0]
    b = run(result.model, {"input": data["input"]})[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_masked_cnn_loses_every_zeroed_filter_and_keeps_accuracy():
    model = onnx.load(MODELS / "digits_cnn_masked.onnx")
    zeroed = sum(int((np.abs(w.reshape(w.shape[0], -1)).sum(1) == 0).sum())
                 for w in (onnx.numpy_helper.to_array(t) for t in model.graph.initializer)
                 if w.ndim == 4)
    result = slim(model, latency_runs=0)
    conv_rows = [len(onnx.numpy_helper.to_array(t)) for t in result.model.graph.initializer
                 if len(t.dims) == 4]
    orig_rows = [t.dims[0] for t in model.graph.initializer if len(t.dims) == 4]
    assert sum(orig_rows) - sum(conv_rows) == zeroed == 40
    data = _test_data("cnn")
    acc = [float((run(m, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())
           for m in (model, result.model)]
    assert acc[0] == acc[1]
    assert result.report.after.flops < 0.6 * result.report.before.flops
