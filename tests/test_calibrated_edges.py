"""Calibrated mode at its edges: nothing to calibrate, too few samples, a fixed batch size,
and a fidelity bound that needs no labels (--min-agreement)."""

import numpy as np
import onnx
from builders import Net
from onnx import TensorProto, helper, numpy_helper

import onnxslim_fr
from onnxslim_fr.cli import main

MODELS = "models"


def _mlp(hidden: int, batch: int | None = None) -> onnx.ModelProto:
    b = Net((batch, 16))
    y = b.gemm(b.relu(b.gemm(b.x, hidden)), 4)
    return b.build(y)


def test_everything_frozen_ends_at_exit_0_unchanged_with_a_note(tmp_path):
    """Conv -> Softmax over channels -> output: the only group is frozen."""
    b = Net((None, 3, 8, 8))
    y = b.op("Softmax", [b.conv(b.x, 4)], (None, 4, 8, 8), axis=1)
    model = b.build(y)
    data = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = onnxslim_fr.slim(model, data=data, ratio=0.3)
    assert result.report.after.flops == result.report.before.flops
    assert any("nothing to calibrate" in n and "frozen" in n for n in result.report.notes)


def test_quantized_graph_is_out_of_scope_with_a_note():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "q", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    data = {"x": np.ones((8, 4), np.float32)}
    result = onnxslim_fr.slim(model, data=data, ratio=0.3)
    assert any("quantized graph (QuantizeLinear" in n for n in result.report.notes)


def test_fewer_samples_than_channels_warns_and_still_meets_the_budget():
    model = _mlp(64)
    data = {"x": np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)}
    result = onnxslim_fr.slim(model, data=data, ratio=0.3)
    notes = [n for n in result.report.notes if "observations" in n]
    assert notes and "group of 64 channels" in notes[0]
    # flat error curves (rank 10 < 64) must not make it remove far more than asked
    kept = result.report.after.flops / result.report.before.flops
    assert 0.6 <= kept <= 0.72


def test_fewer_samples_warning_is_logged_for_the_cli(tmp_path, caplog):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(64), path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((10, 16))
             .astype(np.float32))
    code = main([str(path), str(tmp_path / "o.onnx"), "--data", str(tmp_path / "d.npz"),
                 "--ratio", "0.3"])
    assert code == 0
    assert any("observations" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_a_fixed_batch_size_takes_its_calibration_data_in_batches_of_that_size():
    model = _mlp(32, batch=1)
    data = {"x": np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)}
    result = onnxslim_fr.slim(model, data=data, ratio=0.3)
    assert result.report.after.flops < result.report.before.flops


def test_min_agreement_bound_needs_no_labels_and_holds_on_the_holdout():
    calib = dict(np.load(f"{MODELS}/digits_img_calib.npz"))
    test = dict(np.load(f"{MODELS}/digits_img_test.npz"))
    calib.pop("labels")
    test.pop("labels")
    result = onnxslim_fr.slim(f"{MODELS}/digits_cnn.onnx", data=calib, holdout=test,
                              min_agreement=0.97)
    assert result.report.top1_agreement >= 0.97
    assert result.report.after.flops < 0.8 * result.report.before.flops
