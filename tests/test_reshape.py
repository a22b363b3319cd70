"""Reshape with computed or constant targets: the channel axis is followed from symbolic
shapes, and the target entry that spells the channel count is rewritten."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim_fr
from onnxslim_fr.testing import assert_same_function
from onnxslim_fr.view_targets import unshare_reshape_targets

RNG = np.random.default_rng(0)


def _conv_net(batch, opset: int, target_nodes, target: str, features: int) -> onnx.ModelProto:
    """x -> Conv(4 filters, #3 = #1) -> Relu -> Reshape(target) -> Gemm."""
    w = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    w[3] = w[1]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), *target_nodes,
             helper.make_node("Reshape", ["r", target], ["f"]),
             helper.make_node("Flatten", ["f"], ["ff"]),
             helper.make_node("Gemm", ["ff", "w2", "b2"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"),
             numpy_helper.from_array(RNG.standard_normal((features, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=10)


def _batch_then_minus_one(opset: int) -> list[onnx.NodeProto]:
    """target = Concat(Unsqueeze(Gather(Shape(r), 0)), [-1]) as exporters write a flatten."""
    unsqueeze = helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]) if opset < 13 else \
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"])
    return [helper.make_node("Shape", ["r"], ["s"]),
            helper.make_node("Gather", ["s", "i0"], ["n"], axis=0), unsqueeze,
            helper.make_node("Concat", ["n1", "m1"], ["tgt"], axis=0)]


def _slim(model: onnx.ModelProto):
    result = onnxslim_fr.slim(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model)
    return result, [(g["size"], g["kept"], g["frozen"]) for g in result.report.groups]


@pytest.mark.parametrize("opset", [9, 13, 17])
@pytest.mark.parametrize("batch", [2, "N"])
def test_flatten_to_a_computed_target_slims_the_conv(opset, batch):
    _, rows = _slim(_conv_net(batch, opset, _batch_then_minus_one(opset), "tgt", 4 * 49))
    assert rows[0] == (4, 3, None)


def test_literal_channel_count_in_a_constant_target_is_rewritten():
    """[N, 4, 7, 7] -> [N, 4, 49]: the 4 in the target becomes 3."""
    target = numpy_helper.from_array(np.array([0, 4, -1], np.int64), "t")
    model = _conv_net("N", 17, [], "t", 4 * 49)
    model.graph.initializer.append(target)
    result, rows = _slim(model)
    assert rows[0] == (4, 3, None)
    new = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert any(list(v) == [0, 3, -1] for v in new.values() if v.dtype == np.int64)


def test_literal_channel_count_in_a_concat_part_is_rewritten():
    """target = Concat(Shape(r)[0:1], [4, -1]): the constant part carries the 4."""
    nodes = [helper.make_node("Shape", ["r"], ["s"], end=1),
             helper.make_node("Concat", ["s", "rest"], ["tgt"], axis=0)]
    model = _conv_net("N", 17, nodes, "tgt", 4 * 49)
    model.graph.initializer.append(numpy_helper.from_array(np.array([4, -1], np.int64), "rest"))
    _, rows = _slim(model)
    assert rows[0] == (4, 3, None)


def test_target_scaled_by_a_constant_gets_a_private_target():
    """A channel entry computed as Shape(r)[1] * 49 would keep the old count baked in: the
    Reshape gets a private constant target instead ([0, -1])."""
    nodes = [helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Gather", ["s", "i1"], ["c1"], axis=0),
             helper.make_node("Mul", ["c1", "k49"], ["feat"]),
             helper.make_node("Unsqueeze", ["feat", "ax"], ["feat1"]),
             helper.make_node("Concat", ["m1", "feat1"], ["tgt"], axis=0)]
    model = _conv_net("N", 17, nodes, "tgt", 4 * 49)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "i1"),
                                    numpy_helper.from_array(np.array(49, np.int64), "k49")])
    _, rows = _slim(model)
    assert rows[0] == (4, 3, None)


def test_reshape_that_splits_the_channel_axis_makes_blocks():
    """[N, 4, 7, 7] -> [N, 2, 2, 49] splits the channels into 2 blocks of 2 (as attention
    heads): the group counts whole blocks; filters 1 and 3 alone are no duplicate block."""
    target = numpy_helper.from_array(np.array([0, 2, 2, -1], np.int64), "t")
    model = _conv_net("N", 17, [], "t", 4 * 49)
    model.graph.initializer.append(target)
    _, rows = _slim(model)
    assert rows[0] == (2, 2, None)


def test_a_shared_target_is_copied_without_the_exporters_metadata():
    """dynamo writes a stack trace (about 2 kB) in every node's metadata; the private copy
    of a shared Reshape target carried it, and the slimmed GPT-2 grew by 2%."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
             helper.make_node("Concat", ["s", "c"], ["target"], axis=0, name="shared"),
             helper.make_node("Reshape", ["x", "target"], ["a"]),
             helper.make_node("Reshape", ["x", "target"], ["b"])]
    nodes[1].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="x" * 2000)
    graph = helper.make_graph(
        nodes, "views", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 6]) for n in "ab"],
        [numpy_helper.from_array(np.array([6], np.int64), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=10)
    unshare_reshape_targets(model)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    assert len(concats) == 2
    assert sorted(len(n.metadata_props) for n in concats) == [0, 1]
