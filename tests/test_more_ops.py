"""More producers and consumers (issue 8 item 7): recurrent layers, ConvTranspose,
embedding tables, MatMul with the constant first, grouped Conv.

    x ─ Conv (ch5 := ch1) ─ Relu ─ Squeeze ─ Transpose ─ LSTM (bidirectional) ─ Y
    => exact mode removes channel 5 and folds it into the LSTM's input weight W

Every slimmed model is checked three ways: structure (the weight shapes left), function
(assert_same_function) and validity (checker, full_check).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Net
from conftest import removed, slim_exact
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import analyze, slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.feeds import validation_feeds
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.lumping.budget import CostModel
from onnxslim_fr.report import node_costs
from onnxslim_fr.testing import assert_same_function, random_feeds

RNG = np.random.default_rng(0)
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same weights whichever tests ran before it."""
    global RNG
    RNG = np.random.default_rng(0)


def _rand(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[tuple[str, int]], weights: dict[str, np.ndarray],
           opset: int = 17) -> onnx.ModelProto:
    """Outputs are (name, element type) with shapes left to inference."""
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _float_input(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _reasons(model: onnx.ModelProto) -> list[str]:
    return [r["frozen"] for r in analyze(model)[1] if r["frozen"]]


# recurrent consumers -----------------------------------------------------------------------
def _crnn(op: str = "LSTM", *, layout: int = 0, bias: bool = True, dirs: int = 2,
          dup: tuple[int, int] | None = (1, 5), dead: int | None = None,
          c: int = 8, hidden: int = 5, rank: int | None = None) -> onnx.ModelProto:
    """x [B, 3, 3, T=10] ─ conv 3x3 (pad 0 on H) ─ relu ─ squeeze H ─ transpose ─ RNN.

    `dup` (src, dst) plants filter dst := filter src; `dead` zeroes a filter, bias 0.7;
    `rank` makes the filters span only that many dimensions and drops the relu, so the
    channels are exact linear combinations of `rank` of them (only calibration sees it)."""
    w, b = _rand(c, 3, 3, 3), _rand(c, scale=0.1)
    if rank:
        mix = RNG.standard_normal((c, rank)).astype(np.float32)
        w = np.einsum("cr,rijk->cijk", mix, w[:rank])
    if dup:
        w[dup[1]], b[dup[1]] = w[dup[0]], b[dup[0]]
    if dead is not None:
        w[dead], b[dead] = 0.0, 0.7
    gates = GATES[op]
    weights = {"cw": w, "cb": b, "axes": np.array([2], dtype=np.int64),
               "W": _rand(dirs, gates * hidden, c), "R": _rand(dirs, gates * hidden, hidden)}
    rnn_in = ["seq", "W", "R"]
    if bias:
        weights["B"] = _rand(dirs, 2 * gates * hidden, scale=0.1)
        rnn_in.append("B")
    perm = [2, 0, 1] if layout == 0 else [0, 2, 1]
    extra = {"layout": layout} if layout else {}
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], "conv", pads=[0, 1, 0, 1]),
        helper.make_node("Relu" if not rank else "Identity", ["c"], ["r"], "relu"),
        helper.make_node("Squeeze", ["r", "axes"], ["sq"], "squeeze"),
        helper.make_node("Transpose", ["sq"], ["seq"], "transpose", perm=perm),
        helper.make_node(op, rnn_in, ["Y", "Y_h"], "rnn", hidden_size=hidden,
                         direction="bidirectional" if dirs == 2 else "forward", **extra),
    ]
    return _model(nodes, [_float_input("x", ["B", 3, 3, 10])],
                  [("Y", TensorProto.FLOAT), ("Y_h", TensorProto.FLOAT)], weights)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_duplicate_conv_filter_folds_into_the_recurrent_input_weight(op: str) -> None:
    model = _crnn(op)
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-4, atol=1e-4)
    assert removed(result) == 1
    w = _weight(result.model, "W")
    assert w.shape == (2, GATES[op] * 5, 7)  # hidden size untouched, input 8 -> 7
    before = _weight(model, "W")
    np.testing.assert_allclose(w[:, :, 1], before[:, :, 1] + before[:, :, 5], rtol=1e-6)
    assert _weight(result.model, "R").shape == _weight(model, "R").shape


