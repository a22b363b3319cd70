"""Split and Slice on the channel axis: index-coupled pieces of one channel group.

    x ─ conv(8) ─ relu ─ Split[4, 4] ─┬─ a ───────────────────────────┐
                                      └─ s ─┬─ conv ─ relu ─ conv ─ + ─ m ─┤ Concat(a, s, m) ─ conv
                                            └──────────────────────────┘
    plant: conv rows 0 = 2 (in a), 5 = 7 (in s, with the bottleneck's rows 1 = 3),
    bottleneck inner rows 0 = 2  =>  conv 8 -> 6, Split [3, 3], bottleneck 4 -> 3 twice

Each test checks structure (what is left, sizes rewritten), function (1e-5) and validity.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Net
from conftest import slim_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxslim_fr import analyze, slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.testing import assert_same_function

INT64_MAX = np.iinfo(np.int64).max


# builders --------------------------------------------------------------------------------
def split(b: Net, x: str, sizes: list[int], opset: int, axis: int = 1,
          form: str = "sizes") -> list[str]:
    """Split in the form the opset takes: attribute (< 13), input (>= 13), num_outputs (18)."""
    name = b._name("split")
    outs = [f"{name}_{k}" for k in range(len(sizes))]
    inputs, attrs = [x], {"axis": axis}
    if form == "num_outputs":
        attrs["num_outputs"] = len(sizes)
    elif opset < 13:
        attrs["split"] = sizes
    else:
        b.weights[f"{name}.sizes"] = np.array(sizes, dtype=np.int64)
        inputs.append(f"{name}.sizes")
    b.nodes.append(helper.make_node("Split", inputs, outs, name=name, **attrs))
    for out, n in zip(outs, sizes, strict=True):
        shape = list(b.shapes[x])
        shape[axis] = n
        b.shapes[out] = tuple(shape)
    return outs


def slice_(b: Net, x: str, starts: list[int], ends: list[int], axes: list[int],
           steps: list[int] | None = None, opset: int = 17) -> str:
    """Slice with starts/ends/axes/steps as constant inputs (attributes before opset 10)."""
    name = b._name("slice")
    if opset < 10:
        b.nodes.append(helper.make_node("Slice", [x], [name], name=name, starts=starts,
                                        ends=ends, axes=axes))
    else:
        inputs = [x]
        for part, values in (("starts", starts), ("ends", ends), ("axes", axes),
                             ("steps", steps)):
            if values is not None:
                b.weights[f"{name}.{part}"] = np.array(values, dtype=np.int64)
                inputs.append(f"{name}.{part}")
        b.nodes.append(helper.make_node("Slice", inputs, [name], name=name))
    shape = list(b.shapes[x])
    for i, axis in enumerate(axes):
        step = steps[i] if steps else 1
        shape[axis] = len(range(*slice(starts[i], ends[i], step).indices(shape[axis])))
    b.shapes[name] = tuple(shape)
    return name


def c2f(opset: int = 17, form: str = "sizes") -> onnx.ModelProto:
    """The block in the module docstring, duplicates planted."""
    b = Net((None, 3, 8, 8))
    c = b.conv(b.x, 8, k=1)
    a, s = split(b, b.relu(c), [4, 4], opset, form=form)
    inner = b.conv(s, 4)
    outer = b.conv(b.relu(inner), 4)
    m = b.add(outer, s)
    y = b.conv(b.concat([a, s, m]), 5, k=1)
    b.scale_filter(c, src=0, dst=2, factor=1.0)
    b.scale_filter(c, src=5, dst=7, factor=1.0)
    b.scale_filter(outer, src=1, dst=3, factor=1.0)
    b.scale_filter(inner, src=0, dst=2, factor=1.0)
    return b.build(y, opset=opset)


def rows(model: onnx.ModelProto, name: str) -> int:
    """Output channels (rows) of a Conv weight initializer by its original name."""
    init = {t.name: t for t in model.graph.initializer}
    return int(init[name].dims[0])


def split_sizes(model: onnx.ModelProto) -> list[list[int]]:
    """Sizes each Split writes, whichever form holds them."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Split":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 1 and node.input[1]:
            out.append([int(v) for v in init[node.input[1]]])
        else:
            out.append(list(attrs.get("split", [])) or [f"{attrs.get('num_outputs')} outputs"])
    return out


def reasons(model: onnx.ModelProto) -> list[str]:
    return [r["frozen"] for r in analyze(model)[1] if r["frozen"]]


