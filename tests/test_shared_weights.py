"""Shared weights: one initializer read by several nodes is slimmed once, the same way.

    x[:, t] ─ MatMul(W) ─ Add(b) ─ Relu ─┐   t = 0..3, W and b shared by the four steps
                                         ├─ Sum (or Concat on channels) ─ MatMul ─ y
    plant: column 5 of W (and b[5]) = column 1  =>  W [6, 8] -> [6, 7], stored once

Producers sharing a weight write one group; consumers folding a plan into one weight have
their read points tied (one plan for all). The rewrite gives a reader a private copy only
when its value would differ, so no plan can write a wrong model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import slim_exact
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import analyze, slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.rewrite import RewriteContext, _resolve_edits
from onnxslim_fr.testing import assert_same_function

STEPS, FEATURES, HIDDEN = 4, 6, 8


def time_distributed(join: str = "sum", layers: int = 1, seed: int = 0) -> onnx.ModelProto:
    """The module docstring's model; `layers=2` stacks a second shared Dense (W2) whose four
    MatMuls read four different tensors of one group (tied read points)."""
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {"axis": np.array([1], np.int64)}
    nodes = []
    widths = [FEATURES] + [HIDDEN] * layers
    for k in range(layers):
        w = rng.standard_normal((widths[k], widths[k + 1])).astype(np.float32)
        bias = (0.1 * rng.standard_normal(widths[k + 1])).astype(np.float32)
        if k == 0:
            w[:, 5], bias[5] = w[:, 1], bias[1]
        inits[f"W{k}"], inits[f"b{k}"] = w, bias
    outs = []
    for t in range(STEPS):
        inits[f"s{t}"], inits[f"e{t}"] = np.array([t], np.int64), np.array([t + 1], np.int64)
        nodes.append(helper.make_node("Slice", ["x", f"s{t}", f"e{t}", "axis"], [f"x{t}"]))
        h = f"x{t}"
        for k in range(layers):
            nodes += [helper.make_node("MatMul", [h, f"W{k}"], [f"m{k}_{t}"]),
                      helper.make_node("Add", [f"m{k}_{t}", f"b{k}"], [f"a{k}_{t}"]),
                      helper.make_node("Relu", [f"a{k}_{t}"], [f"h{k}_{t}"])]
            h = f"h{k}_{t}"
        outs.append(h)
    joined = "joined"
    if join == "sum":
        joined = outs[0]
        for t, h in enumerate(outs[1:], 1):
            nodes.append(helper.make_node("Add", [joined, h], [f"sum{t}"]))
            joined = f"sum{t}"
        width = HIDDEN
    else:
        nodes.append(helper.make_node("Concat", outs, [joined], axis=2))
        width = HIDDEN * STEPS
    inits["Wo"] = rng.standard_normal((width, 3)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", [joined, "Wo"], ["y"]))
    graph = helper.make_graph(
        nodes, "steps", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       [None, STEPS, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def copies(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if "__slim_copy" in t.name]


def calibration(seed: int = 1, n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, STEPS, FEATURES)).astype(np.float32)}


@pytest.mark.parametrize("join", ["sum", "concat"])
def test_weight_shared_by_four_time_steps_loses_its_duplicate_column_once(join):
    model = time_distributed(join)
    result = slim_exact(model)
    out = shapes(result.model)
    assert out["W0"] == (FEATURES, HIDDEN - 1) and out["b0"] == (HIDDEN - 1,)
    assert out["Wo"] == ((HIDDEN - 1) * (1 if join == "sum" else STEPS), 3)
    assert copies(result.model) == []
    assert not any(r["frozen"] and "shared" in r["frozen"] for r in result.report.groups)


@pytest.mark.parametrize("join", ["sum", "concat"])
def test_calibrated_run_on_a_shared_weight_stores_it_once(join):
    model = time_distributed(join)
    result = slim(model, data=calibration(), ratio=0.3, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    assert np.isfinite(result.report.max_rel_error)
    assert result.report.after.flops < result.report.before.flops
    assert copies(result.model) == []
    assert [t.name for t in result.model.graph.initializer].count("W0") == 1


def test_consumers_of_one_weight_read_tied_points_with_one_plan():
    model = time_distributed("sum", layers=2)
    groups = build_groups(Graph(normalize(model)))
    tied = [t for g in groups.groups.values() for t in g.ties]
    assert tied and len(tied[0]) == STEPS
    result = slim_exact(model)
    assert shapes(result.model)["W1"] == (HIDDEN - 1, HIDDEN)  # rows folded once for all
    assert copies(result.model) == []
    calibrated = slim(model, data=calibration(), ratio=0.3, latency_runs=0)
    onnx.checker.check_model(calibrated.model, full_check=True)
    assert copies(calibrated.model) == []


def test_weight_read_by_tracked_and_untracked_inputs_freezes_with_the_reason():
    b = helper
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    w[:, 3] = w[:, 0]
    nodes = [b.make_node("MatMul", ["x", "W"], ["h"], name="first"),
             b.make_node("Relu", ["h"], ["r"], name="relu"),
             b.make_node("MatMul", ["r", "W"], ["y"], name="second")]
    graph = b.make_graph(nodes, "twice", [b.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                    [None, 4])],
                         [b.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                         [numpy_helper.from_array(w, "W")])
    model = b.make_model(graph, opset_imports=[b.make_opsetid("", 17)])
    model.ir_version = 10
    reasons = [r["frozen"] for r in analyze(model)[1] if r["frozen"]]
    assert any("initializer W shared with node first reads different channels" in r
               for r in reasons)
    result = slim_exact(model)
    assert shapes(result.model)["W"] == (4, 4)


def test_readers_that_would_see_different_values_get_private_copies():
    """The rewrite's safety net: a second value for a shared initializer never overwrites
    the first; the value most readers take keeps the name, the others get copies."""
    model = normalize(time_distributed("sum"))
    graph = Graph(model)
    users = graph.consumers["W0"]
    rw = RewriteContext(graph, build_groups(graph), {})
    original = graph.const("W0")
    values = [original[:, :7]] * (len(users) - 1) + [original[:, 1:]]
    for node, value in zip(users, values, strict=True):
        rw.node = node
        rw.stage("W0", value)
    _resolve_edits(rw)
    assert np.array_equal(rw.staged["W0"], original[:, :7])
    [(reader, index)] = rw.new_inputs
    assert reader == users[-1].name and index == 1
    assert np.array_equal(rw.staged[rw.new_inputs[(reader, index)]], original[:, 1:])


def test_reader_that_edits_nothing_keeps_the_original():
    model = normalize(time_distributed("sum"))
    graph = Graph(model)
    users = graph.consumers["W0"]
    rw = RewriteContext(graph, build_groups(graph), {})
    rw.node = users[0]
    rw.stage("W0", graph.const("W0")[:, :7])
    _resolve_edits(rw)
    assert "W0" not in rw.staged
    assert [node for node, _ in rw.new_inputs] == [users[0].name]


def test_matmuls_sharing_a_weight_share_one_folded_bias():
    """A calibrated merge folds an offset after every MatMul reading W1: the four equal
    offsets are stored once, not once per time step."""
    model = time_distributed("sum", layers=2)
    result = slim(model, data=calibration(), ratio=0.3, round_to=1, latency_runs=0)
    onnx.checker.check_model(result.model, full_check=True)
    adds = [n for n in result.model.graph.node if "__slim_bias" in n.name]
    stored = [t.name for t in result.model.graph.initializer if "__slim_bias" in t.name]
    w1_adds = [n for n in adds if any(f"m1_{t}" in n.output[0] for t in range(STEPS))]
    assert len(w1_adds) == STEPS  # every step still adds its offset
    assert len({n.input[1] for n in w1_adds}) == 1 and len(stored) < len(adds)


def test_a_tied_embedding_read_through_a_transpose_is_not_copied():
    """GPT-2's lm_head is MatMul(h, Transpose(wte)) beside Gather(wte, ids): folding the
    Transpose stored the embedding twice (a real GPT-2 would grow by 154 MB). The FFN
    between them still loses its dead neuron."""
    vocab, width, hidden = 300, 16, 24
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((width, hidden)).astype(np.float32)
    w1[:, 3] = 0
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (rng.standard_normal((vocab, width)).astype(np.float32), "wte"), (w1, "w1"),
        (rng.standard_normal((hidden, width)).astype(np.float32), "w2"))]
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["f"]),
             helper.make_node("Transpose", ["wte"], ["head"], perm=[1, 0]),
             helper.make_node("MatMul", ["f", "head"], ["y"])]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=10)
    result = slim(model, latency_runs=0)
    sizes = sorted(int(np.prod(t.dims)) for t in result.model.graph.initializer)
    assert sizes.count(vocab * width) == 1
    assert result.report.after.params == result.report.before.params - 2 * width  # w1, w2
    assert_same_function(model, result.model, feeds={"ids": rng.integers(0, vocab, (2, 5))})