def test_recurrent_layout_1_reads_channels_on_the_last_axis_too() -> None:
    """[batch, seq, input] (opset 14+): onnxruntime cannot run it, so analysis only."""
    groups, rows = analyze(_crnn("LSTM", layout=1))
    assert [r["frozen"] for r in rows] == [None]
    assert [(m.role.value, m.tensor) for m in groups.roles["rnn"]] == [("consumer", "seq")]
    assert groups.layouts["seq"].axis == 2


def test_constant_channel_folds_into_a_created_input_bias() -> None:
    """relu(0.7) is the constant 0.7: it leaves as W[:, :, j] * 0.7 in Wb (B is created)."""
    model = _crnn("GRU", bias=False, dirs=1, dup=None, dead=3)
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-4, atol=1e-4)
    assert _weight(result.model, "W").shape == (1, 15, 7)
    rnn = next(n for n in result.model.graph.node if n.op_type == "GRU")
    b = _weight(result.model, rnn.input[3])
    np.testing.assert_allclose(b[0, :15], 0.7 * _weight(model, "W")[0, :, 3], rtol=1e-6)
    assert not np.any(b[0, 15:])  # the recurrent bias Rb stays zero


def test_recurrent_input_weight_that_is_computed_freezes_the_group() -> None:
    model = _crnn("LSTM")
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(_float_input("W", list(w.dims)))
    assert any("LSTM input weight W is not constant" in r for r in _reasons(model))
    feeds = random_feeds(model, batch=2)
    result = slim(model, latency_runs=0)
    assert removed(result) == 0
    assert_same_function(model, result.model, feeds=feeds)