# C2f ------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_c2f_block_loses_a_duplicate_in_each_piece_and_rewrites_the_split(opset):
    model = c2f(opset)
    result = slim_exact(model)
    out = result.model
    assert rows(out, "conv1.w") == 6
    assert split_sizes(out) == [[3, 3]]
    assert rows(out, "conv4.w") == 3 and rows(out, "conv6.w") == 3
    assert [r for r in reasons(model) if "graph output" not in r] == []


def test_split_with_num_outputs_becomes_explicit_sizes():
    model = c2f(18, form="num_outputs")
    result = slim_exact(model)
    split_node = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert "num_outputs" not in {a.name for a in split_node.attribute}
    assert split_sizes(result.model) == [[3, 3]]


def test_uneven_num_outputs_split_keeps_its_smaller_last_piece():
    b = Net((None, 3, 6, 6))
    c = b.conv(b.x, 7, k=1)
    p, q = split(b, b.relu(c), [4, 3], 18, form="num_outputs")
    y = b.conv(b.concat([b.conv(p, 3), b.conv(q, 3)]), 2)
    b.scale_filter(c, src=4, dst=6, factor=1.0)  # both in the last piece
    result = slim_exact(b.build(y, opset=18))
    assert rows(result.model, "conv1.w") == 6
    assert split_sizes(result.model) == [[4, 2]]


