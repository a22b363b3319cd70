"""Analysis bugs that once wrote a wrong model at exit 0: each test fails on the old code.

Subgraph reads, scale-0 normalization, unnamed or repeated node names, Pad values, channel
axes other than 1, Gelu's tanh approximation and Cast rounding, and which channels survive.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Net, cnn_input
from conftest import removed, slim_exact
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import analyze, slim
from onnxslim_fr.testing import assert_same_function


def _reasons(model: onnx.ModelProto) -> list[str]:
    return [r["frozen"] for r in analyze(model)[1] if r["frozen"]]


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# 1. subgraphs ---------------------------------------------------------------------------

def _reduce_branch(tag: str, reads: str, op: str = "ReduceMean") -> onnx.GraphProto:
    """A branch summarizing the outer tensor `reads` over its channels (any width runs)."""
    node = helper.make_node(op, [reads], [f"{tag}_out"], name=f"{tag}_reduce", axes=[1])
    return helper.make_graph([node], tag, [], [
        helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, [2, 1, 8, 8])])


def _nested_branch(tag: str, reads: str) -> onnx.GraphProto:
    """A branch whose own If reads `reads` two scopes down."""
    inner = helper.make_node("If", ["cond"], [f"{tag}_out"], name=f"{tag}_if",
                             then_branch=_reduce_branch(f"{tag}_t", reads),
                             else_branch=_reduce_branch(f"{tag}_e", reads, "ReduceMax"))
    return helper.make_graph([inner], tag, [], [
        helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, [2, 1, 8, 8])])


def _if_model(kind: str) -> onnx.ModelProto:
    """x ─ conv1(6, ch 4 = ch 1) ─ relu2 = h ─ conv(4) ─ y;  z = If(cond) reading h inside."""
    b = Net((2, 3, 8, 8))
    c1 = b.conv(b.x, 6)
    h = b.relu(c1)
    y = b.conv(h, 4)
    b.scale_filter(c1, src=1, dst=4, factor=1.0)
    then, other = {
        "both": (_reduce_branch("then", h), _reduce_branch("else", h, "ReduceMax")),
        "then_only": (_reduce_branch("then", h), _reduce_branch("else", "x")),
        "nested": (_nested_branch("then", h), _reduce_branch("else", "x")),
        "neither": (_reduce_branch("then", "x"), _reduce_branch("else", "x", "ReduceMax")),
    }[kind]
    model = b.build(y)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    g.node.append(helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then,
                                   else_branch=other))
    g.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 1, 8, 8]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("kind", ["both", "then_only", "nested"])
def test_tensor_read_inside_an_if_branch_freezes_its_group(kind):
    """Old code: "both" failed validation, the others wrote a model whose untested true
    branch was wrong (the validation only fed cond = False)."""
    model = _if_model(kind)
    assert any("read inside the subgraph of If node branch" in r for r in _reasons(model))
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for cond in (True, False):
        assert_same_function(model, result.model, feeds={"x": x, "cond": np.array(cond)})
    assert removed(result) == 0


def test_tensor_only_read_directly_beside_a_subgraph_still_slims():
    result = slim_exact(_if_model("neither"))
    assert removed(result) == 1


# 2. normalization with scale 0 ----------------------------------------------------------

def _norm_model(op: str) -> onnx.ModelProto:
    """x ─ conv(6, ch 4 = ch 0) ─ norm(scale[0] = 0) ─ conv1x1 ─ y: channel 0 is the shift."""
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    names = [b._const(f"n.{k}", v) for k, v in (
        ("scale", [0.0, 1.1, 0.9, 1.2, 1.3, 0.8]), ("bias", [0.5, 0.1, -0.2, 0.3, 0.0, 0.2]),
        ("mean", np.zeros(6)), ("var", np.ones(6)))]
    norm = b.op(op, [c1, *names[:2 if op == "InstanceNormalization" else 4]], b.shapes[c1])
    y = b.conv(norm, 4, k=1, pad=0)
    b.scale_filter(c1, src=0, dst=4, factor=1.0)
    return b.build(y)


@pytest.mark.parametrize("op", ["InstanceNormalization", "BatchNormalization"])
def test_normalization_channel_with_scale_zero_is_its_constant_shift(op):
    model = _norm_model(op)
    result = slim_exact(model)
    assert removed(result) == 1  # channel 0 folds into the bias; channel 4 is no duplicate
    weights = [numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert _weight(result.model, "conv1.w").shape[0] == 5


# 3. node names ----------------------------------------------------------------------------

def _named_cnn(names: str) -> onnx.ModelProto:
    b = Net((None, 3, 16, 16))
    h = b.relu(b.conv(b.x, 16))
    h = b.relu(b.conv(h, 16))
    model = b.build(b.gemm(b.flatten(b.gap(h)), 10))
    for node in model.graph.node:
        node.name = "" if names == "empty" else "layer"
    return model


@pytest.mark.parametrize("names", ["empty", "repeated"])
def test_ratio_removes_its_share_of_macs_whatever_the_node_names(names):
    model = _named_cnn(names)
    data = {"x": np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)}
    result = slim(model, data=data, ratio=0.3, round_to=1, latency_runs=0)
    rep = result.report
    assert rep.before.flops == 3 * 16 * 9 * 256 + 16 * 16 * 9 * 256 + 16 * 10
    assert 0.65 <= rep.after.flops / rep.before.flops <= 0.75
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    names_out = [n.name for n in result.model.graph.node]
    assert all(names_out) and len(set(names_out)) == len(names_out)


def test_repeated_node_names_slim_exactly():
    model = _named_cnn("repeated")
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for i, node in enumerate(renamed.graph.node):
        node.name = f"n{i}"  # onnxruntime cannot load `model` itself to compare
    result = slim(model, latency_runs=0)
    assert_same_function(renamed, result.model)


# 5. Pad with a constant value -----------------------------------------------------------

def _pad_model(value: float, opset: int, const_channel: float | None = None) -> onnx.ModelProto:
    """x ─ conv(6, ch 4 = 2 x ch 1) ─ Pad(value) ─ conv(pad 0) ─ y."""
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    n, c, hh, ww = b.shapes[c1]
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    if opset >= 11:
        inputs = [c1, b._const("pads", pads), b._const("value", np.float32(value))]
        b.weights["pads"] = np.array(pads, dtype=np.int64)
        padded = b.op("Pad", inputs, (n, c, hh + 2, ww + 2))
    else:
        padded = b.op("Pad", [c1], (n, c, hh + 2, ww + 2), pads=pads, value=value)
    y = b.conv(padded, 4, pad=0)
    b.scale_filter(c1, src=1, dst=4, factor=2.0)
    if const_channel is not None:
        b.kill_filter(c1, 2, bias=const_channel)
    return b.build(y, opset=opset)


@pytest.mark.parametrize("opset", [17, 10])
def test_pad_value_breaks_multiples_but_not_zero_padding(opset):
    assert removed(slim_exact(_pad_model(1.5, opset))) == 0
    assert removed(slim_exact(_pad_model(0.0, opset))) == 1


def test_constant_channel_through_pad_stays_constant_only_at_the_pad_value():
    assert removed(slim_exact(_pad_model(1.5, 17, const_channel=1.5))) == 1
    assert removed(slim_exact(_pad_model(1.5, 17, const_channel=0.7))) == 0


@pytest.mark.parametrize(("value", "expected"), [(1.5, 0), (0.0, 1)])
def test_resize_extrapolation_value_is_a_border_like_pad(value, expected):
    """tf_crop_and_resize writes `extrapolation_value` where the box leaves the image."""
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    roi = b._const("roi", [0, 0, -0.2, -0.2, 1, 1, 1.2, 1.2])
    scales = b._const("scales", [1, 1, 1.5, 1.5])
    r = b.op("Resize", [c1, roi, scales], (None, 6, 12, 12), mode="linear",
             coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=value)
    b.scale_filter(c1, src=1, dst=4, factor=2.0)
    assert removed(slim_exact(b.build(b.conv(r, 4, pad=0)))) == expected


# 6. channel axis ------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["BatchNormalization", "InstanceNormalization"])
def test_normalization_of_another_axis_than_the_channels_freezes(op):
    """MatMul writes 8 channels on axis 3; the norm's 2 parameters run along axis 1."""
    b = Net((None, 2, 3, 8))
    h = b.matmul(b.x, 8, bias=False)
    b.scale_filter(h, src=0, dst=5, factor=1.0)
    count = 4 if op == "BatchNormalization" else 2
    params = [b._const(f"p{i}", np.full(2, 1.0 + 0.1 * i)) for i in range(count)]
    y = b.matmul(b.op(op, [h, *params], b.shapes[h]), 4, bias=False)
    model = b.build(y)
    assert any(f"{op} normalizes axis 1, channels are on axis 3" in r for r in _reasons(model))
    assert removed(slim_exact(model)) == 0