def test_calibrated_slimming_of_a_crnn_folds_the_merge_into_the_lstm_input() -> None:
    """12 channels spanning 6 dimensions: least squares rebuilds the removed ones exactly,
    and the merge lands in W's columns."""
    model = _crnn("LSTM", dup=None, c=12, rank=6)
    data = {"x": RNG.standard_normal((64, 3, 3, 10)).astype(np.float32)}
    result = slim(model, data=data, ratio=0.3, round_to=1, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    kept = _weight(result.model, "W").shape[2]
    assert 6 <= kept < 12
    assert _weight(result.model, "cw").shape[0] == kept
    assert result.report.after.flops < 0.8 * result.report.before.flops
    assert result.report.max_rel_error < 1e-2  # the ridge's bias; ~1 without the merge


def test_recurrent_cost_counts_the_input_and_recurrent_projections() -> None:
    costs = node_costs(_crnn("LSTM"))
    assert costs[4] == (10 * 1 * 2 * 20 * (8 + 5), 2 * 20 * 8 + 2 * 20 * 5)  # batch 1


def test_budget_shrinks_only_the_input_projection_of_a_recurrent_layer() -> None:
    """Dropping 2 of 8 conv channels saves 2/8 of the conv and 2 columns of W, not 2/8 of
    the LSTM (its H Rᵀ half stays)."""
    model = normalize(_crnn("LSTM", dup=None))
    graph = Graph(model)
    cost = CostModel(graph, build_groups(graph))
    conv, lstm = 10 * 8 * 27, 10 * 2 * 20 * (8 + 5)
    assert cost.total() == conv + lstm
    assert cost.total({0: 6}) == pytest.approx(conv * 6 / 8 + 10 * 2 * 20 * (6 + 5))


# ConvTranspose -----------------------------------------------------------------------------
def _deconv_node(x: str, w: str, b: str | None, out: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("ConvTranspose", [x, w] + ([b] if b else []), [out], out, **attrs)


def _fpn(attrs: dict, *, depthwise: bool = False, c: int = 6, cout: int = 5,
         act: str = "Relu") -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x ─ conv 3x3 (ch4 := ch1) ─ act ─ ConvTranspose (out ch3 := ch0) ─ act ─ conv 1x1.

    The depthwise variant is ConvTranspose(group=c) with ch4's filter := ch1's."""
    w1, b1 = _rand(c, 3, 3, 3), _rand(c, scale=0.1)
    w1[4], b1[4] = w1[1], b1[1]
    k = attrs.get("kernel_shape", [3, 3])
    group = c if depthwise else int(attrs.get("group", 1))
    wt, bt = _rand(c, cout // group, *k), _rand(cout, scale=0.1)
    if depthwise:
        wt[4], bt[4] = wt[1], bt[1]
        attrs = {**attrs, "group": c}
    elif group == 1:
        wt[:, 3], bt[3] = wt[:, 0], bt[0]
    weights = {"w1": w1, "b1": b1, "wt": wt, "bt": bt, "w2": _rand(4, cout, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "c1", pads=[1] * 4),
        helper.make_node(act, ["c1"], ["r1"], "r1"),
        _deconv_node("r1", "wt", "bt", "up", **attrs),
        helper.make_node(act, ["up"], ["r2"], "r2"),
        helper.make_node("Conv", ["r2", "w2"], ["y"], "c2"),
    ]
    return _model(nodes, [_float_input("x", ["B", 3, 6, 6])], [("y", TensorProto.FLOAT)],
                  weights), weights


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2], "kernel_shape": [3, 3]},
    {"strides": [2, 2], "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"strides": [2, 2], "kernel_shape": [4, 4], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "dilations": [2, 1]},
    {"strides": [2, 2], "kernel_shape": [3, 3], "output_shape": [12, 12]},
])
def test_conv_transpose_consumes_and_produces(attrs: dict) -> None:
    model, w = _fpn(attrs)
    result = slim_exact(model)
    assert removed(result) == 2
    wt = _weight(result.model, "wt")
    assert wt.shape == (5, 4, *attrs["kernel_shape"])  # [Cin, Cout, k...] both sliced
    folded = np.delete(w["wt"][1] + w["wt"][4], 3, axis=0)  # input 4 into 1, output 3 gone
    np.testing.assert_allclose(wt[1], folded, rtol=1e-6)
    assert _weight(result.model, "w2").shape == (4, 4, 1, 1)


def test_depthwise_conv_transpose_is_a_carrier() -> None:
    model, _ = _fpn({"strides": [2, 2], "kernel_shape": [2, 2]}, depthwise=True, cout=6)
    result = slim_exact(model)
    assert removed(result) == 1
    assert _weight(result.model, "wt").shape == (5, 1, 2, 2)
    node = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == 5


def test_grouped_conv_transpose_freezes_with_its_reason() -> None:
    model, _ = _fpn({"strides": [2, 2], "kernel_shape": [2, 2], "group": 2}, cout=4)
    assert any("grouped ConvTranspose (group=2)" in r for r in _reasons(model))
    slim_exact(model)


@pytest.mark.parametrize("attrs, folds", [
    ({"kernel_shape": [3, 3]}, False),  # borders receive fewer taps
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [2, 2, 2, 2]}, False),  # phases
    ({"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]}, True),  # every output sees all taps
    ({"kernel_shape": [1, 1]}, True),
])
def test_constant_channel_folds_through_conv_transpose_only_with_full_coverage(
        attrs: dict, folds: bool) -> None:
    """Channel 2 is relu(-1) + 0.5 = 0.5 everywhere: removable only if the offset folds."""
    model, w = _fpn(attrs)
    b1 = next(t for t in model.graph.initializer if t.name == "b1")
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    w["w1"][2], w["b1"][2] = 0.0, 0.5
    b1.CopyFrom(numpy_helper.from_array(w["b1"], "b1"))
    w1.CopyFrom(numpy_helper.from_array(w["w1"], "w1"))
    result = slim_exact(model)
    assert _weight(result.model, "wt").shape[0] == (4 if folds else 5)


def test_conv_transpose_cost_and_channels() -> None:
    model, _ = _fpn({"strides": [2, 2], "kernel_shape": [3, 3]})
    macs, params = node_costs(model)[2]
    assert (macs, params) == (6 * 6 * 6 * 5 * 9, 6 * 5 * 9 + 5)  # each input scattered 5x3x3; bias
    rep = slim(model, latency_runs=0).report
    assert rep.before.channels == 6 + 5 + 4
    assert rep.after.channels == 5 + 4 + 4


def _low_rank(model: onnx.ModelProto, name: str, axis: int, rank: int) -> None:
    """Make the slices of initializer `name` along `axis` span only `rank` dimensions."""
    t = next(t for t in model.graph.initializer if t.name == name)
    w = np.moveaxis(numpy_helper.to_array(t), axis, 0)
    w = np.einsum("cr,r...->c...", RNG.standard_normal((len(w), rank)), w[:rank])
    t.CopyFrom(numpy_helper.from_array(np.moveaxis(w, 0, axis).astype(np.float32), name))


def test_calibrated_slimming_through_conv_transpose_folds_and_slices_it() -> None:
    """Linear FPN head whose conv filters and ConvTranspose outputs span 5 of 10
    dimensions: least squares merges on both sides of the ConvTranspose rebuild them."""
    model, _ = _fpn({"strides": [2, 2], "kernel_shape": [3, 3]}, c=10, cout=10,
                    act="Identity")
    _low_rank(model, "w1", 0, 5)
    _low_rank(model, "wt", 1, 5)
    data = {"x": RNG.standard_normal((32, 3, 6, 6)).astype(np.float32)}
    result = slim(model, data=data, ratio=0.6, round_to=1, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    wt = _weight(result.model, "wt")
    assert wt.shape[0] < 10 and wt.shape[1] < 10  # input columns merged, outputs sliced
    assert result.report.after.flops <= 0.45 * result.report.before.flops
    assert result.report.max_rel_error < 2e-2  # the ridge's bias; dropping alone: ~1


# embeddings --------------------------------------------------------------------------------
def _embedding(dup: tuple[int, int] = (2, 6), dead: int = 4, tied: bool = False
               ) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids [B, T] int64 ─ Gather(table [20, 8]) ─ MatMul(W [8, 3]) ─ y.

    `tied`: z [B, 20] ─ MatMul(·, table) ─ MatMul(W2 [8, 2]) ─ y2 reads the table too."""
    table = _rand(20, 8)
    table[:, dup[1]] = table[:, dup[0]]
    table[:, dead] = 0.0
    weights = {"table": table, "W": _rand(8, 3)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], "embed"),
             helper.make_node("MatMul", ["e", "W"], ["y"], "proj")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 5])]
    outputs = [("y", TensorProto.FLOAT)]
    if tied:
        weights["W2"] = _rand(8, 2)
        nodes += [helper.make_node("MatMul", ["z", "table"], ["t"], "tied"),
                  helper.make_node("MatMul", ["t", "W2"], ["y2"], "proj2")]
        inputs.append(_float_input("z", ["B", 20]))
        outputs.append(("y2", TensorProto.FLOAT))
    return _model(nodes, inputs, outputs, weights), table


