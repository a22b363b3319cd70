"""Hostile but legal models (issue 7): odd attention layouts, channel-axis Slice / Split /
Pad / normalizations, broadcasting constants. Exact mode must keep the function on every
one: it removes the planted channel or head where it can prove it, and otherwise freezes
with a reason; never a wrong model at exit 0, never a traceback.

Every model plants one redundancy the analysis could find:

    attention: x ─ Q/K/V MatMul+Add ─ Reshape [B,T,H,d] ─ Transpose ─ QKᵀ ─ Softmax ─ ·V
               ─ Transpose ─ Reshape [B,T,H*d] ─ MatMul          plant: head 3 := head 0
    cnn:       x ─ Conv(8) ─ Relu ─ <op under test> ─ Conv(4)   plant: filter 4 := filter 1
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import removed, slim_exact
from hostile_graphs import OpBuilder
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxslim_fr import calibrate, slim
from onnxslim_fr.cli import main

B, TQ, TK, D, H, HD = 2, 5, 6, 8, 4, 3
C = 8


# attention --------------------------------------------------------------------------------
def attention(reshape: str = "zeros", kperm: str = "direct", softmax_axis: int = -1,
              mask: str | None = None, cross: bool = False, shared_kv: bool = False,
              opset: int = 17) -> onnx.ModelProto:
    """One attention block, head 3 a copy of head 0 (Q, K and V columns and biases)."""
    g = OpBuilder(opset)
    inner = H * HD
    w = {k: (g.rng.standard_normal((D, inner)) / 3).astype(np.float32) for k in "qkv"}
    b = {k: (0.1 * g.rng.standard_normal(inner)).astype(np.float32) for k in "qkv"}
    for k in "qkv":
        w[k][:, 3 * HD:], b[k][3 * HD:] = w[k][:, :HD], b[k][:HD]
    names = {k: (g.c(w[k]), g.c(b[k])) for k in "qkv"}
    if shared_kv:
        names["v"] = names["k"]
    heads = {}
    for k in "qkv":
        src, t = ("mem", TK) if cross and k != "q" else ("x", TQ)
        y = g.op("Add", [g.op("MatMul", [src, names[k][0]]), names[k][1]])
        target = {"zeros": [0, 0, H, HD], "minus_one": [-1, t, H, HD],
                  "heads_m1": [0, 0, -1, HD], "hd_m1": [0, 0, H, -1]}[reshape]
        heads[k] = _split_heads(g, k, g.op("Reshape", [y, g.c(np.array(target, np.int64))]),
                                kperm, t)
    s = g.op("Mul", [g.op("MatMul", [heads["q"], heads["k"]]), g.c(np.float32(HD ** -0.5))])
    if mask == "per-head constant":
        s = g.op("Add", [s, g.c(g.rng.standard_normal((1, H, TQ, TQ)).astype(np.float32))])
    ctx = g.op("MatMul", [g.op("Softmax", [s], axis=softmax_axis), heads["v"]])
    perm = [1, 2, 0, 3] if kperm == "heads first" else [0, 2, 1, 3]
    merged = g.op("Reshape", [g.op("Transpose", [ctx], perm=perm),
                              g.c(np.array([0, 0, inner], np.int64))])
    y = g.op("MatMul", [merged, g.c((g.rng.standard_normal((inner, D)) / 3).astype(np.float32))])
    batch = B if kperm == "dynamo" else "b"
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [batch, TQ, D])]
    if cross:
        inputs.append(h.make_tensor_value_info("mem", T.FLOAT, [batch, TK, D]))
    return g.build([y], inputs)


def _split_heads(g: OpBuilder, k: str, r: str, kperm: str, t: int) -> str:
    """[B,T,H,d] -> [B,H,T,d] (Q, V) or Kᵀ [B,H,d,T], written as `kperm` says."""
    if kperm == "heads first":  # [H,B,T,d], Kᵀ [H,B,d,T]
        return g.op("Transpose", [r], perm=[2, 0, 3, 1] if k == "k" else [2, 0, 1, 3])
    if k != "k":
        return g.op("Transpose", [r], perm=[0, 2, 1, 3])
    if kperm == "direct":
        return g.op("Transpose", [r], perm=[0, 2, 3, 1])
    k4 = g.op("Transpose", [r], perm=[0, 2, 1, 3])
    if kperm == "two steps":
        return g.op("Transpose", [k4], perm=[0, 1, 3, 2])
    # dynamo: heads merged with the batch, transposed, split back; "slot scale" multiplies
    # each (batch, head) slot by its own constant in between
    k3 = g.op("Transpose", [g.op("Reshape", [k4, g.c(np.array([-1, t, HD], np.int64))])],
              perm=[0, 2, 1])
    return g.op("Reshape", [k3, g.c(np.array([-1, H, HD, t], np.int64))])


def _slot_scaled() -> onnx.ModelProto:
    """The dynamo Kᵀ with a per-(batch, head) constant on the merged B*H axis."""
    model = attention(kperm="dynamo")
    nodes = list(model.graph.node)
    swap = next(n for n in nodes if n.op_type == "Transpose" and list(n.attribute[0].ints) ==
                [0, 2, 1])
    scale = nh.from_array((1 + np.arange(B * H)).astype(np.float32).reshape(-1, 1, 1), "slot")
    mul = h.make_node("Mul", [swap.output[0], "slot"], ["slot_scaled"], name="slot_mul")
    for n in nodes:
        for i, name in enumerate(n.input):
            if name == swap.output[0]:
                n.input[i] = "slot_scaled"
    nodes.insert(nodes.index(swap) + 1, mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.append(scale)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(("make", "heads_removed"), [
    (lambda: attention(reshape="minus_one"), 1),
    (lambda: attention(reshape="heads_m1"), 1),  # [0, 0, -1, d]
    (lambda: attention(reshape="hd_m1"), 1),  # [0, 0, H, -1]
    (lambda: attention(kperm="two steps"), 1),
    (lambda: attention(kperm="heads first"), 1),
    (lambda: attention(kperm="dynamo"), 1),
    (lambda: attention(softmax_axis=2), 1),  # over the queries: still within a head
    (lambda: attention(cross=True), 1),
    (lambda: attention(shared_kv=True), 1),
    (lambda: attention(opset=11), 1),
    (lambda: attention(opset=21), 1),
    (lambda: attention(softmax_axis=1), 0),  # over the heads: they are coupled
    (lambda: attention(mask="per-head constant"), 0),  # head 3's scores differ from head 0's
    (_slot_scaled, 0),
], ids=["reshape -1 first", "reshape -1 heads", "reshape -1 head dim", "Kᵀ in two steps",
        "heads first", "dynamo Kᵀ", "softmax over queries", "cross-attention", "shared K/V",
        "opset 11", "opset 21", "softmax over heads", "per-head mask", "per-slot scale"])
def test_attention_layouts_keep_the_function(make, heads_removed):
    result = slim_exact(make())
    assert removed(result) == heads_removed
    if not heads_removed:
        assert any(g["frozen"] for g in result.report.groups if g["size"] == H)


# channel-axis ops in CNNs ----------------------------------------------------------------
def cnn(middle, opset: int = 17, out_channels: int = C, plant: float = 1.0
        ) -> onnx.ModelProto:
    """x ─ Conv(8, filter 4 := plant x filter 1) ─ Relu ─ middle(g, r) ─ Conv(4)."""
    g = OpBuilder(opset, x=(None, 3, 8, 8))
    r = g.op("Relu", [g.conv("x", 3, C, plant=[(1, 4, plant)])])
    mid = middle(g, r)
    y = g.conv(mid, out_channels, 4)
    return g.build([y])


def _slice(starts: int, ends: int, step: int):
    return lambda g, r: g.op("Slice", [r, *(g.c(np.array([v], np.int64)) for v in
                                            (starts, ends, 1, step))])


def _pad(pads: list[int], value: float, axes: list[int] | None = None):
    def make(g: OpBuilder, r: str) -> str:
        extra = [g.c(np.array(axes, np.int64))] if axes else []
        return g.op("Pad", [r, g.c(np.array(pads, np.int64)), g.c(np.float32(value)), *extra])
    return make


def _layer_norm(axis: int):
    def make(g: OpBuilder, r: str) -> str:
        shape = [C, 8, 8][axis:]
        return g.op("LayerNormalization", [r, g.c(np.ones(shape, np.float32)),
                                           g.c(np.zeros(shape, np.float32))], axis=axis)
    return make


def _group_norm_decomposed(groups: int):
    """torch's GroupNorm export: Reshape [N, G, -1] ─ InstanceNormalization ─ Reshape back."""
    def make(g: OpBuilder, r: str) -> str:
        grouped = g.op("Reshape", [r, g.c(np.array([0, groups, -1], np.int64))])
        normed = g.op("InstanceNormalization", [grouped, g.c(np.ones(groups, np.float32)),
                                                g.c(np.zeros(groups, np.float32))])
        back = g.op("Reshape", [normed, g.op("Shape", [r])])
        return g.op("Mul", [back, g.c(np.linspace(0.5, 1.5, C, dtype=np.float32)
                                      .reshape(C, 1, 1))])
    return make