@pytest.mark.parametrize("op", ["Conv", "MaxPool"])
def test_depthwise_conv_and_pooling_of_another_axis_freeze(op):
    b = Net((None, 4, 6, 8))
    h = b.matmul(b.x, 4, bias=False)  # channels on axis 3, axis 1 also has 4 entries
    b.scale_filter(h, src=0, dst=2, factor=1.0)
    if op == "Conv":
        w = b._const("dw", b.rng.standard_normal((4, 1, 3, 3)))
        t = b.op("Conv", [h, w], b.shapes[h], group=4, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        reason = "depthwise Conv filters axis 1, channels are on axis 3"
    else:
        t = b.op("MaxPool", [h], b.shapes[h], kernel_shape=[1, 1])
        reason = "MaxPool pools per channel of axis 1, channels are on axis 3"
    model = b.build(b.matmul(t, 3, bias=False))
    assert any(reason in r for r in _reasons(model))
    assert removed(slim_exact(model)) == 0


# 7. Gelu tanh, Cast rounding ------------------------------------------------------------

def _const_channel_through(ops: list[tuple[str, dict]], opset: int) -> onnx.ModelProto:
    """x ─ gemm(8, ch 3 := 2.2 constant) ─ ops ─ gemm ─ y."""
    b = Net((None, 12))
    h = b.gemm(b.x, 8)
    b.kill_filter(h, 3, bias=2.2)  # Gelu: erf and tanh differ by 2.7e-4; float16 by 7.8e-4
    t = h
    for op, attrs in ops:
        t = b.act(t, op, **attrs)
    return b.build(b.gemm(t, 5), opset=opset)


@pytest.mark.parametrize(("ops", "opset"), [
    ([("Gelu", {"approximate": "tanh"})], 20),
    ([("Cast", {"to": TensorProto.FLOAT16}), ("Cast", {"to": TensorProto.FLOAT})], 17),
    ([("Cast", {"to": TensorProto.BFLOAT16}), ("Cast", {"to": TensorProto.FLOAT})], 17),
])
def test_constant_channel_folds_with_the_op_own_formula_and_rounding(ops, opset):
    model = _const_channel_through(ops, opset)
    result = slim(model, latency_runs=0)
    assert removed(result) == 1
    assert_same_function(model, result.model, rtol=1e-6, atol=1e-6)


# 9. which channels remain --------------------------------------------------------------

def test_exact_mode_keeps_the_first_of_each_related_set_and_folds_the_rest():
    b = Net(cnn_input())
    c1 = b.conv(b.x, 8)
    y = b.conv(b.relu(c1), 4)
    b.scale_filter(c1, src=1, dst=3, factor=1.0)  # duplicate at 3
    b.scale_filter(c1, src=0, dst=5, factor=2.0)  # positive multiple at 5
    model = b.build(y)
    result = slim_exact(model)
    keep = [0, 1, 2, 4, 6, 7]
    w1, b1 = _weight(model, "conv1.w"), _weight(model, "conv1.b")
    np.testing.assert_array_equal(_weight(result.model, "conv1.w"), w1[keep])
    np.testing.assert_array_equal(_weight(result.model, "conv1.b"), b1[keep])
    w2 = _weight(model, "conv3.w").astype(np.float64)
    folded = w2[:, keep].copy()
    folded[:, 1] += w2[:, 3]  # the duplicate's weights join its representative's
    folded[:, 0] += 2.0 * w2[:, 5]
    np.testing.assert_allclose(_weight(result.model, "conv3.w"), folded, rtol=1e-6, atol=1e-7)
