"""Patterns found by the held-out sweep (tools/heldout_sweep.py) over real exporters' models.

    torch.chunk as TorchScript writes it (ShuffleNetV2 units, YOLO C2f):
    x ─ Reshape(x, Concat(Shape(x)[0], Cast(Shape(x)[1] / 1), [6, 6])) ─ t   (its shape:
    only from the evaluated target, as after a TorchScript channel shuffle)
    t ─┬ Slice[0 : (C+1)/2] ───────────────────────────── Relu ─┐
       ├ Slice[(C+1)/2 : 2*((C+1)/2)] ─ Conv(4) ─ Relu ──────────┴ Concat ─ Conv ─ y
       └ Shape ─ Gather(1) ─ Add 1 ─ Div 2 ─ Mul 1|2 ─ (the Slice bounds)

onnx's shape inference gives up on every axis of a Slice whose bounds are computed, so
the Concat could not tell how many channels its untracked input has ("dynamic dimension
1") and froze the Conv's group; the bounds evaluate to numbers
(shape_values.sliced_shape) and the group stays free.

    channel shuffle (ShuffleNet; paddle2onnx and both torch exporters write it so):
    x ─ Conv(8) ─ Relu ─ Reshape [N, 2, 4, H, W] ─ Transpose(0, 2, 1, 3, 4)
                                   ─ Reshape [N, 8, H, W] ─ Conv(4) ─ y

Output channel 2k + i is input channel 4i + k: the halves are interleaved. Only whole
halves can go (a half that duplicates the other), and the function must stay.

    ConvNeXt block (torch, both exporters): channels-last LayerNorm, Linear, layer scale
    x ─ Conv(8) ─┬ Transpose(NHWC) ─ LayerNorm ─ MatMul(32) ─ Relu ─ MatMul(8) ─ Mul γ ─┐
                 └──────────────────────────────────── Transpose(NCHW) ─ Add ─┘ ─ Conv ─ y

The LayerNorm's mean and variance read every trunk channel: the trunk freezes, saying so;
the 32 hidden channels between the two MatMuls are free (a planted duplicate goes).
"""

from __future__ import annotations

import numpy as np
import onnx
from builders import Net

from onnxslim_fr import analyze, slim
from onnxslim_fr.testing import assert_same_function


def _int(b: Net, name: str, value: list[int]) -> str:
    b.weights[name] = np.array(value, np.int64)
    return name


def chunk_net() -> onnx.ModelProto:
    """The module docstring's chunk, with bounds computed from Shape as TorchScript does."""
    b = Net((None, 8, 6, 6))
    n, c, h, w = b.shapes[b.x]
    dims = b.op("Shape", [b.x], (4,))
    batch = b.op("Gather", [dims, _int(b, "zero", [0])], (1,), axis=0)
    same = b.op("Div", [b.op("Gather", [dims, _int(b, "one", [1])], (1,), axis=0), "one"], (1,))
    same = b.op("Cast", [same], (1,), to=onnx.TensorProto.INT64)
    target = b.op("Concat", [batch, same, _int(b, "hw", [h, w])], (4,), axis=0)
    t = b.op("Reshape", [b.x, target], (n, c, h, w))
    shape = b.op("Shape", [t], (4,))
    ch = b.op("Gather", [shape, "one"], (1,), axis=0)
    half = b.op("Div", [b.op("Add", [ch, _int(b, "plus", [1])], (1,)), _int(b, "two", [2])],
                (1,))
    end1 = b.op("Mul", [half, _int(b, "k1", [1])], (1,))
    end2 = b.op("Mul", [half, _int(b, "k2", [2])], (1,))
    first = b.op("Slice", [t, "zero", end1, "one"], (n, 4, h, w))
    second = b.op("Slice", [t, end1, end2, "one"], (n, 4, h, w))
    joined = b.concat([b.relu(first), b.relu(b.conv(second, 4))])
    return b.build(b.conv(joined, 3))


def test_a_chunk_with_computed_bounds_keeps_its_groups_free():
    model = chunk_net()
    _, rows = analyze(model)
    inner = [r for r in rows if r["producers"] == ["conv17"]]
    assert len(inner) == 1 and inner[0]["frozen"] is None, rows
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model)


def shuffle_net(duplicate_half: bool) -> onnx.ModelProto:
    b = Net((None, 3, 6, 6))
    conv = b.conv(b.x, 8)
    if duplicate_half:
        for k in range(4):
            b.scale_filter(conv, src=k, dst=4 + k, factor=1.0)
    t = b.relu(conv)
    r = b.op("Reshape", [t, _int(b, "split", [0, 2, 4, 6, 6])], (None, 2, 4, 6, 6))
    s = b.op("Transpose", [r], (None, 4, 2, 6, 6), perm=[0, 2, 1, 3, 4])
    joined = b.op("Reshape", [s, _int(b, "merge", [0, 8, 6, 6])], (None, 8, 6, 6))
    return b.build(b.conv(joined, 4))


