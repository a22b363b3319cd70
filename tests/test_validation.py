"""Validation cannot be fooled: inputs that exercise every branch, sizes the model accepts,
per-output scales, NaN/Inf, non-float outputs, float16 / bfloat16 models.

Damage is planted by hand ("the slimmed model" is a hand-edited copy) and handed to the
gate, either directly (validate.compare) or through slim() with the exact stage replaced.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import Net
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxslim_fr import api, calibrate, slim, subgraph, validate
from onnxslim_fr.cli import main
from onnxslim_fr.errors import BadDataError, SlimError, ValidationError
from onnxslim_fr.feeds import validation_feeds
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.runtime import run, session
from onnxslim_fr.testing import assert_same_function
from onnxslim_fr.validate import compare, default_tolerance


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def _const(name: str, value) -> onnx.TensorProto:
    return nh.from_array(np.asarray(value), name)


def _with_exact_stage_returning(monkeypatch, damaged: onnx.ModelProto) -> None:
    """slim()'s exact stage hands `damaged` to the gate, as a bug in a rewrite would."""
    real = api._exact

    def exact(work):
        _, first, rounds, methods = real(work)
        return damaged, first, rounds, methods

    monkeypatch.setattr(api, "_exact", exact)


# models -------------------------------------------------------------------------------------
def if_model(then_op: str = "Relu") -> onnx.ModelProto:
    """cond ? then_op(x) : Neg(x), the branches reading x from the outer scope."""
    then = h.make_graph([h.make_node(then_op, ["x"], ["t"])], "then", [],
                        [_vi("t", T.FLOAT, [1, 4])])
    other = h.make_graph([h.make_node("Neg", ["x"], ["e"])], "else", [],
                         [_vi("e", T.FLOAT, [1, 4])])
    return _model([h.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                  [_vi("x", T.FLOAT, [1, 4]), _vi("cond", T.BOOL, [])],
                  [_vi("y", T.FLOAT, [1, 4])])


def gather_model(table: np.ndarray) -> onnx.ModelProto:
    """An embedding: ids (1, 16) -> rows of a (50, 4) table."""
    return _model([h.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
                  [_vi("ids", T.INT64, [1, 16])], [_vi("y", T.FLOAT, [1, 16, 4])],
                  [_const("table", table.astype(np.float32))])


def two_outputs(small_gain: float = 1.0) -> onnx.ModelProto:
    """big = 1000 x, small = small_gain * x."""
    return _model([h.make_node("Mul", ["x", "k"], ["big"]),
                   h.make_node("Mul", ["x", "g"], ["small"])],
                  [_vi("x", T.FLOAT, [None, 8])],
                  [_vi("big", T.FLOAT, [None, 8]), _vi("small", T.FLOAT, [None, 8])],
                  [_const("k", np.float32(1000)), _const("g", np.float32(small_gain))])


def non_float_outputs(offset: int = 1_000_000) -> onnx.ModelProto:
    """Integer scores (batch, 8), argmax ids + offset, a boolean mask, a scalar sum."""
    return _model([h.make_node("Cast", ["x"], ["scores"], to=T.INT64),
                   h.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0),
                   h.make_node("Add", ["am", "off"], ["ids"]),
                   h.make_node("Greater", ["x", "zero"], ["mask"]),
                   h.make_node("ReduceSum", ["x"], ["total"], keepdims=0)],
                  [_vi("x", T.FLOAT, [2, 8])],
                  [_vi("scores", T.INT64, [2, 8]), _vi("ids", T.INT64, [2]),
                   _vi("mask", T.BOOL, [2, 8]), _vi("total", T.FLOAT, [])],
                  [_const("off", np.int64(offset)), _const("zero", np.float32(0))])


def unary(op: str, extra: list | None = None) -> onnx.ModelProto:
    """y = op(x) (plus extra nodes writing y from op's output `u`)."""
    nodes = [h.make_node(op, ["x"], ["u" if extra else "y"]), *(extra or [])]
    return _model(nodes, [_vi("x", T.FLOAT, [2, 6])], [_vi("y", T.FLOAT, [2, 6])],
                  [_const("half", np.float32(0.5)), _const("zero", np.float32(0.0)),
                   _const("five", np.float32(5.0))])


def cnn(elem: int = T.FLOAT, opset: int = 17) -> onnx.ModelProto:
    """Conv -> Relu -> Conv, filter 4 of the first Conv a duplicate of filter 1."""
    b = Net((None, 3, 8, 8))
    c = b.conv(b.x, 6)
    b.scale_filter(c, src=1, dst=4, factor=1.0)
    model = b.build(b.conv(b.relu(c), 4), opset=opset)
    if elem != T.FLOAT:
        dtype = h.tensor_dtype_to_np_dtype(elem)
        for t in model.graph.initializer:
            t.CopyFrom(nh.from_array(nh.to_array(t).astype(dtype), t.name))
        for vi in [*model.graph.input, *model.graph.output]:
            vi.type.tensor_type.elem_type = elem
    onnx.checker.check_model(model, full_check=True)
    return model


# 1. every branch, meaningful integers ---------------------------------------------------------
def test_boolean_inputs_are_fed_both_ways_so_a_damaged_branch_is_caught(monkeypatch):
    feeds = validation_feeds(if_model())
    conds = {bool(f["cond"]) for f in feeds}
    assert conds == {False, True}
    # the then-branch (cond True) is damaged: Abs instead of Relu; zeros never ran it
    assert compare(if_model(), if_model("Abs"), feeds).max_rel_error > 0.01
    _with_exact_stage_returning(monkeypatch, if_model("Abs"))
    with pytest.raises(ValidationError):
        slim(if_model(), latency_runs=0)


def test_integer_ids_cover_the_table_they_index_and_catch_a_damaged_row():
    table = np.random.default_rng(0).standard_normal((50, 4))
    damaged = table.copy()
    damaged[1:] *= 1.5  # row 0 intact: all-zero ids would see nothing
    feeds = validation_feeds(gather_model(table))
    ids = np.concatenate([f["ids"] for f in feeds])
    assert ids.min() >= 0 and ids.max() < 50 and ids.max() >= 8  # bounded by the table
    assert compare(gather_model(table), gather_model(damaged), feeds).max_rel_error > 0.1


def test_shape_integers_fall_back_to_values_the_model_accepts():
    """Expand's target shape: zeros do not broadcast against (3, 1); some other try does."""
    model = _model([h.make_node("Expand", ["x", "shape"], ["y"])],
                   [_vi("x", T.FLOAT, [3, 1]), _vi("shape", T.INT64, [2])],
                   [_vi("y", T.FLOAT, ["a", "b"])])
    feeds = validation_feeds(model)
    run(model, feeds[0])  # runs
    result = slim(model, latency_runs=0)
    assert result.report.max_rel_error == 0


# 2. dynamic dimensions --------------------------------------------------------------------
def unet() -> onnx.ModelProto:
    """Concat(x, Resize(Conv_stride2(x))): H and W must be even."""
    w = np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(np.float32)
    return _model([h.make_node("Conv", ["x", "w"], ["d"], strides=[2, 2], pads=[1] * 4,
                               kernel_shape=[3, 3]),
                   h.make_node("Resize", ["d", "", "scales"], ["u"], mode="nearest"),
                   h.make_node("Concat", ["x", "u"], ["y"], axis=1)],
                  [_vi("x", T.FLOAT, [1, 2, "h", "w"])], [_vi("y", T.FLOAT, [1, 4, "h", "w"])],
                  [_const("w", w), _const("scales", np.array([1, 1, 2, 2], np.float32))])


def reflect_pad() -> onnx.ModelProto:
    return _model([h.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
                  [_vi("x", T.FLOAT, [1, "n"])], [_vi("y", T.FLOAT, [1, "m"])],
                  [_const("pads", np.array([0, 3, 0, 3], np.int64))])


def fixed_reshape() -> onnx.ModelProto:
    """Runs only when the dynamic length is 91 = 7 x 13."""
    return _model([h.make_node("Reshape", ["x", "shape"], ["y"])],
                  [_vi("x", T.FLOAT, [1, "n"])], [_vi("y", T.FLOAT, [1, 7, 13])],
                  [_const("shape", np.array([1, 7, 13], np.int64))])


@pytest.mark.parametrize("build", [unet, reflect_pad])
def test_dynamic_dims_take_a_size_the_original_runs_on(build):
    model = build()
    feeds = validation_feeds(model)
    shape = feeds[0]["x"].shape
    assert shape[0] == 1 and all(d > 1 for d in shape[1:])
    result = slim(model, latency_runs=0)
    assert result.report.max_rel_error == 0


def test_a_model_that_runs_at_size_1_is_also_validated_at_a_larger_size():
    """At 1 x 1 a padded 3 x 3 convolution sees only its centre tap."""
    w = np.random.default_rng(2).standard_normal((2, 2, 3, 3)).astype(np.float32)
    model = _model([h.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, kernel_shape=[3, 3])],
                   [_vi("x", T.FLOAT, [1, 2, "h", "w"])], [_vi("y", T.FLOAT, [1, 2, "h", "w"])],
                   [_const("w", w)])
    sizes = [f["x"].shape[2:] for f in validation_feeds(model)]
    assert sizes[0] == (1, 1) and max(sizes) >= (32, 32)
    corner = w.copy()
    corner[:, :, 0, 0] *= 1.5  # a damaged corner tap: invisible at 1 x 1
    damaged = _model(model.graph.node, model.graph.input, model.graph.output,
                     [_const("w", corner)])
    assert compare(model, damaged, validation_feeds(model)[:1]).max_rel_error == 0
    assert compare(model, damaged, validation_feeds(model)).max_rel_error > 1e-3


def test_no_size_runs_refuses_naming_the_input_and_input_shape(tmp_path, capsys):
    with pytest.raises(BadDataError, match=r"\bx\b.*--input-shape x:"):
        validation_feeds(fixed_reshape())
    path = tmp_path / "m.onnx"
    onnx.save(fixed_reshape(), path)
    assert main([str(path), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input-shape" in err and "Traceback" not in err
    assert main([str(path), str(tmp_path / "out.onnx"), "--input-shape", "x:1x91"]) == 0


def test_calibration_samples_stand_in_when_no_size_runs():
    sample = np.ones((5, 91), np.float32)
    feeds = validation_feeds(fixed_reshape(), fallback=[{"x": sample}])
    assert [f["x"].shape for f in feeds] == [(1, 91)]


def test_exact_stage_is_also_validated_on_the_calibration_data(monkeypatch):
    """The damage (an extra 0.5 relu(x - 5)) shows only on inputs above 5: random normal
    inputs never get there, the calibration data does."""
    original = _model([h.make_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, [None, 6])],
                      [_vi("y", T.FLOAT, [None, 6])])
    damaged = unary("Relu", [h.make_node("Sub", ["x", "five"], ["s"]),
                             h.make_node("Relu", ["s"], ["r"]),
                             h.make_node("Mul", ["r", "half"], ["m"]),
                             h.make_node("Add", ["u", "m"], ["y"])])
    damaged.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    damaged.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    assert compare(original, damaged, validation_feeds(original)).max_rel_error == 0
    _with_exact_stage_returning(monkeypatch, damaged)
    data = {"x": np.full((16, 6), 10.0, np.float32)}
    with pytest.raises(ValidationError):
        slim(original, data=data, ratio=0.1, latency_runs=0)


# 3. NaN / Inf ----------------------------------------------------------------------------
def test_nan_in_the_slimmed_output_is_an_infinite_error(monkeypatch):
    nan_where_negative = unary("Log", [h.make_node("Mul", ["u", "zero"], ["z"]),
                                       h.make_node("Relu", ["x"], ["r"]),
                                       h.make_node("Add", ["r", "z"], ["y"])])
    relu = unary("Relu")
    cmp = compare(relu, nan_where_negative, validation_feeds(relu))
    assert cmp.max_rel_error == math.inf and not cmp.within(1e-4)
    _with_exact_stage_returning(monkeypatch, nan_where_negative)
    with pytest.raises(ValidationError, match="NaN"):
        slim(relu, latency_runs=0)


def test_non_finite_values_the_original_has_too_are_not_errors():
    log = unary("Log")  # NaN where x < 0, in both models
    feeds = validation_feeds(log)
    assert np.isnan(run(log, feeds[0])[0]).any()
    assert compare(log, log, feeds).max_rel_error == 0
    inf = unary("Reciprocal", [h.make_node("Mul", ["x", "zero"], ["z"]),
                               h.make_node("Div", ["x", "z"], ["y"])])  # x / 0 = +-inf
    assert np.isinf(run(inf, feeds[0])[0]).any()
    assert compare(inf, inf, feeds).max_rel_error == 0
    # a finite value where the original has NaN is a change too
    assert compare(log, unary("Abs"), feeds).max_rel_error == math.inf


# 4. one scale per output ------------------------------------------------------------------
def test_each_output_is_measured_on_its_own_scale():
    cmp = compare(two_outputs(), two_outputs(small_gain=1.05), validation_feeds(two_outputs()))
    assert cmp.max_rel_error == pytest.approx(0.05, rel=1e-3)
    rows = {r["name"]: r for r in cmp.output_rows()}
    assert rows["big"]["max_rel_error"] == 0
    assert rows["small"]["max_rel_error"] == pytest.approx(0.05, rel=1e-3)


def test_report_lists_the_error_of_every_output():
    report = slim(two_outputs(), latency_runs=0).report.to_json()
    assert [r["name"] for r in report["output_errors"]] == ["big", "small"]
    assert set(report["output_errors"][0]) == {"name", "max_abs_error", "max_rel_error"}


# 5. non-float outputs, shapes, output lists ------------------------------------------------
def test_integer_and_boolean_outputs_must_match_exactly():
    feeds = validation_feeds(non_float_outputs())
    cmp = compare(non_float_outputs(), non_float_outputs(offset=1_000_001), feeds)
    assert cmp.max_rel_error == 1.0  # every id differs (by 1 in a million): share 1
    rows = {r["name"]: r for r in cmp.output_rows()}
    assert rows["ids"]["max_rel_error"] == 1.0 and rows["mask"]["max_rel_error"] == 0
    assert cmp.mismatches == 2 * len(feeds) and not cmp.within(1e-4)
    same = compare(non_float_outputs(), non_float_outputs(), feeds)
    assert same.within(0.0) and same.top1_agreement is None  # int scores are no class scores


def test_a_changed_output_shape_is_not_hidden_by_broadcasting():
    ones = [h.make_node("Mul", ["x", "zero"], ["z"]), h.make_node("Add", ["z", "one"], ["y"])]
    original = _model(ones, [_vi("x", T.FLOAT, [1, 4])], [_vi("y", T.FLOAT, [1, 4])],
                      [_const("zero", np.float32(0)), _const("one", np.float32(1))])
    reduced = _model([*ones[:1], h.make_node("Add", ["z", "one"], ["o"]),
                      h.make_node("ReduceMax", ["o"], ["y"], keepdims=1, axes=[1])],
                     [_vi("x", T.FLOAT, [1, 4])], [_vi("y", T.FLOAT, [1, 1])],
                     [_const("zero", np.float32(0)), _const("one", np.float32(1))])
    assert compare(original, reduced, validation_feeds(original)).max_rel_error == math.inf
    as_double = _model([h.make_node("Relu", ["x"], ["r"]),
                        h.make_node("Cast", ["r"], ["y"], to=T.DOUBLE)],
                       [_vi("x", T.FLOAT, [2, 6])], [_vi("y", T.DOUBLE, [2, 6])])
    cmp = compare(unary("Relu"), as_double, validation_feeds(as_double))
    assert cmp.max_rel_error == math.inf and "float64" in cmp.failure(1e-4)


def test_a_slimmed_model_that_does_not_run_fails_validation_instead_of_blaming_the_data(
        monkeypatch):
    flat = [_vi("x", T.FLOAT, [1, "n"])], [_vi("y", T.FLOAT, ["m"])]
    original = _model([h.make_node("Reshape", ["x", "s"], ["y"])], *flat,
                      [_const("s", np.array([-1], np.int64))])
    only_length_4 = _model([h.make_node("Reshape", ["x", "s"], ["y"])], *flat,
                           [_const("s", np.array([4], np.int64))])
    cmp = compare(original, only_length_4, validation_feeds(original))
    assert cmp.max_rel_error == math.inf and "fails to run" in cmp.failure(1e-4)
    renamed = _model([h.make_node("Reshape", ["x", "s"], ["z"])], flat[0],
                     [_vi("z", T.FLOAT, ["m"])], [_const("s", np.array([-1], np.int64))])
    assert compare(original, renamed, validation_feeds(original)).max_rel_error == math.inf
    unknown_op = original.__deepcopy__()
    unknown_op.graph.node[0].domain = "com.example"
    unknown_op.opset_import.append(h.make_opsetid("com.example", 1))
    cmp = compare(original, unknown_op, [])
    assert cmp.max_rel_error == math.inf and "cannot load" in cmp.failure(1e-4)
    _with_exact_stage_returning(monkeypatch, only_length_4)
    with pytest.raises(ValidationError, match="fails to run"):
        slim(original, latency_runs=0)


# 6. float16 / bfloat16 -------------------------------------------------------------------------
def test_float16_model_loses_its_duplicate_filter_and_validates():
    model = cnn(T.FLOAT16)
    result = slim(model, latency_runs=0)
    assert default_tolerance(model) == 2e-3 and default_tolerance(cnn()) == 1e-4
    assert [(g["size"], g["kept"]) for g in result.report.groups] == [(6, 5), (4, 4)]
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValidationError):  # an explicit tolerance still wins
        slim(model, latency_runs=0, tolerance=1e-6)


def test_float16_calibrated_run_ends_at_exit_0(tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(T.FLOAT16), path)
    data = np.random.default_rng(0).standard_normal((128, 3, 8, 8)).astype(np.float16)
    np.savez(tmp_path / "calib.npz", x=data)
    argv = [str(path), str(out), "--data", str(tmp_path / "calib.npz"), "--ratio", "0.3"]
    assert main(argv) == 0
    assert onnx.load(out).graph.output[0].type.tensor_type.elem_type == T.FLOAT16


def test_read_points_and_stages_are_declared_with_their_real_type():
    work = normalize(cnn(T.FLOAT16))
    relu = next(n.output[0] for n in work.graph.node if n.op_type == "Relu")
    feeds = {"x": np.ones((2, 3, 8, 8), np.float16)}
    augmented = subgraph.with_outputs(work, [relu])
    assert augmented.graph.output[-1].type.tensor_type.elem_type == T.FLOAT16
    assert run(augmented, feeds)[-1].dtype == np.float16
    stage = subgraph.cut(Graph(work), [work.graph.output[0].name], {relu})
    assert {vi.type.tensor_type.elem_type for vi in [*stage.graph.input, *stage.graph.output]} \
        == {T.FLOAT16}
    session(stage).run(None, {relu: np.ones((2, 6, 8, 8), np.float16)})


def test_float16_statistics_do_not_overflow():
    """65536+ positions per batch: a float16 sum of squares passes 65504."""
    work = normalize(cnn(T.FLOAT16))
    graph = Graph(work)
    from onnxslim_fr.channels import build_groups

    groups = build_groups(graph)
    x = 3 * np.random.default_rng(0).standard_normal((1100, 3, 8, 8)).astype(np.float16)
    stats = calibrate.collect(work, groups, calibrate.Dataset([{"x": x}]))
    assert stats.points and all(np.isfinite(p.gram).all() for p in stats.points.values())


def bf16_cast_model() -> onnx.ModelProto:
    """bfloat16 in, bfloat16 out, float32 arithmetic in between (onnxruntime's CPU provider
    casts bfloat16 but has no bfloat16 Relu / Conv)."""
    return _model([h.make_node("Cast", ["x"], ["xf"], to=T.FLOAT),
                   h.make_node("Relu", ["xf"], ["r"]),
                   h.make_node("Cast", ["r"], ["y"], to=T.BFLOAT16)],
                  [_vi("x", T.BFLOAT16, [None, 4])], [_vi("y", T.BFLOAT16, [None, 4])])


def test_bfloat16_tensors_are_drawn_compared_timed_and_tolerated(tmp_path):
    model = bf16_cast_model()
    feeds = validation_feeds(model)
    assert feeds[0]["x"].dtype == ml_dtypes.bfloat16
    assert run(model, feeds[0])[0].dtype == ml_dtypes.bfloat16
    assert default_tolerance(model) == 2e-2
    assert compare(model, model, feeds).max_rel_error == 0
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main([str(path), str(tmp_path / "out.onnx")]) == 0  # latency runs included


def test_bfloat16_model_onnxruntime_cannot_run_is_refused_cleanly(tmp_path, capsys):
    model = cnn(T.BFLOAT16, opset=22)  # Conv takes bfloat16 from opset 22
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main([str(path), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(SlimError):
        slim(model, latency_runs=0)


# 7. the original against itself ---------------------------------------------------------------
SELF_CASES = {
    "if": if_model, "gather": lambda: gather_model(np.arange(200.0).reshape(50, 4)),
    "two outputs": two_outputs, "non-float": non_float_outputs, "nan": lambda: unary("Log"),
    "float16": lambda: cnn(T.FLOAT16), "bfloat16": bf16_cast_model, "unet": unet,
    "pad": reflect_pad, "cnn": cnn,
}


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("case", sorted(SELF_CASES))
def test_the_original_against_itself_has_exactly_zero_error(case, seed):
    model = SELF_CASES[case]()
    cmp = compare(model, model, validation_feeds(model, seed=seed))
    assert (cmp.max_abs_error, cmp.max_rel_error, cmp.mismatches) == (0, 0, 0)
    assert all(r["max_rel_error"] == 0 and r["max_abs_error"] == 0 for r in cmp.output_rows())
    assert cmp.within(0.0)


# 4. The original runs once per batch ------------------------------------------------------
def test_a_bound_search_runs_the_original_once_per_batch(monkeypatch):
    """A --max-error search compares eight candidates with the original on the same
    batches: the original's outputs are computed once, and the answer is the same as
    when each comparison runs it again."""
    net = Net((None, 3, 8, 8))
    y = net.relu(net.conv("x", 8))
    y = net.gemm(net.flatten(net.gap(net.relu(net.conv(y, 16)))), 4)
    model = net.build(y)
    data = {"x": np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    runs = []
    real = validate.run
    monkeypatch.setattr(validate, "run", lambda sess, feeds: runs.append(feeds) or
                        real(sess, feeds))
    cached = slim(model, data=data, max_error=0.05, batch_size=8, latency_runs=0)
    assert len(runs) == len({id(f) for f in runs})  # no batch ran twice
    monkeypatch.setattr(validate.References, "known", lambda self, feeds: None)
    fresh = slim(model, data=data, max_error=0.05, batch_size=8, latency_runs=0)
    assert cached.report.max_rel_error == fresh.report.max_rel_error
    assert cached.report.after.flops == fresh.report.after.flops


# 5. The interface -------------------------------------------------------------------------
def test_weights_listed_as_graph_inputs_become_plain_weights_with_a_note():
    """keep_initializers_as_inputs lists every weight as a graph input too; slimming treats
    them as weights, so the output drops those inputs, and the report says so by name."""
    net = Net((None, 3, 8, 8))
    y = net.gemm(net.flatten(net.gap(net.relu(net.conv(net.relu(net.conv("x", 8)), 16)))), 4)
    model = net.build(y)
    for t in model.graph.initializer:
        model.graph.input.append(h.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    data = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result = slim(model, data=data, ratio=0.5, latency_runs=0)
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert any("only carried weights" in n and "conv1.w" in n for n in result.report.notes)
    unchanged = slim(model, latency_runs=0)  # nothing exact to remove: handed back as it was
    assert len(unchanged.model.graph.input) == len(model.graph.input)
    assert not any("only carried weights" in n for n in unchanged.report.notes)


def test_a_session_whose_layout_passes_lose_an_asked_output_is_built_without_them(
        monkeypatch):
    """onnxruntime 1.32's NCHWc passes fused a Conv that a residual Add reads into the Add,
    dropping the Conv's output that the sensitivity probe had asked for ('Failed to find
    node output', exit 3 on a ResNet-18 with dead channels). The build is retried at the
    extended level, without layout passes."""
    real, levels = ort.InferenceSession, []

    def flaky(model, opts, **kwargs):
        levels.append(opts.graph_optimization_level)
        if opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            raise RuntimeError("Failed to find node output or a constant initializer "
                               "producing output: conv_out.")
        return real(model, opts, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", flaky)
    b = Net((None, 4))
    model = b.build(b.gemm(b.x, 3))
    sess = session(model)
    assert levels == [ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                      ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED]
    assert sess.run(None, {"x": np.ones((2, 4), np.float32)})[0].shape == (2, 3)
