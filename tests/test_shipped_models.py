"""Every shipped model, both exporters: slims without error, groups listed, masked filters go."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim_fr import analyze, slim
from onnxslim_fr.testing import run

MODELS = Path(__file__).resolve().parents[1] / "models"
ALL = sorted(p.name for p in MODELS.glob("*.onnx"))
#: model file -> prefix of its <prefix>_calib.npz / <prefix>_test.npz data
MANIFEST: dict[str, str] = json.loads((MODELS / "manifest.json").read_text())


def _test_data(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(MODELS / f"{MANIFEST[name]}_test.npz"))


def _feeds(model: onnx.ModelProto, data: dict[str, np.ndarray], limit: int = 32
           ) -> dict[str, np.ndarray]:
    """The model's inputs from its data file (targets such as labels are not inputs)."""
    names = [i.name for i in model.graph.input
             if i.name not in {t.name for t in model.graph.initializer}]
    if len(names) == 1 and names[0] not in data:
        return {names[0]: data["input"][:limit]}
    return {n: data[n][:limit] for n in names}


def test_every_shipped_model_has_data():
    assert set(ALL) <= set(MANIFEST), sorted(set(ALL) - set(MANIFEST))


@pytest.mark.parametrize("name", ALL)
def test_shipped_model_slims_exactly_and_keeps_its_outputs(name):
    model = onnx.load(MODELS / name)
    _, rows = analyze(model)
    assert rows
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = _feeds(model, _test_data(name))
    for a, b in zip(run(model, feeds), run(result.model, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())))


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
    data = _test_data("digits_cnn.onnx")
    acc = [float((run(m, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())
           for m in (model, result.model)]
    assert acc[0] == acc[1]
    assert result.report.after.flops < 0.6 * result.report.before.flops
