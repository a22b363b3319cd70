"""The report's figures against hand-computed values, and costs at the sizes data has.

MACs, parameters and output channels come from the op handlers, the same ones the budget
uses, so a figure checked here is the figure the budget works with.
"""

from __future__ import annotations

import numpy as np
import onnx
from builders import Net
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import report, slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.lumping.budget import CostModel

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _zoo() -> tuple[onnx.ModelProto, list[tuple[int, int]]]:
    """Every counted op kind once, with its (MACs, parameters) worked out by hand.

    x [1,4,9,9] ─ conv 3x3 s2 p1 (8) ─ conv 3x3 p1 group 2 (8) ─ depthwise 3x3 p0 ─ flatten
      ─ gemm (72x10) ─ gemm transB (6x10)                                        ─ out
    y [1,5,6] ─ matmul (6x7) ─ m ─ matmul(m, mᵀ)                                 ─ att
    """
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "c1", pads=[1] * 4,
                         strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], "c2", pads=[1] * 4, group=2),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], "c3", group=8),
        helper.make_node("Flatten", ["c3"], ["f"], "f"),
        helper.make_node("Gemm", ["f", "g1", "gb1"], ["h1"], "h1"),
        helper.make_node("Gemm", ["h1", "g2", "gb2"], ["out"], "h2", transB=1),
        helper.make_node("MatMul", ["y", "m1"], ["m"], "m"),
        helper.make_node("Transpose", ["m"], ["mt"], "mt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["m", "mt"], ["att"], "att"),
    ]
    inits = [_init("w1", 8, 4, 3, 3), _init("b1", 8), _init("w2", 8, 4, 3, 3),
             _init("w3", 8, 1, 3, 3), _init("g1", 72, 10), _init("gb1", 10),
             _init("g2", 6, 10), _init("gb2", 6), _init("m1", 6, 7)]
    graph = helper.make_graph(
        nodes, "zoo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6]),
         helper.make_tensor_value_info("att", TensorProto.FLOAT, [1, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    expected = [
        (8 * 5 * 5 * (4 * 9), 8 * 4 * 9 + 8),  # c1: 9x9 -> 5x5 (stride 2, pad 1), bias
        (8 * 5 * 5 * (4 // 2 * 4 // 2 * 9), 8 * 4 * 9),  # c2: each output reads 4/2 channels
        (8 * 3 * 3 * (1 * 9), 8 * 9),  # c3 depthwise: one channel per output, 5x5 -> 3x3
        (10 * 72, 72 * 10 + 10),  # h1: (1,72) x (72,10), bias
        (6 * 10, 6 * 10 + 6),  # h2: transB, (1,10) x (10,6), bias
        (5 * 7 * 6, 6 * 7),  # m: (1,5,6) x (6,7)
        (5 * 5 * 7, 0),  # att: (1,5,7) x (1,7,5), two activations: no parameters
    ]
    return model, expected


def test_report_macs_params_and_channels_match_hand_counts():
    model, expected = _zoo()
    costs = report.node_costs(model)
    counted = {0: 0, 1: 1, 2: 2, 4: 3, 5: 4, 6: 5, 8: 6}  # node index -> expected row
    assert costs == {i: expected[row] for i, row in counted.items()}
    rep = slim(model, latency_runs=0).report
    assert rep.before.flops == sum(m for m, _ in expected) == 16213
    params = 8 * 4 * 9 + 8 + 8 * 4 * 9 + 8 * 9 + 72 * 10 + 10 + 6 * 10 + 6 + 6 * 7
    assert rep.before.params == params
    assert rep.before.channels == 8 + 8 + 8 + 10 + 6 + 7  # the attention MatMul writes none
    assert rep.after.flops == rep.before.flops  # nothing to remove, nothing changes


def test_gemm_counts_its_weight_the_same_either_way_round():
    model, _ = _zoo()
    node = model.graph.node[5]
    g2 = next(t for t in model.graph.initializer if t.name == "g2")
    g2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(g2).T.copy(), "g2"))
    del node.attribute[:]  # transB=0 with the transposed (10, 6) weight
    assert report.node_costs(model)[5] == (60, 66)
    assert report.channels(model) == 8 + 8 + 8 + 10 + 6 + 7


def _dynamic_cnn() -> onnx.ModelProto:
    """x [?,3,?,?] ─ conv(16) ─ relu ─ conv(16) ─ relu ─ gap ─ matmul(256) ─ relu ─ matmul(10).

    Counted at height = width = 1 the MatMul head is 70% of the MACs; at 32x32 it is 0.2%."""
    b = Net((1, 3, 32, 32))
    h = b.relu(b.conv(b.x, 16))
    h = b.relu(b.conv(h, 16))
    h = b.relu(b.matmul(b.flatten(b.gap(h)), 256, bias=False))
    y = b.matmul(h, 10, bias=False)
    b.shapes["x"] = (None, 3, None, None)
    return b.build(y)


HEAD = 16 * 256 + 256 * 10
MACS_32 = 16 * 32 * 32 * 3 * 9 + 16 * 32 * 32 * 16 * 9 + HEAD


def test_costs_are_counted_at_the_sizes_of_the_calibration_data():
    model = _dynamic_cnn()
    data = {"x": RNG.standard_normal((48, 3, 32, 32)).astype(np.float32)}
    rep = slim(model, data=data, ratio=0.3, round_to=1, latency_runs=0).report
    assert rep.before.flops == MACS_32
    assert 0.65 <= rep.after.flops / rep.before.flops <= 0.75


def test_budget_cost_model_and_report_agree_at_the_feed_sizes():
    model = _dynamic_cnn()
    feeds = {"x": np.zeros((1, 3, 32, 32), np.float32)}
    work = normalize(onnx.ModelProto.FromString(model.SerializeToString()))
    graph = Graph(work)
    cost = CostModel(graph, build_groups(graph), "flops", feeds)
    assert cost.total() == report.flops(work, feeds) == MACS_32
    assert report.flops(work) == 16 * 3 * 9 + 16 * 16 * 9 + HEAD  # no feeds: sizes 1
