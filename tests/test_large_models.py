"""Models past protobuf's 2 GiB, and the memory of slimming large models.

A real 2 GiB model would make the suite slow, so the limit is lowered: model_io's
PROTOBUF_LIMIT (what protobuf can serialize) becomes a few KiB, and weights.STORE_BYTES
(past which weights are kept on disk while `slim` runs) is lowered the same way. Every
whole-model serialization of the library goes through model_io.serialized, which refuses
past the limit: a code path that still serialized a whole model would fail these tests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import Net
from onnx import TensorProto as T
from onnx import helper as h

from onnxslim_fr import model_io, runtime, slim, weights
from onnxslim_fr.cli import main
from onnxslim_fr.errors import InternalError

LIMIT = 4096  # bytes: "2 GiB" for these tests


def big_cnn() -> onnx.ModelProto:
    """x ─ conv(32) ─ relu ─ conv(16) ─ relu ─ conv(8): conv1's filter 7 = 2.5 x filter 2,
    so exact mode removes one channel. 3.5 KiB + 18 KiB + 4.6 KiB of weights: over LIMIT."""
    b = Net((None, 3, 8, 8))
    c1 = b.conv(b.x, 32)
    c2 = b.conv(b.relu(c1), 16)
    y = b.conv(b.relu(c2), 8)
    b.scale_filter(c1, src=2, dst=7, factor=2.5)
    model = b.build(y)
    model.ir_version = 10
    return model


def outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture
def low_limit(monkeypatch):
    """Protobuf's limit lowered to a few KiB; the store takes every model."""
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", LIMIT)
    monkeypatch.setattr(weights, "STORE_BYTES", 0)


def test_the_lowered_limit_is_enforced(low_limit):
    """The guard the other tests rely on: serializing a model over the limit fails."""
    with pytest.raises(InternalError, match="external data"):
        model_io.serialized(big_cnn())


@pytest.mark.parametrize("input_external", [True, False])
def test_model_over_the_limit_is_slimmed_exactly_to_external_data(tmp_path, capsys, low_limit,
                                                                 monkeypatch, input_external):
    src = tmp_path / "in.onnx"
    if input_external:  # the only way a real model over 2 GiB can be stored
        onnx.save_model(big_cnn(), str(src), save_as_external_data=True,
                        location="in.onnx.data", size_threshold=0)
    else:
        onnx.save_model(big_cnn(), str(src))
    out = tmp_path / "out" / "out.onnx"
    scratch = tmp_path / "tmp"  # where the store and the sessions' files go
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main([str(src), str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == T.EXTERNAL for t in header.graph.initializer
               if int(np.prod(t.dims)) * 4 >= model_io.EXTERNAL_THRESHOLD)
    assert out.stat().st_size < LIMIT
    onnx.checker.check_model(str(out), full_check=True)
    assert onnx.load(str(out)).graph.initializer[0].dims[0] == 31  # the planted channel went
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, feeds)[0], outputs(src, feeds)[0],
                               rtol=1e-4, atol=1e-4)
    assert not list(scratch.iterdir())  # the store went with the run