def test_calibrated_c2f_meets_its_budget_and_validates():
    model = c2f(17)
    data = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result = slim(model, data=data, ratio=0.3, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    rep = result.report
    assert np.isfinite(rep.max_rel_error) and rep.exact_max_rel_error <= 1e-5
    assert rep.after.flops <= 0.7 * rep.before.flops * 1.02
    [sizes] = split_sizes(result.model)
    assert sum(sizes) == rows(result.model, "conv1.w")


# Slice on channels ----------------------------------------------------------------------
@pytest.mark.parametrize("opset", [9, 13, 17])
def test_slices_of_channels_with_negative_and_huge_ends_are_rewritten(opset):
    b = Net((None, 3, 6, 6))
    c = b.conv(b.x, 8, k=1)
    h = b.relu(c)
    p = slice_(b, h, [0], [-3], [1], opset=opset)  # channels 0..4
    ends = [INT64_MAX] if opset >= 10 else [8]
    q = slice_(b, h, [-3], ends, [-3], steps=[1] if opset >= 10 else None, opset=opset)
    y = b.conv(b.concat([q, p]), 4, k=1)  # the pieces in the other order
    b.scale_filter(c, src=1, dst=3, factor=1.0)
    b.scale_filter(c, src=5, dst=6, factor=3.0)
    model = b.build(y, opset=opset)
    result = slim_exact(model)
    assert rows(result.model, "conv1.w") == 6
    assert rows(result.model, f"{y}.w") == 4
    assert [r for r in reasons(model) if "graph output" not in r] == []


def test_slice_bounds_computed_from_the_shape_are_written_as_constants():
    """torch's chunk: ends = Shape(h)[1] / 2, which would not follow unequal pieces."""
    b = Net((None, 3, 6, 6))
    c = b.conv(b.x, 8, k=1)
    h = b.relu(c)
    b.weights["one"] = np.array([1], dtype=np.int64)
    b.weights["two"] = np.array([2], dtype=np.int64)
    b.weights["zero"] = np.array([0], dtype=np.int64)
    b.weights["big"] = np.array([INT64_MAX], dtype=np.int64)
    b.nodes += [helper.make_node("Shape", [h], ["hs"], name="shape"),
                helper.make_node("Gather", ["hs", "one"], ["hc"], name="gather", axis=0),
                helper.make_node("Div", ["hc", "two"], ["half"], name="div")]
    b.shapes.update({"hs": (4,), "hc": (1,), "half": (1,)})
    p, q = b._name("slice"), b._name("slice")
    b.nodes += [helper.make_node("Slice", [h, "zero", "half", "one"], [p], name=p),
                helper.make_node("Slice", [h, "half", "big", "one"], [q], name=q)]
    b.shapes[p] = b.shapes[q] = (None, 4, 6, 6)
    y = b.conv(b.concat([b.conv(p, 3), b.conv(q, 3)]), 2)
    b.scale_filter(c, src=0, dst=1, factor=1.0)  # only the first half loses one
    result = slim_exact(b.build(y))
    assert rows(result.model, "conv1.w") == 7
    assert not any(n.op_type == "Shape" for n in result.model.graph.node)


def test_bound_computed_from_channels_for_a_slice_that_would_not_follow_freezes():
    """Shape(h)[1] / 4 slices the untracked input: slimming h would change that bound."""
    b = Net((None, 3, 8, 8))
    c = b.conv(b.x, 8, k=1)
    h = b.relu(c)
    b.weights["one"] = np.array([1], dtype=np.int64)
    b.weights["four"] = np.array([4], dtype=np.int64)
    b.weights["zero"] = np.array([0], dtype=np.int64)
    b.weights["two"] = np.array([2], dtype=np.int64)
    b.nodes += [helper.make_node("Shape", [h], ["hs"], name="shape"),
                helper.make_node("Gather", ["hs", "one"], ["hc"], name="gather", axis=0),
                helper.make_node("Div", ["hc", "four"], ["rows"], name="div"),
                helper.make_node("Slice", [b.x, "zero", "rows", "two"], ["top"], name="top")]
    b.shapes.update({"hs": (4,), "hc": (1,), "rows": (1,), "top": (None, 3, 2, 8)})
    b.scale_filter(c, src=0, dst=1, factor=1.0)
    model = b.build([b.conv("top", 2), b.conv(h, 2)])
    assert any("sets the bounds of Slice node top" in r for r in reasons(model))
    assert rows(slim_exact(model).model, "conv1.w") == 8


# Slice and Split on other axes ----------------------------------------------------------
def test_focus_space_to_depth_on_the_input_slims_downstream():
    b = Net((None, 2, 8, 8))
    parts = [slice_(b, b.x, [i, j], [INT64_MAX, INT64_MAX], [2, 3], [2, 2])
             for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
    c = b.conv(b.concat(parts), 6)
    y = b.conv(b.relu(c), 3)
    b.scale_filter(c, src=2, dst=5, factor=2.0)
    result = slim_exact(b.build(y))
    assert rows(result.model, "conv6.w") == 5


def test_spatial_slice_of_a_conv_output_passes_the_channels():
    b = Net((None, 3, 8, 8))
    c = b.conv(b.x, 6)
    s = slice_(b, b.relu(c), [1, 0], [INT64_MAX, -1], [2, 3], [2, 1])
    y = b.conv(s, 3)
    b.scale_filter(c, src=0, dst=4, factor=1.0)
    result = slim_exact(b.build(y))
    assert rows(result.model, "conv1.w") == 5
    assert rows(result.model, "conv4.w") == 3


def test_split_along_height_is_a_per_channel_op():
    b = Net((None, 3, 8, 8))
    c = b.conv(b.x, 6)
    top, bottom = split(b, b.relu(c), [3, 5], 17, axis=2)
    b.scale_filter(c, src=1, dst=5, factor=0.5)
    result = slim_exact(b.build([b.conv(top, 3), b.conv(bottom, 2)]))
    assert rows(result.model, "conv1.w") == 5
    assert split_sizes(result.model) == [[3, 5]]


# joins and refinement -------------------------------------------------------------------
def test_split_of_a_residual_group_cuts_both_producers():
    b = Net((None, 3, 6, 6))
    c1, c2 = b.conv(b.x, 8, k=1), b.conv(b.x, 8, k=1)
    p, q = split(b, b.relu(b.add(c1, c2)), [3, 5], 17)
    y = b.conv(b.concat([b.conv(p, 2), b.conv(q, 2)]), 2)
    for c in (c1, c2):
        b.scale_filter(c, src=0, dst=1, factor=1.0)
        b.scale_filter(c, src=4, dst=7, factor=1.0)
    result = slim_exact(b.build(y))
    assert rows(result.model, "conv1.w") == rows(result.model, "conv2.w") == 6
    assert split_sizes(result.model) == [[2, 4]]


def _layout_lengths(model: onnx.ModelProto, tensor: str) -> list[tuple[int | None, int]]:
    groups = build_groups(Graph(normalize(model)))
    return [(s.group, s.length) for s in groups.layouts[tensor].segments]


def test_refinement_after_a_union_reaches_every_partner():
    b = Net((None, 3, 6, 6))
    c1, c2 = b.conv(b.x, 8, k=1), b.conv(b.x, 8, k=1)
    p, q = split(b, b.add(c1, c2), [5, 3], 17)
    model = b.build(b.conv(b.concat([q, p]), 2))
    first, second = _layout_lengths(model, c1), _layout_lengths(model, c2)
    assert first == second and [n for _, n in first] == [5, 3]


def test_union_of_differently_cut_groups_takes_the_common_refinement():
    b = Net((None, 3, 6, 6))
    c1, c2 = b.conv(b.x, 8, k=1), b.conv(b.x, 8, k=1)
    a1, a2 = split(b, c1, [2, 6], 17)
    b1, b2 = split(b, c2, [5, 3], 17)
    s = b.add(b.concat([a1, a2]), b.concat([b1, b2]))
    y = b.conv(b.concat([b.conv(a2, 2), b.conv(b1, 2), b.relu(s)]), 2)
    b.scale_filter(c1, src=6, dst=7, factor=1.0)
    b.scale_filter(c2, src=6, dst=7, factor=1.0)
    model = b.build(y)
    first, second = _layout_lengths(model, c1), _layout_lengths(model, c2)
    assert first == second and [n for _, n in first] == [2, 3, 3]
    result = slim_exact(model)
    assert rows(result.model, "conv1.w") == rows(result.model, "conv2.w") == 7
    assert split_sizes(result.model) == [[2, 5], [5, 2]]


def test_union_after_a_refinement_joins_one_piece():
    b = Net((None, 3, 6, 6))
    c1 = b.conv(b.x, 8, k=1)
    p, q = split(b, b.relu(c1), [4, 4], 17)
    c2 = b.conv(b.x, 4, k=1)
    y = b.conv(b.concat([b.add(q, c2), p]), 2)
    b.scale_filter(c1, src=5, dst=6, factor=1.0)
    b.scale_filter(c2, src=1, dst=2, factor=1.0)
    model = b.build(y)
    pieces = _layout_lengths(model, c1)
    assert _layout_lengths(model, c2) == pieces[1:]
    result = slim_exact(model)
    assert rows(result.model, f"{c1}.w") == 7 and rows(result.model, f"{c2}.w") == 3


def test_split_output_that_is_a_graph_output_freezes_only_its_piece():
    b = Net((None, 3, 6, 6))
    c = b.conv(b.x, 8, k=1)
    p, q = split(b, b.relu(c), [4, 4], 17)
    y = b.conv(q, 2)
    b.scale_filter(c, src=0, dst=1, factor=1.0)
    b.scale_filter(c, src=5, dst=6, factor=1.0)
    model = b.build([y, p])
    assert any("reaches graph output" in r for r in reasons(model))
    result = slim_exact(model)
    assert rows(result.model, "conv1.w") == 7
    assert split_sizes(result.model) == [[4, 3]]


# random compositions ----------------------------------------------------------------------
@st.composite
def compositions(draw):
    """conv(C) with planted duplicates, then Split / Slice / Concat / Add / Relu at random;
    every tensor left is concatenated and read by a head conv."""
    b = Net((None, 3, 5, 5), seed=draw(st.integers(0, 999)))
    width = draw(st.integers(4, 10))
    c = b.conv(b.x, width, k=1)
    for _ in range(draw(st.integers(1, 3))):
        src, dst = draw(st.lists(st.integers(0, width - 1), min_size=2, max_size=2,
                                 unique=True))
        b.scale_filter(c, src=src, dst=dst, factor=draw(st.sampled_from([1.0, 2.0])))
    pool = [b.relu(c)]
    for _ in range(draw(st.integers(1, 5))):
        x = draw(st.sampled_from(pool))
        n = b.shapes[x][1]
        op = draw(st.sampled_from(["split", "slice", "concat", "add", "relu"]))
        if op == "split" and n >= 2:
            k = draw(st.integers(2, min(3, n)))
            cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=k - 1,
                                        max_size=k - 1, unique=True)))
            sizes = [e - s for s, e in zip([0, *cuts], [*cuts, n], strict=True)]
            pool += split(b, x, sizes, 17)
        elif op == "slice" and n >= 2:
            start = draw(st.integers(0, n - 1))
            end = draw(st.integers(start + 1, n))
            end = draw(st.sampled_from([end, end - n if end < n else INT64_MAX]))
            pool.append(slice_(b, x, [start], [end], [1]))
        elif op == "concat":
            pool.append(b.concat(draw(st.lists(st.sampled_from(pool), min_size=2,
                                               max_size=3))))
        elif op == "add":
            same = [t for t in pool if b.shapes[t] == b.shapes[x]]
            pool.append(b.add(x, draw(st.sampled_from(same))))
        else:
            pool.append(b.relu(x))
    y = b.conv(b.concat(pool), 3, k=1)
    return b.build(y, opset=17)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compositions())