def test_embedding_table_loses_duplicate_and_dead_columns() -> None:
    model, table = _embedding()
    feeds = random_feeds(model, batch=3)
    for f in [feeds, *validation_feeds(model)]:  # what the test and slim's check feed
        assert len(np.unique(f["ids"])) > 1 and 0 <= f["ids"].min() <= f["ids"].max() < 20
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, feeds=feeds)
    assert removed(result) == 2
    new = _weight(result.model, "table")
    assert new.shape == (20, 6)
    np.testing.assert_array_equal(new, np.delete(table, [4, 6], axis=1))
    w = _weight(model, "W")
    np.testing.assert_allclose(_weight(result.model, "W")[2], w[2] + w[6], rtol=1e-6)


def test_embedding_table_shared_with_a_matmul_is_never_sliced_two_ways() -> None:
    """Gather and MatMul(z, table) both write the table's columns: one plan or none."""
    model, _ = _embedding(tied=True)
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model)
    kept = _weight(result.model, "table").shape[1]
    assert _weight(result.model, "W").shape[0] == _weight(result.model, "W2").shape[0] == kept


def test_gather_of_positions_moves_the_channel_axis() -> None:
    """x [B, 3, 6, 6] ─ conv (ch4 := ch1) ─ Gather(axis 2, index 3) ─ [B, C, 6] ─ Conv1d."""
    b = Net((None, 3, 6, 6))
    c1 = b.conv(b.x, 6)
    b.scale_filter(c1, src=1, dst=4, factor=1.0)
    row = b._const("row", np.array(3))
    b.weights[row] = np.array(3, dtype=np.int64)
    g = b.op("Gather", [c1, row], (None, 6, 6), axis=2)
    w = b._const("w1d", _rand(2, 6, 1))
    y = b.op("Conv", [g, w], (None, 2, 6))
    result = slim_exact(b.build(y))
    assert removed(result) == 1