def test_a_split_after_a_channel_shuffle_freezes_saying_the_channels_are_interleaved():
    b = Net((None, 3, 6, 6))
    t = b.relu(b.conv(b.x, 8))
    r = b.op("Reshape", [t, _int(b, "split", [0, 2, 4, 6, 6])], (None, 2, 4, 6, 6))
    s = b.op("Transpose", [r], (None, 4, 2, 6, 6), perm=[0, 2, 1, 3, 4])
    joined = b.op("Reshape", [s, _int(b, "merge", [0, 8, 6, 6])], (None, 8, 6, 6))
    halves = b.op("Split", [joined, _int(b, "sizes", [4, 4])], (None, 4, 6, 6), axis=1)
    b.nodes[-1].output.append("other")
    b.shapes["other"] = (None, 4, 6, 6)
    model = b.build([b.conv(halves, 2), b.conv("other", 2)])
    _, rows = analyze(model)
    first = next(r for r in rows if r["producers"] == ["conv1"])
    assert "interleaved channels (a channel shuffle" in first["frozen"]


def test_a_channel_shuffle_removes_only_whole_interleaved_halves():
    plain = shuffle_net(duplicate_half=False)
    result = slim(plain, latency_runs=0)
    assert result.report.after.channels == result.report.before.channels
    model = shuffle_net(duplicate_half=True)
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.before.channels - result.report.after.channels == 4
    assert_same_function(model, result.model)


def convnext_block() -> onnx.ModelProto:
    b = Net((None, 3, 6, 6))
    trunk = b.conv(b.x, 8)
    nhwc = b.op("Transpose", [trunk], (None, 6, 6, 8), perm=[0, 2, 3, 1])
    scale, shift = b._const("ln.w", 1 + 0.2 * b.rng.random(8)), b._const("ln.b", np.zeros(8))
    normed = b.op("LayerNormalization", [nhwc, scale, shift], (None, 6, 6, 8), axis=-1)
    hidden = b.matmul(normed, 32)
    b.scale_filter(next(n.output[0] for n in b.nodes if n.op_type == "MatMul"), 3, 9, 1.0)
    out = b.matmul(b.relu(hidden), 8)
    scaled = b.op("Mul", [out, b._const("gamma", 0.5 + b.rng.random(8))], (None, 6, 6, 8))
    back = b.op("Transpose", [scaled], (None, 8, 6, 6), perm=[0, 3, 1, 2])
    return b.build(b.conv(b.add(trunk, back), 4))


def test_a_channels_last_layernorm_freezes_the_trunk_with_its_reason_not_the_hidden_layer():
    model = convnext_block()
    _, rows = analyze(model)
    by_producer = {tuple(r["producers"]): r for r in rows}
    trunk = next(r for p, r in by_producer.items() if "conv1" in p)
    assert "LayerNormalization over the channel axis" in trunk["frozen"]
    hidden = next(r for r in rows if r["size"] == 32)
    assert hidden["frozen"] is None
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.before.channels - result.report.after.channels == 1
    assert_same_function(model, result.model)


def grouped_block(pair: bool, cross: bool = False) -> onnx.ModelProto:
    """ResNeXt / ShuffleNet-v1 grouped conv (group=2) between two dense convs:

        x ─ Conv(8) ─ Relu ─ Conv(8, group=2) ─ Relu ─ Conv(4) ─ y

    Group j of the grouped conv reads input channels 4j..4j+3 only, so the pieces must
    keep as many channels: index-coupled. Planted: input channel 1 duplicates 0 (and, with
    `pair`, 5 duplicates 4, its partner in the other piece); output 3 duplicates 2 and 7
    duplicates 6 (same rows, same input piece). With `cross`, output 4's row equals output
    0's: the same numbers in different groups read different channels, not a duplicate."""
    b = Net((None, 3, 6, 6))
    first = b.conv(b.x, 8)
    b.scale_filter(first, 0, 1, 1.0)
    if pair:
        b.scale_filter(first, 4, 5, 1.0)
    grouped = b.conv(b.relu(first), 8, group=2)
    b.scale_filter(grouped, 2, 3, 1.0)
    b.scale_filter(grouped, 6, 7, 1.0)
    if cross:
        b.scale_filter(grouped, 0, 4, 1.0)
    return b.build(b.conv(b.relu(grouped), 4))


def test_a_grouped_conv_removes_the_same_channels_from_every_group():
    model = grouped_block(pair=True)
    _, rows = analyze(model)
    inner = [r for r in rows if r["producers"] != ["conv5"]]
    assert [(r["size"], r["frozen"]) for r in inner] == [(4, None), (4, None)], rows
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.before.channels - result.report.after.channels == 4
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv" and
                any(a.name == "group" and a.i == 2 for a in n.attribute))
    w = next(t for t in result.model.graph.initializer if t.name == conv.input[1])
    assert list(w.dims[:2]) == [6, 3]
    assert_same_function(model, result.model)


def test_a_grouped_conv_keeps_a_duplicate_whose_partner_piece_has_none():
    model = grouped_block(pair=False, cross=True)
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    # only the in-group output duplicates (3 = 2, 7 = 6) go; 1 = 0 has no partner in the
    # other piece and output 4 = output 0 reads other channels
    assert result.report.before.channels - result.report.after.channels == 2
    assert_same_function(model, result.model)


