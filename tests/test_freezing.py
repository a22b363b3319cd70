"""What is not understood freezes its group, with a reason; everything else still slims."""

from __future__ import annotations

import numpy as np
import onnx
from builders import Net, cnn_input
from conftest import removed, slim_exact
from onnx import helper, numpy_helper

from onnxslim_fr import analyze


def _reasons(model: onnx.ModelProto) -> list[str]:
    _, rows = analyze(model)
    return [r["frozen"] for r in rows if r["frozen"]]


def test_custom_domain_op_freezes_only_its_group():
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    c2 = b.conv(b.relu(c1), 5)
    custom = b.op("Gelu", [c2], b.shapes[c2], domain="com.microsoft")
    y = b.conv(b.relu(custom), 3)
    b.scale_filter(c1, src=0, dst=4, factor=2.0)
    b.scale_filter(c2, src=0, dst=4, factor=1.0)
    model = b.build(y, domains=["com.microsoft"])
    assert any("com.microsoft::Gelu" in r for r in _reasons(model))
    assert removed(slim_exact(model)) == 1  # c1's group; c2's duplicate stays frozen


def test_channels_reaching_a_graph_output_are_frozen():
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    b.scale_filter(c1, src=0, dst=4, factor=2.0)
    model = b.build([b.conv(b.relu(c1), 3), c1])
    assert any("reaches graph output" in r for r in _reasons(model))
    assert removed(slim_exact(model)) == 0


def test_shared_initializer_freezes_both_users():
    b = Net((None, 8))
    h1 = b.gemm(b.x, 8)
    h2 = b.gemm(b.relu(h1), 8)
    second = next(n for n in b.nodes if n.output[0] == h2)
    first = next(n for n in b.nodes if n.output[0] == h1)
    second.input[1] = first.input[1]
    b.scale_filter(h1, src=0, dst=4, factor=1.0)
    model = b.build(b.gemm(b.relu(h2), 3))
    assert any("shared with node" in r for r in _reasons(model))
    slim_exact(model)


def test_unsupported_op_on_channels_freezes_with_its_name():
    b = Net((None, 8))
    h = b.gemm(b.x, 6)
    y = b.gemm(b.act(h, "Softmax", axis=1), 3)
    assert any("unsupported op Softmax" in r for r in _reasons(b.build(y)))


def test_batchnorm_with_per_activation_parameters_freezes():
    """BatchNormalization-7 with spatial=0 keeps a [C, H, W] parameter per activation:
    slicing it as per-channel vectors was an internal error (exit 3)."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[3] = w1[0]
    params = [(np.abs(rng.standard_normal((8, 6, 6))) + 0.5).astype(np.float32)
              for _ in range(4)]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(
        [w1, rng.standard_normal((3, 8, 3, 3)).astype(np.float32), *params],
        ["w1", "w2", "scale", "bias", "mean", "var"], strict=True)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"],
                              ["bn"], spatial=0),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4)]
    graph = helper.make_graph(
        nodes, "bn7", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=10)
    assert any("spatial=0" in r for r in _reasons(model))
    assert removed(slim_exact(model)) == 0


def test_layers_whose_shapes_are_unknown_are_named_in_a_note():
    """onnxruntime's fused graphs: after com.microsoft::Gelu shape inference knows no shape,
    the next MatMul gets no group, and the groups table alone would not show it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (6, 8)), ("w2", (8, 5)), ("w3", (5, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Gelu", ["h"], ["g"], domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "w2"], ["m"]),
             helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("MatMul", ["r", "w3"], ["y"])]
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    notes = slim_exact(model).report.notes
    assert any("in no channel group" in n and "com.microsoft::Gelu" in n for n in notes)