def test_calibrated_slimming_of_an_embedding_validates() -> None:
    model, _ = _embedding(dead=7, dup=(0, 0))
    data = {"ids": RNG.integers(0, 20, (64, 5)).astype(np.int64)}
    result = slim(model, data=data, ratio=0.3, round_to=1, target="params", latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert _weight(result.model, "table").shape[1] < 8
    assert result.report.after.params < result.report.before.params


# MatMul and Gemm with the constant first -------------------------------------------------
def test_matmul_with_the_constant_first_consumes_and_produces_on_axis_minus_2() -> None:
    """x [B, 4, 7] ─ MatMul(A [6, 4], x) (row 5 := row 2) ─ Relu ─ MatMul(C [3, 6], ·)."""
    a, c = _rand(6, 4), _rand(3, 6)
    a[5] = 2.0 * a[2]
    a[0] = 0.0  # a dead row: relu(0) = 0, a constant that folds as zero
    nodes = [helper.make_node("MatMul", ["A", "x"], ["h"], "m1"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["C", "r"], ["y"], "m2")]
    model = _model(nodes, [_float_input("x", ["B", 4, 7])], [("y", TensorProto.FLOAT)],
                   {"A": a, "C": c})
    result = slim_exact(model)
    assert removed(result) == 2
    assert _weight(result.model, "A").shape == (4, 4)
    np.testing.assert_allclose(_weight(result.model, "C")[:, 1], c[:, 2] + 2.0 * c[:, 5],
                               rtol=1e-6)
    assert node_costs(model)[0] == (6 * 7 * 4, 24)


def test_matmul_constant_first_offset_becomes_a_bias_on_axis_minus_2() -> None:
    """x ─ Add(per-row bias on axis -2) with one row constant ─ MatMul(C, ·): the constant
    row's contribution must broadcast along the last axis, not the channel one."""
    a = _rand(5, 4)
    a[3] = 0.0
    nodes = [helper.make_node("MatMul", ["A", "x"], ["h"], "m1"),
             helper.make_node("Add", ["h", "hb"], ["hh"], "bias"),
             helper.make_node("Sigmoid", ["hh"], ["s"], "sig"),
             helper.make_node("MatMul", ["C", "s"], ["y"], "m2")]
    model = _model(nodes, [_float_input("x", ["B", 4, 7])], [("y", TensorProto.FLOAT)],
                   {"A": a, "hb": _rand(5, 1), "C": _rand(3, 5)})
    result = slim_exact(model)
    assert removed(result) == 1
    assert _weight(result.model, "C").shape == (3, 4)


def test_gemm_with_the_constant_first_freezes_with_a_reason() -> None:
    b = Net((None, 8))
    h = b.gemm(b.x, 6)
    node = helper.make_node("Gemm", ["A", h], ["y"], "g_first", transB=1)
    b.nodes.append(node)
    b.weights["A"] = _rand(3, 6)
    b.shapes["y"] = (3, None)
    model = b.build("y")
    assert any("Gemm with a constant A" in r for r in _reasons(model))


# grouped Conv ----------------------------------------------------------------------------
def test_grouped_conv_keeps_a_duplicate_without_a_partner_and_counts_its_macs() -> None:
    """Every group of the conv must keep as many channels (tests/test_heldout_patterns.py):
    a duplicate in one piece only (1 = 0, not 5 = 4) stays."""
    b = Net((None, 4, 6, 6))
    c1 = b.conv(b.x, 8)
    b.scale_filter(c1, src=0, dst=1, factor=1.0)
    y = b.conv(b.relu(c1), 4, group=2)
    model = b.build(y)
    assert not any("grouped Conv" in r for r in _reasons(model))
    assert removed(slim_exact(model)) == 0
    assert node_costs(model)[2] == (4 * 6 * 6 * (8 // 2) * 9, 4 * 4 * 9 + 4)  # + bias