def test_result_model_is_whole_and_matches(low_limit):
    """The ModelProto handed back from Python is self-contained (the store is gone)."""
    model = big_cnn()
    result = slim(model, latency_runs=0)
    assert not any(t.data_location == T.EXTERNAL for t in result.model.graph.initializer)
    assert result.model.graph.initializer[0].dims[0] == 31
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(runtime.run(result.model, feeds)[0], runtime.run(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)
    assert result.report.before.file_bytes == pytest.approx(model.ByteSize(), rel=0.05)


def test_calibrated_mode_runs_on_stored_weights(low_limit):
    """Calibration, refit and probes build their sessions from models whose weights are in
    the store: they must see the same values."""
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    result = slim(big_cnn(), data=data, ratio=0.2, latency_runs=0)
    assert not any(t.data_location == T.EXTERNAL for t in result.model.graph.initializer)
    assert result.report.after.flops < result.report.before.flops
    onnx.checker.check_model(result.model, full_check=True)


def test_sessions_of_large_models_are_read_from_a_file(monkeypatch):
    """Past SPILL_BYTES a session maps its weights from a file instead of holding the
    serialized bytes: same outputs, and the temporary files are gone after."""
    model = big_cnn()
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    expected = runtime.run(model, feeds)[0]
    monkeypatch.setattr(runtime, "SPILL_BYTES", 0)
    monkeypatch.setattr(model_io, "serialized", _whole_model_refused(model_io.serialized))
    np.testing.assert_array_equal(runtime.run(model, feeds)[0], expected)


def _whole_model_refused(serialized):
    def guarded(model, ir_version=None):
        if len(model.graph.initializer) and any(t.HasField("raw_data") and len(t.raw_data) >
                                                model_io.EXTERNAL_THRESHOLD
                                                for t in model.graph.initializer):
            raise AssertionError("a model with its weights inline was serialized")
        return serialized(model, ir_version)
    return guarded


# initializers listed as graph inputs (IR < 4 requires it; old exporters did it later) ----
def listed_cnn(ir_version: int) -> onnx.ModelProto:
    """big_cnn at opset 8 with every initializer also declared as a graph input."""
    model = big_cnn()
    model.ir_version = ir_version
    del model.opset_import[:]
    model.opset_import.append(h.make_opsetid("", 8 if ir_version < 4 else 11))
    g = model.graph
    g.input.extend(h.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in g.initializer)
    return model


def test_ir3_initializers_listed_as_inputs_stay_listed_with_their_new_shapes(tmp_path):
    """IR 3 requires every initializer to be a graph input: the slimmed model still lists
    each of its initializers, with the shape it now has, and nothing else was added."""
    model = listed_cnn(3)
    onnx.checker.check_model(model)
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src))
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out)]) == 0
    slimmed = onnx.load(str(out))
    assert slimmed.ir_version == 3
    onnx.checker.check_model(slimmed, full_check=True)
    inits = {t.name: list(t.dims) for t in slimmed.graph.initializer}
    listed = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in slimmed.graph.input}
    assert slimmed.graph.input[0].name == "x"
    assert {n: listed[n] for n in inits} == inits
    assert set(listed) == set(inits) | {"x"}
    assert inits[model.graph.initializer[0].name][0] == 31
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, feeds)[0], outputs(src, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_ir4_initializers_listed_as_inputs_keep_the_data_interface(tmp_path):
    """IR >= 4: initializers listed as inputs are overridable weights, not data. The
    slimmed model's data inputs are the original's, and it computes the same function."""
    model = listed_cnn(7)
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src))
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out)]) == 0
    slimmed = onnx.load(str(out))
    onnx.checker.check_model(slimmed, full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    for i in slimmed.graph.input:  # any weight still listed declares its new shape
        t = next((t for t in slimmed.graph.initializer if t.name == i.name), None)
        if t is not None:
            assert [d.dim_value for d in i.type.tensor_type.shape.dim] == list(t.dims)
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, feeds)[0], outputs(src, feeds)[0],
                               rtol=1e-4, atol=1e-4)


# memory: one copy of the weights, one session at a time -------------------------------
def test_stored_model_copies_share_one_copy_of_the_weights(low_limit):
    """Inside slim's scope a model's large weights are references: copying the model costs
    no weights, and the index reads them as read-only views of the one stored copy."""
    from onnxslim_fr.graph import Graph

    model = big_cnn()
    with weights.scope():
        stored = weights.intern(model)
        # conv2's weight (4608 elements) is stored; the small ones stay inline
        assert stored.ByteSize() < model.ByteSize() - 4 * weights.SMALL_ELEMENTS
        copy = onnx.ModelProto()
        copy.CopyFrom(stored)
        name = model.graph.initializer[2].name  # the 16 x 32 x 3 x 3 weight
        a, b = Graph(stored).const(name), Graph(copy).const(name)
        np.testing.assert_array_equal(a, nh_array(model, name))
        assert not a.flags.writeable and not b.flags.writeable
        whole = weights.materialize(stored)
    assert whole == model  # made whole again, byte for byte


def nh_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_validation_holds_one_session_at_a_time(monkeypatch):
    """The original's outputs are kept and its session released before the slimmed
    model's session is built: two live sessions would hold the weights twice more."""
    import gc
    import weakref

    from onnxslim_fr import validate

    live: list[weakref.ref] = []
    most = [0]
    build = validate.session

    def counted(model):
        gc.collect()
        alive = sum(r() is not None for r in live)
        most[0] = max(most[0], alive + 1)
        sess = build(model)
        live.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(validate, "session", counted)
    model = big_cnn()
    feeds = [{"x": np.ones((1, 3, 8, 8), np.float32)}] * 3
    cmp = validate.compare(model, model, feeds)
    assert cmp.max_rel_error == 0.0 and len(live) == 2
    assert most[0] == 1
