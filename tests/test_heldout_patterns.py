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