def scaler_mlp() -> onnx.ModelProto:
    """skl2onnx's Pipeline(StandardScaler, MLPClassifier), ZipMap left out:

        X ─ Scaler (ai.onnx.ml) ─ Cast ─ MatMul(16) ─ Add ─ Relu ─ MatMul(4) ─ Add ─ y

    onnx infers no shape for Scaler, so nothing after it had one and the hidden layer was
    in no group. Hidden unit 5 duplicates unit 2 (planted): it goes."""
    b = Net((None, 8))
    scaled = b.op("Scaler", [b.x], (None, 8), domain="ai.onnx.ml",
                  offset=[0.5] * 8, scale=[2.0] * 8)
    cast = b.op("Cast", [scaled], (None, 8), to=onnx.TensorProto.FLOAT)
    hidden = b.matmul(cast, 16)
    b.scale_filter(next(n.output[0] for n in b.nodes if n.op_type == "MatMul"), 2, 5, 1.0)
    return b.build(b.matmul(b.relu(hidden), 4), domains=("ai.onnx.ml",))


def test_layers_after_a_scikit_learn_scaler_have_shapes_and_groups():
    model = scaler_mlp()
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.before.channels - result.report.after.channels == 1
    assert_same_function(model, result.model)


def zipmap_classifier() -> onnx.ModelProto:
    """skl2onnx's MLPClassifier: the probabilities leave as a ZipMap's sequence of maps and
    the label through ArgMax (an int64 tensor):

        x ─ MatMul(16) ─ Add ─ Relu ─ MatMul(5) ─ Add ─ Softmax ─┬ ZipMap ─ probabilities
                                                                  └ ArgMax ─ label
    Hidden unit 6 is the constant 0.7 (planted): folding it into the next bias changes the
    float rounding, which a comparison of the maps for equality took for a wrong model."""
    from onnx import helper

    b = Net((None, 8))
    hidden = b.matmul(b.x, 16)
    b.kill_filter(next(n.output[0] for n in b.nodes if n.op_type == "MatMul"), 6, bias=0.7)
    probs = b.op("Softmax", [b.matmul(b.relu(hidden), 5)], (None, 5), axis=1)
    b.nodes.append(helper.make_node("ZipMap", [probs], ["probabilities"], name="zipmap",
                                    domain="ai.onnx.ml", classlabels_int64s=list(range(5))))
    b.nodes.append(helper.make_node("ArgMax", [probs], ["label"], name="argmax", axis=1,
                                    keepdims=0))
    maps = helper.make_sequence_type_proto(helper.make_map_type_proto(
        onnx.TensorProto.INT64, helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])))
    graph = helper.make_graph(
        b.nodes, "zipmap", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                          [None, 8])],
        [helper.make_tensor_value_info("label", onnx.TensorProto.INT64, [None]),
         helper.make_value_info("probabilities", maps)],
        [onnx.numpy_helper.from_array(v, k) for k, v in b.weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 10
    return model


def test_a_zipmap_classifier_is_slimmed_and_validated_within_the_tolerance():
    model = zipmap_classifier()
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.before.channels - result.report.after.channels == 1
    x = np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32)
    calibrated = slim(model, data={"x": x}, ratio=0.3, latency_runs=0)
    onnx.checker.check_model(calibrated.model, full_check=True)
    assert calibrated.report.after.channels < result.report.after.channels


def decomposed_group_norm_net() -> onnx.ModelProto:
    """torch's GroupNorm(2, 8) below opset 18 (both exporters write it so):

        x ─ Conv(8) ─ Reshape [0, 2, -1] ─ InstanceNormalization ─ Reshape(Shape(conv))
                    ─ Mul gamma ─ Add beta ─ Relu ─ Conv(4) ─ y
    """
    b = Net((None, 3, 6, 6))
    conv = b.conv(b.x, 8)
    grouped = b.op("Reshape", [conv, _int(b, "groups", [0, 2, -1])], (None, 2, 144))
    normed = b.op("InstanceNormalization", [grouped, b._const("one", np.ones(2)),
                                            b._const("zero", np.zeros(2))], (None, 2, 144))
    back = b.op("Reshape", [normed, b.op("Shape", [conv], (4,))], (None, 8, 6, 6))
    scaled = b.op("Mul", [back, b._const("gamma", 0.5 + b.rng.random((8, 1, 1)))],
                  (None, 8, 6, 6))
    shifted = b.op("Add", [scaled, b._const("beta", b.rng.random((8, 1, 1)))], (None, 8, 6, 6))
    return b.build(b.conv(b.relu(shifted), 4))


def test_a_decomposed_group_norm_freezes_saying_it_is_a_group_norm():
    model = decomposed_group_norm_net()
    _, rows = analyze(model)
    trunk = next(r for r in rows if r["producers"] == ["conv1"])
    assert trunk["frozen"].startswith("GroupNormalization (Reshape [N, G, -1] -> Instance")
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model)
