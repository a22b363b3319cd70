"""Patterns real exporters write (paddle2onnx, torch's LSTM export), each as a tiny graph.

    paddle2onnx classifier head:
    x ─ Conv(C) ─ Relu ─ GAP ─┬──────────────────────────────────── Reshape ─ MatMul ─ Add ─ y
                              └ Shape ─ Cast ─ Slice[0:1] ─ Cast ─┐    ↑
                                               Constant [C] ─ Cast ┴ Concat

The literal C in the Concat must follow the kept channel count in every model the pipeline
runs, including the slices the sequential refit cuts out of it.

    torch's CRNN (conv stack into an LSTM):
    x ─ Conv(C, #3 = #1) ─ Relu ─ Squeeze(H) ─ Transpose ─ t [W, N, C] ─ LSTM ─ y
                                                           └ Shape ─ Gather(1) ─ Unsqueeze ─┐
                               ConstantOfShape (initial h, c) ─ Concat([1], N, [hidden]) ──┘

The initial state reads only the batch size: it does not depend on C and freezes nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import analyze, model_io, slim
from onnxslim_fr.errors import BadModelError
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.testing import assert_same_function

RNG = np.random.default_rng(0)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def paddle_head(channels: int = 16, classes: int = 3) -> onnx.ModelProto:
    """The module docstring's graph, with paddle2onnx's Constant nodes and int32 casts."""
    w = (RNG.standard_normal((channels, 3, 3, 3)) / 5).astype(np.float32)
    inits = [_init("w", w), _init("b", (0.1 * RNG.standard_normal(channels)).astype(np.float32)),
             _init("fc", RNG.standard_normal((channels, classes)).astype(np.float32)),
             _init("fc_b", np.zeros(classes, np.float32))]

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=_init(name, value))

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Shape", ["p"], ["s64"]),
             helper.make_node("Cast", ["s64"], ["s"], to=TensorProto.INT32),
             const("axes", np.array([0], np.int64)), const("starts", np.array([0], np.int64)),
             const("ends", np.array([1], np.int64)),
             helper.make_node("Slice", ["s", "starts", "ends", "axes"], ["n"]),
             const("fill", np.array([channels], np.int32)),
             helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64),
             helper.make_node("Cast", ["fill"], ["fill64"], to=TensorProto.INT64),
             helper.make_node("Concat", ["n64", "fill64"], ["tgt"], axis=0),
             helper.make_node("Reshape", ["p", "tgt"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["m"]),
             helper.make_node("Add", ["m", "fc_b"], ["y"])]
    graph = helper.make_graph(
        nodes, "paddle_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)],
                             ir_version=10)


def test_calibrated_refit_rewrites_a_literal_channel_count_in_a_computed_reshape_target():
    """The refit runs slices of the model without shape information; the Reshape target's
    literal C must still become the kept count (it stayed C: onnxruntime refused the run)."""
    model = paddle_head()
    data = {"x": RNG.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result = slim(model, data=data, ratio=0.5, round_to=1, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    kept = result.report.groups[0]["kept"]
    assert kept < 16 and result.report.groups[0]["frozen"] is None
    fc = next(t for t in result.model.graph.initializer if t.name == "fc")
    assert fc.dims[0] == kept
    assert result.report.top1_agreement is not None


def test_exact_mode_keeps_the_paddle_head_function():
    model = paddle_head()
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-5, atol=1e-5)


def test_onnxruntime_failing_inside_the_calibrated_pass_is_an_internal_error(monkeypatch):
    """A slimmed model onnxruntime refuses mid-refit is our bug: InternalError (exit 3) with
    one line, never onnxruntime's raw exception escaping slim()."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from onnxslim_fr import errors, refit

    def refuses(model, threads=None):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Reshape node refused\nsecond line")

    monkeypatch.setattr(refit, "session", refuses)
    data = {"x": RNG.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    with pytest.raises(errors.InternalError, match=r"calibrated pass failed: .*Reshape") as info:
        slim(paddle_head(), data=data, ratio=0.5, latency_runs=0)
    assert "second line" not in str(info.value) and info.value.exit_code == 3


def crnn(gather: int = 1, channels: int = 6, hidden: int = 5) -> onnx.ModelProto:
    """The module docstring's CRNN; `gather` picks the dimension the initial state reads
    (1: the batch, as torch writes it; 2: the channels, which must freeze)."""
    w = RNG.standard_normal((channels, 3, 1, 3)).astype(np.float32)
    w[3] = w[1]
    lstm_w = RNG.standard_normal((1, 4 * hidden, channels)).astype(np.float32) / 3
    inits = [_init("w", w), _init("b", np.zeros(channels, np.float32)),
             _init("W", lstm_w),
             _init("R", RNG.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) / 3),
             _init("sq", np.array([2], np.int64)), _init("idx", np.array(gather, np.int64)),
             _init("ax0", np.array([0], np.int64)), _init("one", np.array([1], np.int64)),
             _init("hid", np.array([hidden if gather == 1 else 1], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[0, 1, 0, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Squeeze", ["r", "sq"], ["s"]),
             helper.make_node("Transpose", ["s"], ["t"], perm=[2, 0, 1]),
             helper.make_node("Shape", ["t"], ["shape"]),
             helper.make_node("Gather", ["shape", "idx"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Concat", ["one", "n1", "hid"], ["state_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["state_shape"], ["h0"],
                              value=_init("zero", np.zeros(1, np.float32))),
             helper.make_node("LSTM", ["t", "W", "R", "", "", "h0", "h0"], ["y"],
                              hidden_size=hidden)]
    graph = helper.make_graph(
        nodes, "crnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 1, "N", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


def test_lstm_initial_state_from_the_batch_size_does_not_freeze_the_channels():
    model = crnn()
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-5, atol=1e-5)
    conv = result.report.groups[0]
    assert (conv["size"], conv["kept"], conv["frozen"]) == (6, 5, None)
    w = next(t for t in result.model.graph.initializer if t.name == "W")
    assert w.dims[-1] == 5  # the LSTM's input columns took the plan


def test_a_value_read_off_the_channel_axis_still_freezes():
    """Gather(2) of [W, N, C] is the channel count: ConstantOfShape would change shape."""
    model = crnn(gather=2, hidden=5)
    _, rows = analyze(model)
    assert rows[0]["frozen"] is not None and "ConstantOfShape" in rows[0]["frozen"]


def paddle_flatten_chain(blocks: int = 6, channels: int = 8) -> onnx.ModelProto:
    """x [N, 3, H, W] ─ Conv(C, #5 = #2) ─ Reshape[0, 0, -1] ─ Transpose ─ t [N, HW, C], then
    `blocks` times: MatMul ─ Relu ─ Reshape(Concat(Cast(Slice(Cast(Shape(.), int32))), [C]))
    as paddle2onnx writes ``x.reshape([0, 0, C])``; onnx's data propagation does not follow
    the int32 casts, so each Reshape's shape comes from the one before it."""
    w = RNG.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    w[5] = w[2]
    inits = [_init("w", w), _init("flat", np.array([0, 0, -1], np.int64)),
             _init("c", np.array([channels], np.int64)),
             _init("s0", np.array([0], np.int64)), _init("s2", np.array([2], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1] * 4),
             helper.make_node("Reshape", ["conv", "flat"], ["f"]),
             helper.make_node("Transpose", ["f"], ["t0"], perm=[0, 2, 1])]
    for k in range(blocks):
        t, m = f"t{k}", f"m{k}"
        inits.append(_init(f"W{k}", RNG.standard_normal((channels, channels)).astype(np.float32)
                           / 3))
        nodes += [helper.make_node("MatMul", [t, f"W{k}"], [m]),
                  helper.make_node("Relu", [m], [f"r{k}"]),
                  helper.make_node("Shape", [f"r{k}"], [f"sh{k}"]),
                  helper.make_node("Cast", [f"sh{k}"], [f"sh32_{k}"], to=TensorProto.INT32),
                  helper.make_node("Slice", [f"sh32_{k}", "s0", "s2"], [f"nl{k}"]),
                  helper.make_node("Cast", [f"nl{k}"], [f"nl64_{k}"], to=TensorProto.INT64),
                  helper.make_node("Concat", [f"nl64_{k}", "c"], [f"tgt{k}"], axis=0),
                  helper.make_node("Reshape", [f"r{k}", f"tgt{k}"], [f"t{k + 1}"])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(f"t{blocks}", TensorProto.FLOAT, ["N", "L", channels])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)],
                             ir_version=10)


def test_a_long_chain_of_computed_reshape_targets_gets_every_shape():
    """Shape inference learns one Reshape per round; a fixed number of rounds left the
    later layers with unknown rank (frozen)."""
    model = paddle_flatten_chain()
    normalized = normalize(model_io.load(model))
    last = Graph(normalized).symbolic_shape("t5")
    assert last is not None and len(last) == 3 and last[2] == 8
    _, rows = analyze(model)
    assert all(r["frozen"] is None or "reaches graph output" in r["frozen"] for r in rows), rows


def test_flatten_of_dynamic_spatial_axes_keeps_the_channel_axis():
    """[N, C, H, W] -> Reshape[0, 0, -1] -> [N, C, 'H*W']: the channel axis is kept, so the
    conv's duplicate filter goes and the first MatMul folds it."""
    model = paddle_flatten_chain(blocks=1)
    result = slim(model, latency_runs=0, input_shapes={"x": (2, 3, 5, 7)})
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-5, atol=1e-5)
    conv = result.report.groups[0]
    assert (conv["size"], conv["kept"], conv["frozen"]) == (8, 7, None)


def test_params_target_counts_every_parameter_the_slimming_removes():
    """Conv ─ BN ─ depthwise ─ bias Add ─ Relu ─ Gemm: the cost model under
    ``--target params`` sees every float parameter (norms, biases, depthwise), and keeping
    k of the C channels scales the per-channel ones by k / C."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import Net

    from onnxslim_fr.channels import build_groups
    from onnxslim_fr.lumping.budget import CostModel
    from onnxslim_fr.report import params

    b = Net((None, 3, 4, 4))
    h = b.bn(b.conv(b.x, 8, bias=False))
    h = b.relu(b.bias(b.conv(h, 8, group=8, bias=False)))
    model = normalize(b.build(b.gemm(b.flatten(h), 2)))
    graph = Graph(model)
    groups = build_groups(graph)
    costs = CostModel(graph, groups, target="params")
    assert costs.total() == params(model)
    gid = next(g.id for g in groups.groups.values() if g.size == 8)
    per_channel = 3 * 9 + 4 + 9 + 1 + 4 * 4 * 2  # conv row, BN, depthwise, bias, Gemm cols
    # the Gemm's own bias scales with its inputs too in the cost model: off by 2 * 4/8
    assert costs.total({gid: 4}) == pytest.approx(params(model) - 4 * per_channel, abs=1)


def tf2onnx_dense_on_sequence(width: int = 6, hidden: int = 12, positions: tuple = (5,)
                              ) -> onnx.ModelProto:
    """Keras Dense on a [B, *positions, C] tensor as tf2onnx writes it (Tensordot): flatten
    the rows, MatMul, then a Reshape whose target is Cast(Concat(Shape(x)[:-1], [hidden])).
    Shape inference gives the MatMul's rows a fresh symbol, unrelated to B*T. Hidden units
    1 and 2 are copies of unit 0 and unit 3 is dead (exact mode removes them)."""
    w1 = RNG.standard_normal((width, hidden)).astype(np.float32)
    w1[:, 1] = w1[:, 0]
    w1[:, 2] = 2 * w1[:, 0]
    w1[:, 3] = 0
    inits = [_init("w1", w1), _init("w2", RNG.standard_normal((hidden, width)).astype(np.float32)),
             _init("rows_in", np.array([-1, width], np.int64)),
             _init("rows_hidden", np.array([-1, hidden], np.int64)),
             _init("free", np.arange(len(positions) + 1, dtype=np.int64)),
             _init("hidden", np.array([hidden], np.int32)),
             _init("width", np.array([width], np.int32))]

    def dense(x: str, w: str, rows: str, size: str, y: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Reshape", [x, rows], [f"{y}_rows"]),
                helper.make_node("MatMul", [f"{y}_rows", w], [f"{y}_mm"]),
                helper.make_node("Shape", [x], [f"{y}_shape"]),
                helper.make_node("Cast", [f"{y}_shape"], [f"{y}_shape32"], to=TensorProto.INT32),
                helper.make_node("Gather", [f"{y}_shape32", "free"], [f"{y}_free"], axis=0),
                helper.make_node("Concat", [f"{y}_free", size], [f"{y}_tgt32"], axis=0),
                helper.make_node("Cast", [f"{y}_tgt32"], [f"{y}_tgt"], to=TensorProto.INT64),
                helper.make_node("Reshape", [f"{y}_mm", f"{y}_tgt"], [y])]

    nodes = [*dense("x", "w1", "rows_in", "hidden", "h"), helper.make_node("Relu", ["h"], ["r"]),
             *dense("r", "w2", "rows_hidden", "width", "y")]
    graph = helper.make_graph(
        nodes, "tf2onnx_dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               ["unk__1", *positions, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__1", *positions, width])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=10)


@pytest.mark.parametrize("positions", [(5,), (12,), (3, 12)], ids=["sequence",
                                                                  "length-equals-width", "nhwc"])
def test_tf2onnx_dense_on_a_sequence_has_slimmable_hidden_units(positions):
    """(12,): the sequence length equals the hidden width, so a target entry that copies
    the input's dimension 1 would copy the channel count; (3, 12): Dense on an NHWC map,
    whose target has more axes than the MatMul's [rows, C]."""
    model = tf2onnx_dense_on_sequence(positions=positions)
    hidden = next(r for r in analyze(model)[1] if r["size"] == 12)
    assert hidden["frozen"] is None
    result = slim(model, latency_runs=0)
    assert next(r for r in result.report.groups if r["size"] == 12)["kept"] == 9
    assert_same_function(model, result.model)
    data = {"x": RNG.standard_normal((64, *positions, 6)).astype(np.float32)}
    calibrated = slim(model, data=data, ratio=0.4, round_to=1, latency_runs=0)
    assert next(r for r in calibrated.report.groups if r["size"] == 12)["kept"] < 9
    onnx.checker.check_model(calibrated.model, full_check=True)


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """paddle2onnx's default: every weight a Constant node, no initializer at all."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_a_params_budget_counts_weights_written_as_constant_nodes():
    """The original's parameters counted 0 (initializers only): a division by zero."""
    model = as_constant_nodes(paddle_head(channels=16))
    assert not model.graph.initializer
    data = {"x": RNG.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result = slim(model, data=data, ratio=0.3, target="params", round_to=1, latency_runs=0)
    assert result.report.after.params <= 0.72 * result.report.before.params
    assert result.report.before.params > 0


def test_a_sparse_initializer_is_read_as_its_dense_weight():
    """A Conv weight stored as a sparse_initializer (legal; onnxruntime runs it) was refused
    as 'not topologically sorted'. It is densified on load, then slimmed like any weight."""
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[3], w[6] = w[0], 0
    flat = w.reshape(-1)
    nz = np.nonzero(flat)[0]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4)]
    graph = helper.make_graph(
        nodes, "sparse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [_init("w2", RNG.standard_normal((2, 8, 3, 3)).astype(np.float32))])
    graph.sparse_initializer.append(helper.make_sparse_tensor(
        _init("w", flat[nz]), _init("w_idx", nz.astype(np.int64)), list(w.shape)))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = slim(model, latency_runs=0)
    assert next(t for t in result.model.graph.initializer if t.name == "w").dims[0] == 6
    assert_same_function(model, result.model)


def torchscript_pad(channels: int = 8) -> onnx.ModelProto:
    """TorchScript's ``F.pad(x, [1, 1, 2, 2])``: the pads are computed, not a constant:
    Concat([1, 1, 2, 2], ConstantOfShape([4]) = 0) -> Reshape [-1, 2] -> Slice (reverse
    the pairs) -> Transpose -> Reshape [-1] -> Cast -> Pad. Filter 5 repeats filter 2."""
    w = RNG.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    w[5] = w[2]
    ints = lambda name, v: _init(name, np.array(v, np.int64))  # noqa: E731
    inits = [_init("w", w), _init("w2", RNG.standard_normal((4, channels, 3, 3)).astype(
        np.float32)), ints("given", [1, 1, 2, 2]), ints("rest", [4]), ints("pairs", [-1, 2]),
        ints("start", [-1]), ints("end", [-9223372036854775807]), ints("axis0", [0]),
        ints("back", [-1]), ints("flat", [-1])]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConstantOfShape", ["rest"], ["zeros"],
                              value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
             helper.make_node("Concat", ["given", "zeros"], ["all"], axis=0),
             helper.make_node("Reshape", ["all", "pairs"], ["pairs2"]),
             helper.make_node("Slice", ["pairs2", "start", "end", "axis0", "back"], ["rev"]),
             helper.make_node("Transpose", ["rev"], ["t"], perm=[1, 0]),
             helper.make_node("Reshape", ["t", "flat"], ["p64"]),
             helper.make_node("Cast", ["p64"], ["pads"], to=TensorProto.INT64),
             helper.make_node("Pad", ["r", "pads"], ["padded"]),
             helper.make_node("Conv", ["padded", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "ts_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


def test_torchscript_pad_with_computed_pads_slims_the_channels_before_it():
    """onnxscript's folder keeps every ConstantOfShape, so the pads stayed computed and the
    Pad froze the group ('pads not constant'); small ones are folded now."""
    model = torchscript_pad()
    result = slim(model, latency_runs=0)
    assert next(t for t in result.model.graph.initializer if t.name == "w").dims[0] == 7
    assert_same_function(model, result.model)


def test_a_sparse_initializer_with_an_index_out_of_its_dims_is_refused_in_one_line():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "bad_sparse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    graph.sparse_initializer.append(helper.make_sparse_tensor(
        _init("w", np.ones(2, np.float32)), _init("w_idx", np.array([1, 99], np.int64)), [4, 2]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with pytest.raises(BadModelError, match="sparse initializer 'w' does not fit its dims"):
        slim(model, latency_runs=0)
