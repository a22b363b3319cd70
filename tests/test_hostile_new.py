"""Hostile but legal models aimed at the newest changes (issue 7, no silent damage): grouped
Conv with 1 < group < C and what follows it, Pow as an activation, Where/IsNaN and Expand
away from attention, Reshape targets and scales computed from the channel count,
GroupNormalization-21, ai.onnx.ml Scaler before a MatMul. Exact mode keeps the function
on each (removing the planted channel where it can prove it); calibrated mode ends in a
model or a one-line refusal, never exit 3.

    cnn: x[b,8,6,6] ─ Conv(8) ─ Relu ─ <op under test> ─ Conv(4)   plant: filter 4 := filter 1
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import removed
from hostile_graphs import OpBuilder
from onnx import TensorProto as T
from onnx import helper as h

from onnxslim_fr import slim
from onnxslim_fr.cli import main
from onnxslim_fr.report import render_groups
from onnxslim_fr.testing import assert_same_function, random_feeds

C = 8


def _relu_conv(g: OpBuilder) -> str:
    """Relu(Conv(x)) with the usual plant: filter 4 := filter 1."""
    return g.op("Relu", [g.conv("x", C, C, plant=[(1, 4, 1.0)])])


def _exact(model: onnx.ModelProto) -> int:
    """Slim in exact mode, check validity and the function on three seeded batches."""
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    for seed in range(3):
        feeds = {k: 3 * v for k, v in random_feeds(model, batch=3, seed=seed).items()}
        assert_same_function(model, result.model, feeds=feeds, rtol=1e-4, atol=1e-4)
    return removed(result)


def _i64(v: object) -> np.ndarray:
    return np.array(v, np.int64)


# grouped Conv ----------------------------------------------------------------------------
def _per_piece(group: int, dst: int, f: float) -> list[tuple[int, int, float]]:
    """Filter dst := f x filter 0 in every group piece: removable only as one channel."""
    width = C // group
    return [(j * width, j * width + dst, f) for j in range(group)]


def grouped(group: int, after: str) -> onnx.ModelProto:
    g = OpBuilder()
    a = g.op("Relu", [g.conv("x", C, C, plant=_per_piece(group, 1, 2.0))])
    y = g.conv(a, C, C, group=group, plant=_per_piece(group, C // group - 1, -0.5))
    y = y if after == "residual" else g.op("Relu", [y])
    width = C
    if after == "depthwise":
        y = g.conv(y, C, C, group=C)
    elif after.startswith("group"):
        y = g.conv(y, C, C, group=int(after[5:]))
    elif after == "concat":
        y, width = g.op("Concat", [y, a], axis=1), 2 * C
    elif after == "residual":
        y = g.op("Add", [y, a])
    elif after == "split":  # cut across the group pieces
        p = g.op("Split", [y, g.c(_i64([3, 5]))], outputs=2, axis=1)
        y, width = g.op("Add", [g.conv(p[0], 3, 4), g.conv(p[1], 5, 4)]), 4
    return g.build([g.conv(y, width, 4)])


@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("after", ["none", "depthwise", "group2", "group4", "concat",
                                   "residual", "split"])
def test_grouped_conv_keeps_the_function(group: int, after: str) -> None:
    gone = _exact(grouped(group, after))
    assert gone == (0 if after == "residual" else 1)


def test_a_grouped_conv_tells_that_its_channels_go_with_their_copies() -> None:
    """One duplicate in one block of a group-4 conv cannot go (every block must keep the
    same width): the groups table says the group repeats 4 times, not just '2 of 2'."""
    g = OpBuilder()
    a = g.op("Relu", [g.conv("x", C, C, plant=[(0, 1, 1.0)])])
    model = g.build([g.conv(g.op("Relu", [g.conv(a, C, C, group=4)]), C, 4)])
    result = slim(model, latency_runs=0)
    rows = [r for r in result.report.groups if r["repeats"] == 4]
    assert rows and all(r["size"] == 2 and r["kept"] == 2 for r in rows)
    assert "x4 (repeats in 4 blocks" in render_groups(result.report.groups)


# Pow ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exponent", [0, 1, 2, 3, 0.5, -1, [2.0], [[[[3.0]]]]])
@pytest.mark.parametrize("factor", [1.0, -1.0])
def test_pow_keeps_the_function(exponent: object, factor: float) -> None:
    g = OpBuilder()
    a = g.op("Relu", [g.conv("x", C, C, plant=[(1, 4, factor)])])
    y = g.op("Pow", [a, g.c(np.asarray(exponent, np.float32))])
    with np.errstate(divide="ignore", invalid="ignore"):
        gone = _exact(g.build([g.conv(y, C, 4)]))
    assert gone == (1 if factor == 1.0 else 0)  # duplicates fold through any Pow


@pytest.mark.parametrize("kind", ["per-channel", "base", "self"])
def test_pow_not_one_constant_exponent_freezes(kind: str) -> None:
    g = OpBuilder()
    a = _relu_conv(g)
    exponent = g.c((np.arange(C) % 3 + 1).astype(np.float32).reshape(1, C, 1, 1))
    y = {"per-channel": lambda: g.op("Pow", [a, exponent]),
         "base": lambda: g.op("Pow", [g.c(np.float32(2.0)), a]),
         "self": lambda: g.op("Pow", [a, a])}[kind]()
    assert _exact(g.build([g.conv(y, C, 4)])) == 0


# Where / IsNaN / Expand away from attention --------------------------------------------------
@pytest.mark.parametrize("kind", ["isnan", "mask per channel", "mask spatial", "mask from x",
                                  "other per channel", "expand C from 1", "expand to shape"])
def test_select_and_expand_on_channels(kind: str) -> None:
    g = OpBuilder()
    a = _relu_conv(g)
    mask = g.c(g.rng.random((1, C, 1, 1) if kind == "mask per channel" else (1, 1, 6, 6)) > .5)
    if kind == "isnan":
        y = g.op("Where", [g.op("IsNaN", [a]), g.c(np.float32(0)), a])
    elif kind == "mask from x":
        y = g.op("Where", [g.op("Greater", [a, g.c(np.float32(.3))]), a, g.c(np.float32(0))])
    elif kind == "other per channel":
        y = g.op("Where", [mask, a, g.c(g.rng.standard_normal((1, C, 1, 1)).astype("f4"))])
    elif kind == "expand C from 1":
        one = g.op("Relu", [g.conv("x", C, 1)])
        y = g.op("Add", [g.op("Expand", [one, g.c(_i64([1, C, 1, 1]))]), a])
    elif kind == "expand to shape":
        y = g.op("Expand", [a, g.op("Shape", [a])])
    else:
        y = g.op("Where", [mask, a, g.c(np.float32(-1))])
    _exact(g.build([g.conv(y, C, 4)]))


# values computed from the channel count ----------------------------------------------------
@pytest.mark.parametrize("kind", ["scale", "regroup", "guarded target", "where target",
                                  "count of ones", "size"])
def test_channel_count_arithmetic(kind: str) -> None:
    """A value that depends on the number of channels must not change with it."""
    g = OpBuilder()
    a = _relu_conv(g)
    s = g.op("Shape", [a])
    c = g.op("Gather", [s, g.c(_i64(1))], axis=0)
    c1 = g.op("Unsqueeze", [c, g.c(_i64([0]))])
    n = g.op("Gather", [s, g.c(_i64([0]))], axis=0)
    is_c = g.op("Equal", [c, g.c(_i64(C))])
    gemm_w = g.c((g.rng.standard_normal((4, C * 36)) / 17).astype(np.float32))
    if kind == "scale":
        k = g.op("Where", [is_c, g.c(np.float32(1)), g.c(np.float32(2))])
        y = g.op("Mul", [g.conv(a, C, 4), k])
    elif kind == "regroup":
        k = g.op("Where", [is_c, g.c(_i64([2])), g.c(_i64([4]))])
        r = g.op("Reshape", [a, g.op("Concat", [n, k, g.c(_i64([-1]))], axis=0)])
        r = g.op("Reshape", [g.op("Transpose", [r], perm=[0, 2, 1]), g.c(_i64([0, -1]))])
        y = g.op("Gemm", [r, gemm_w], transB=1)
    elif kind == "guarded target":
        k = g.op("Where", [g.op("Equal", [c1, g.c(_i64([0]))]), g.c(_i64([1])), c1])
        r = g.op("Reshape", [a, g.op("Concat", [n, k, g.c(_i64([-1]))], axis=0)])
        r = g.op("ReduceMean", [r], axes=[2], keepdims=0)
        y = g.op("Gemm", [r, g.c((g.rng.standard_normal((4, C)) / 3).astype("f4"))], transB=1)
    elif kind == "where target":
        flat = g.op("Concat", [n, g.c(_i64([-1]))], axis=0)
        sized = g.op("Concat", [n, g.op("Mul", [c1, g.c(_i64([36]))])], axis=0)
        r = g.op("Reshape", [a, g.op("Where", [is_c, flat, sized])])
        y = g.op("Gemm", [r, gemm_w], transB=1)
    elif kind == "count of ones":
        ones = g.op("ConstantOfShape", [c1], value=h.make_tensor("v", T.FLOAT, [1], [1.0]))
        y = g.op("Mul", [g.conv(a, C, 4), g.op("ReduceSum", [ones], keepdims=1)])
    else:
        y = g.op("Div", [g.conv(a, C, 4), g.op("Cast", [g.op("Size", [a])], to=T.FLOAT)])
    _exact(g.build([y]))


# GroupNormalization-21, Scaler -------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, C // 2, C])
@pytest.mark.parametrize("at_output", [False, True])
def test_group_normalization_21(groups: int, at_output: bool) -> None:
    g = OpBuilder(opset=21)
    a = _relu_conv(g)
    y = g.op("GroupNormalization", [a, g.c((1 + g.rng.random(C)).astype("f4")),
                                    g.c((0.1 * g.rng.random(C)).astype("f4"))],
             num_groups=groups, epsilon=1e-5)
    _exact(g.build([y] if at_output else [g.conv(g.op("Relu", [y]), C, 4)]))


@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("tracked", [False, True])
def test_scaler_and_matmul(per_feature: bool, tracked: bool) -> None:
    """Scaler before the MatMul (its input) or after it (on the tracked features)."""
    g = OpBuilder(rank=2)
    w1 = (g.rng.standard_normal((6, C)) / 2).astype(np.float32)
    w1[:, 5] = 2 * w1[:, 2]  # a Relu-homogeneous multiple
    n = 6 if not tracked else C
    offset = g.rng.standard_normal(n).tolist() if per_feature else [0.5]
    scale = (1 + g.rng.random(n)).tolist() if per_feature else [2.0]
    x = "x" if tracked else g.op("Scaler", ["x"], domain="ai.onnx.ml", offset=offset,
                                 scale=scale)
    y = g.op("MatMul", [x, g.c(w1)])
    if tracked:
        y = g.op("Scaler", [y], domain="ai.onnx.ml", offset=offset, scale=scale)
    y = g.op("MatMul", [g.op("Relu", [y]), g.c((g.rng.standard_normal((C, 3))).astype("f4"))])
    model = g.build([y], [h.make_tensor_value_info("x", T.FLOAT, ["b", 6])],
                    domains=("ai.onnx.ml",))
    gone = _exact(model)
    assert gone == (0 if tracked else 1)


# calibrated mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("exponent, relu", [(-1.0, True), (0.5, False)])
def test_calibration_data_giving_nan_is_refused(tmp_path, capsys, exponent: float,
                                                relu: bool) -> None:
    """Pow(0, -1) / Pow(-x, 0.5) on the data: was exit 3 (scikit-learn: "Input X contains
    NaN"); now one line that names the tensor, nothing written."""
    g = OpBuilder()
    a = g.conv("x", C, C)
    a = g.op("Relu", [a]) if relu else a
    model = g.build([g.conv(g.op("Pow", [a, g.c(np.float32(exponent))]), C, 4)])
    src, out, data = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "d.npy"
    onnx.save(model, src)
    np.save(data, np.random.default_rng(0).standard_normal((16, C, 6, 6)).astype("f4"))
    with np.errstate(divide="ignore", invalid="ignore"):
        code = main([str(src), str(out), "-q", "--data", str(data), "--ratio", "0.5"])
    assert code == 2 and not out.exists()
    assert "NaN or infinite" in capsys.readouterr().err


@pytest.mark.parametrize("channel_entry", ["shape", "size of other", "literal", "doubled",
                                           "other group"])
def test_resize_sizes_read_off_the_input_follow_its_channels(channel_entry):
    """torch's ``interpolate(top, size=...)`` writes sizes = Concat(Shape(top)[:2], [H, W]):
    the channel entry is the input's own count, so the FPN's merged group (a lateral conv
    added to the upsampled top, both with filter 4 := filter 1) slims. A literal channel
    count in the sizes, or one computed from it (2C interpolates along the channels),
    still freezes the top."""
    g = OpBuilder(x=("b", 8, 6, 6))
    top = g.op("Relu", [g.conv(g.op("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2]),
                               C, C, plant=[(1, 4, 1.0)])])
    lateral = g.conv("x", C, C, plant=[(1, 4, 1.0)])
    shape = g.op("Slice", [g.op("Shape", [top]), g.c(np.array([0])), g.c(np.array([2]))])
    if channel_entry == "literal":
        shape = g.op("Concat", [g.op("Slice", [shape, g.c(np.array([0])), g.c(np.array([1]))]),
                                g.c(np.array([C]))], axis=0)
    elif channel_entry == "doubled":
        shape = g.op("Mul", [shape, g.c(np.array([1, 2]))])
    elif channel_entry == "other group":  # C_top + C_other - C: C today, not once slimmed
        other = g.op("Relu", [g.conv("x", C, C, plant=[(0, 3, 1.0)])])
        c_other = g.op("Slice", [g.op("Shape", [other]), g.c(np.array([1])),
                                 g.c(np.array([2]))])
        shape = g.op("Concat", [g.op("Slice", [shape, g.c(np.array([0])), g.c(np.array([1]))]),
                                g.op("Sub", [g.op("Add", [g.op("Slice", [
                                    shape, g.c(np.array([1])), g.c(np.array([2]))]), c_other]),
                                    g.c(np.array([C]))])], axis=0)
    size = g.c(np.array([6, 6])) if channel_entry != "size of other" else g.op(
        "Slice", [g.op("Shape", [lateral]), g.c(np.array([2])), g.c(np.array([4]))])
    up = g.op("Resize", [top, "", "", g.op("Concat", [shape, size], axis=0)], mode="nearest")
    if channel_entry == "doubled":  # 2C channels: their own head
        outputs = [g.conv(g.op("Relu", [lateral]), C, 4), g.conv(up, 2 * C, 4)]
    elif channel_entry == "other group":
        outputs = [g.conv(g.op("Relu", [g.op("Add", [lateral, up])]), C, 4),
                   g.conv(other, C, 4)]
    else:
        outputs = [g.conv(g.op("Relu", [g.op("Add", [lateral, up])]), C, 4)]
    model = g.build(outputs)
    result = slim(model, latency_runs=0)
    assert_same_function(model, result.model)
    follows = channel_entry in ("shape", "size of other")  # H, W of another: no channels
    assert removed(result) == (1 if follows or channel_entry == "doubled" else 0)
    frozen = [r["frozen"] for r in result.report.groups if r["frozen"]]
    assert any("explicit sizes" in f for f in frozen) == (not follows)