def _bias(shape: tuple[int, ...]):
    return lambda g, r: g.op("Add", [r, g.c(np.linspace(-1, 1, int(np.prod(shape)),
                                                        dtype=np.float32).reshape(shape))])


def _split_from_shape(g: OpBuilder, r: str) -> str:
    """split = [x.shape[1], 5] = [3, 5]: a Split whose sizes are computed from Shape."""
    three = g.op("Gather", [g.op("Shape", ["x"]), g.c(np.array([1], np.int64))])
    first, second = g.op("Split", [r, g.op("Concat", [three, g.c(np.array([5], np.int64))],
                                              axis=0)], outputs=2, axis=1)
    return g.op("Concat", [second, first], axis=1)


def _glu(computed: bool):
    """Gated linear unit: first half x sigmoid(second half), the halves cut at C / 2 computed
    from Shape (a Slice) or by an equal Split: removing one channel moves the cut."""
    def make(g: OpBuilder, r: str) -> str:
        if not computed:
            first, second = g.op("Split", [r], outputs=2, axis=1)
        else:
            channels = g.op("Gather", [g.op("Shape", [r]), g.c(np.array([1], np.int64))])
            half = g.op("Div", [channels, g.c(np.array([2], np.int64))])
            axis = g.c(np.array([1], np.int64))
            first = g.op("Slice", [r, g.c(np.array([0], np.int64)), half, axis])
            second = g.op("Slice", [r, half, g.c(np.array([2 ** 62], np.int64)), axis])
        return g.op("Mul", [first, g.op("Sigmoid", [second])])
    return make