def test_random_split_slice_concat_add_compositions_keep_the_function(model):
    result = slim(model, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, rtol=1e-5, atol=1e-5)
    assert rows(result.model, "conv1.w") <= rows(model, "conv1.w")


def test_gather_of_channels_freezes_with_its_reason():
    b = Net((None, 3, 6, 6))
    c = b.conv(b.x, 6, k=1)
    b.weights["picked"] = np.array([0, 2], dtype=np.int64)
    g = b._name("gather")
    b.nodes.append(helper.make_node("Gather", [b.relu(c), "picked"], [g], name=g, axis=1))
    b.shapes[g] = (None, 2, 6, 6)
    b.scale_filter(c, src=0, dst=4, factor=1.0)
    model = b.build(b.conv(g, 2))
    assert any("Gather along the channel axis" in r for r in reasons(model))
    assert rows(slim_exact(model).model, "conv1.w") == 6


def test_duplicate_goes_even_when_its_first_multiple_cannot_fold_its_offset():
    """One input channel makes every filter a multiple of every other; through a padded
    Conv (no offset folds) only channel 3 = channel 2 goes, which needs channel 2 as its
    representative, not the first multiple (found by the fuzzer behind a Slice)."""
    b = Net((None, 1, 6, 6))
    c = b.conv(b.x, 6, k=1)
    p = slice_(b, c, [1], [6], [1])
    y = b.conv(p, 3)  # padded: offsets between related channels must be 0
    b.scale_filter(c, src=2, dst=3, factor=1.0)
    result = slim_exact(b.build(y))
    assert rows(result.model, "conv1.w") == 5