@pytest.mark.parametrize(("make", "channels_removed", "reason"), [
    (lambda: cnn(_slice(-1, -(2 ** 63), -1)), 0, "Slice of the channel axis with step -1"),
    (lambda: cnn(_slice(1, 7, 2), out_channels=3), 0, "Slice of the channel axis with step 2"),
    (lambda: cnn(_slice(1, 2 ** 62, 1), out_channels=7), 1, None),
    (lambda: cnn(_split_from_shape), None, None),
    (lambda: cnn(_layer_norm(-2)), 0, "LayerNormalization"),
    (lambda: cnn(_layer_norm(1)), 0, "LayerNormalization over the channel axis"),
    (lambda: cnn(_group_norm_decomposed(1)), 0, "InstanceNormalization"),
    (lambda: cnn(_group_norm_decomposed(2)), 0, "Reshape"),
    (lambda: cnn(_pad([0, 0, 1, 1, 0, 0, 1, 1], 0.5)), 1, None),  # a copy stays a copy
    (lambda: cnn(_pad([0, 0, 1, 1, 0, 0, 1, 1], 0.5), plant=2.5), 0, None),  # 2.5x: not
    (lambda: cnn(_pad([0, 0, 1, 1, 0, 0, 1, 1], 0.0), plant=2.5), 1, None),
    (lambda: cnn(_pad([1, 2], 0.0, axes=[1]), opset=18, out_channels=C + 3), 0, "Pad"),
    (lambda: cnn(_pad([1, 1, 1, 1], 0.0, axes=[2, 3]), opset=18), None, None),
    (lambda: cnn(_glu(computed=True), out_channels=C // 2), None, None),
    (lambda: cnn(_glu(computed=False), out_channels=C // 2), None, None),
    (lambda: cnn(_bias((C, 1))), 0, "not per-channel"),  # broadcasts over H, not channels
    (lambda: cnn(_bias((C,))), 0, "not per-channel"),  # broadcasts over W
], ids=["slice reversed", "slice step 2", "slice from 1", "split from Shape", "LN axis -2",
        "LN axis 1", "GroupNorm 1 group", "GroupNorm 2 groups", "Pad 0.5 copy", "Pad 0.5 multiple",
        "Pad 0 multiple", "Pad channels",
        "Pad axes input", "GLU computed halves", "GLU Split halves", "bias [C,1]",
        "bias [C]"])
def test_channel_axis_ops_keep_the_function(make, channels_removed, reason):
    result = slim_exact(make())
    if channels_removed is not None:
        assert removed(result) == channels_removed
    if reason is not None:
        assert any(reason in (g["frozen"] or "") for g in result.report.groups), \
            [g["frozen"] for g in result.report.groups]


def test_group_normalization_opset_21_freezes_instead_of_refusing():
    """Seen: onnx 1.23's strict shape inference gives GroupNormalization-21 no output type,
    and the model was refused as 'shape inference failed'."""
    def group_norm(g: OpBuilder, r: str) -> str:
        return g.op("GroupNormalization", [r, g.c(np.ones(C, np.float32)),
                                           g.c(np.zeros(C, np.float32))], num_groups=1)

    result = slim_exact(cnn(group_norm, opset=21))
    assert any("GroupNormalization" in (g["frozen"] or "") for g in result.report.groups)


# calibration data --------------------------------------------------------------------------
def classifier() -> onnx.ModelProto:
    """x ─ Conv(8) ─ Relu ─ GlobalAveragePool ─ Flatten ─ Gemm(10): class scores."""
    g = OpBuilder(x=(None, 3, 8, 8))
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Relu", [g.conv("x", 3, C)])])])
    y = g.op("Gemm", [pooled, g.c(g.rng.standard_normal((C, 10)).astype(np.float32))])
    return g.build([y])


def test_max_samples_cuts_the_last_batch_of_arrays_too():
    """Seen: `--max-samples 16` with 359 samples kept a whole batch of 64 but 16 labels, so
    accuracy was None and `--max-accuracy-drop` ended in an internal error (exit 3)."""
    data = {"x": np.zeros((50, 3, 8, 8), np.float32), "labels": np.zeros(50, np.int64)}
    got = calibrate.load_data(data, classifier(), batch_size=8, max_samples=13)
    assert [len(b["x"]) for b in got.batches] == [8, 5]
    assert len(got.labels) == 13


def test_accuracy_bound_with_max_samples_is_not_an_internal_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "in.onnx"
    onnx.save(classifier(), path)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 10, 40))
    code = main([str(path), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "d.npz"),
                 "--max-accuracy-drop", "0.5", "--max-samples", "16", "-q"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out.onnx").exists()


def test_output_ending_with_a_separator_is_refused(tmp_path, capsys):
    path = tmp_path / "in.onnx"
    onnx.save(classifier(), path)
    assert main([str(path), f"{tmp_path}/newdir/"]) == 2
    assert "ends with a path separator" in capsys.readouterr().err
    with pytest.raises(Exception, match="path separator"):
        slim(str(path), f"{tmp_path}/newdir/")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_fidelity_measured_on_the_calibration_data_says_so():
    """Seen: one calibration sample, `--ratio 0.5`: "max rel error 3.8e-07, accuracy 1.0"
    measured on that sample, 20% accuracy on the other 358. Without --holdout the report
    says its figures are in-sample."""
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((24, 3, 8, 8)).astype(np.float32)}
    held = {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    for holdout, noted in ((None, True), (held, False)):
        rep = slim(classifier(), data=data, holdout=holdout, ratio=0.25, round_to=1,
                   latency_runs=0).report
        assert any("in-sample" in n for n in rep.notes) is noted, rep.notes