@pytest.mark.parametrize("opset", [11, 17])
def test_split_piece_nothing_reads_is_dead_and_goes(opset):
    """conv(8) -> Split [3, 5] -> only the first piece is read: the 5 channels of the other
    have zero fan-out, so exact mode removes them (one stays: a piece never goes empty)."""
    b = Net((None, 3, 8, 8))
    first, _ = split(b, b.relu(b.conv(b.x, 8)), [3, 5], opset)
    model = b.build(b.conv(first, 4), opset=opset)
    result = slim_exact(model)
    assert [(g["size"], g["kept"]) for g in result.report.groups[:2]] == [(3, 3), (5, 1)]
    conv = next(t for t in result.model.graph.initializer if t.name == "conv1.w")
    assert tuple(conv.dims) == (4, 3, 3, 3)


def test_channels_a_slice_never_takes_are_dead_and_go():
    b = Net((None, 3, 8, 8))
    part = slice_(b, b.relu(b.conv(b.x, 8)), [2], [6], [1])
    model = b.build(b.conv(part, 4))
    result = slim_exact(model)
    conv = next(t for t in result.model.graph.initializer if t.name == "conv1.w")
    assert conv.dims[0] == 6  # channels 0-1 and 6-7: one of each unread piece stays


@pytest.mark.parametrize("source", ["x", "r"])
@pytest.mark.parametrize("kind", ["slice", "split"])
def test_a_bound_computed_from_a_dynamic_height_stays_computed(kind, source):
    """``r[:, :, :H // 2]`` (or a Split of H into H // 2 and the rest) next to a slimmed
    group, H read off the input x or off r itself (torch's ``r.shape[2] // 2``, whose
    channels the rewrite changes): the bound reads only a height, and is no known number;
    writing it as a constant raised an internal error (exit 3)."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[1] = 2 * w1[0]
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "w1"), (rng.standard_normal((3, 8, 3, 3)).astype(np.float32), "w2"),
        (np.array(2, np.int64), "two"), (np.array([0], np.int64), "zero"),
        (np.array([2], np.int64), "h_axis"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", [source], ["s"]),
             helper.make_node("Gather", ["s", "two"], ["h"]),
             helper.make_node("Div", ["h", "two"], ["half"]),
             helper.make_node("Unsqueeze", ["half", "zero"], ["half1"])]
    if kind == "slice":
        nodes.append(helper.make_node("Slice", ["r", "zero", "half1", "h_axis"], ["top"]))
    else:
        nodes += [helper.make_node("Sub", ["h", "half"], ["rest"]),
                  helper.make_node("Unsqueeze", ["rest", "zero"], ["rest1"]),
                  helper.make_node("Concat", ["half1", "rest1"], ["sizes"], axis=0),
                  helper.make_node("Split", ["r", "sizes"], ["top", "bottom"], axis=2)]
    nodes.append(helper.make_node("Conv", ["top", "w2"], ["y"], pads=[1] * 4))
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                    ["N", 4, "H", "W"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, "H2", "W"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=10)
    result = slim(model, input_shapes={"x": (1, 4, 8, 8)}, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert rows(result.model, "w1") == 7
    for height in (6, 9):  # the bound follows the height of every input
        x = np.random.default_rng(height).standard_normal((2, 4, height, 5)).astype(np.float32)
        assert_same_function(model, result.model, feeds={"x": x})
