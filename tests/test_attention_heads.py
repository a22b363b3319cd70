"""Attention heads as channel groups: a head is a block of head_dim channels shared by Q, K
and V; exact mode removes duplicate and dead heads, calibrated mode removes whole heads.

    x ─┬─ MatMul Wq + bq ─ Reshape [B,T,H,d] ─ Transpose ─┐
       ├─ MatMul Wk + bk ─ Reshape ─ Transpose(0,2,3,1) ──┴ MatMul ─ Div ─ Add mask ─ Softmax ┐
       └─ MatMul Wv + bv ─ Reshape ─ Transpose ──────────────────────────────────── MatMul ──┘
            ─ Transpose ─ Reshape [B,T,H*d] ─ MatMul Wo + bo ─ (output)
Fused: one in-projection MatMul [D, 3*H*d] + bias, then Split into Q, K, V.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.lumping.budget import CostModel
from onnxslim_fr.testing import assert_same_function

H, D_HEAD, D_MODEL, T = 4, 4, 12, 5
HD = H * D_HEAD


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def encoder(weights: dict[str, np.ndarray], fused: bool = False, opset: int = 17,
            private: bool = False) -> onnx.ModelProto:
    """The attention block above; `weights` holds wq, wk, wv (D x H*d), bq, bk, bv, wo, bo.
    Q, K and V share one computed Reshape target (Shape -> Slice -> Concat), as dynamo
    writes it; the merge back uses a constant [0, 0, H*d]. `private`: every Reshape has
    a Concat of its own, the merge too, as TorchScript writes them."""
    n = helper.make_node
    inits = [_init("wo", weights["wo"]), _init("bo", weights["bo"]),
             _init("heads", np.array([H, D_HEAD], np.int64)),
             _init("zero", np.array([0], np.int64)), _init("two", np.array([2], np.int64)),
             _init("merged", np.array([0, 0, HD], np.int64)),
             _init("scale", np.array(np.sqrt(D_HEAD), np.float32))]
    nodes = [n("Shape", ["x"], ["sx"], name="shape"),
             n("Slice", ["sx", "zero", "two"], ["bt"], name="bt"),
             n("Concat", ["bt", "heads"], ["split_shape"], axis=0, name="split_shape")]
    if fused:
        w_in = np.concatenate([weights["wq"], weights["wk"], weights["wv"]], axis=1)
        b_in = np.concatenate([weights["bq"], weights["bk"], weights["bv"]])
        inits += [_init("w_in", w_in), _init("b_in", b_in),
                  _init("sizes", np.array([HD] * 3, np.int64))]
        nodes += [n("MatMul", ["x", "w_in"], ["proj"], name="in_proj"),
                  n("Add", ["proj", "b_in"], ["proj_b"], name="in_bias"),
                  n("Split", ["proj_b", "sizes"], ["q", "k", "v"], axis=-1, name="qkv")]
    else:
        for p in "qkv":
            inits += [_init(f"w{p}", weights[f"w{p}"]), _init(f"b{p}", weights[f"b{p}"])]
            nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"),
                      n("Add", [f"{p}0", f"b{p}"], [p], name=f"{p}_bias")]
    merged = "merged"
    if private:
        inits.append(_init("hd", np.array([HD], np.int64)))
        nodes.append(n("Concat", ["bt", "hd"], ["merged_shape"], axis=0, name="merged_shape"))
        merged = "merged_shape"
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        target = "split_shape"
        if private:
            inits.append(_init(f"heads_{p}", np.array([H, D_HEAD], np.int64)))
            nodes.append(n("Concat", ["bt", f"heads_{p}"], [f"{p}_shape"], axis=0,
                           name=f"{p}_shape"))
            target = f"{p}_shape"
        nodes += [n("Reshape", [p, target], [f"{p}4"], name=f"{p}_heads"),
                  n("Transpose", [f"{p}4"], [f"{p}t"], perm=perm, name=f"{p}_t")]
    nodes += [n("MatMul", ["qt", "kt"], ["scores"], name="scores"),
              n("Div", ["scores", "scale"], ["scaled"], name="scaled"),
              n("Add", ["scaled", "mask"], ["masked"], name="masked"),
              n("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
              n("MatMul", ["probs", "vt"], ["ctx"], name="context"),
              n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_t"),
              n("Reshape", ["ctx_t", merged], ["heads_out"], name="merge"),
              n("MatMul", ["heads_out", "wo"], ["y0"], name="out_proj"),
              n("Add", ["y0", "bo"], ["y"], name="out_bias")]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D_MODEL]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, T])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", T, D_MODEL])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {f"w{p}": rng.standard_normal((D_MODEL, HD)) / np.sqrt(D_MODEL) for p in "qkv"}
    w |= {f"b{p}": 0.1 * rng.standard_normal(HD) for p in "qkv"}
    w |= {"wo": rng.standard_normal((HD, D_MODEL)) / np.sqrt(HD),
          "bo": 0.1 * rng.standard_normal(D_MODEL)}
    return {k: v.astype(np.float32) for k, v in w.items()}


def head(h: int) -> slice:
    return slice(h * D_HEAD, (h + 1) * D_HEAD)


def plant_duplicate(w: dict[str, np.ndarray], src: int, dst: int) -> None:
    """Head `dst` computes exactly what head `src` does: same Q, K, V columns and biases."""
    for p in "qkv":
        w[f"w{p}"][:, head(dst)] = w[f"w{p}"][:, head(src)]
        w[f"b{p}"][head(dst)] = w[f"b{p}"][head(src)]


def plant_dead(w: dict[str, np.ndarray], h: int) -> None:
    """Head `h` outputs 0: its V columns and V bias are 0 (Q and K stay live)."""
    w["wv"][:, head(h)] = 0.0
    w["bv"][head(h)] = 0.0


def kept_heads(model: onnx.ModelProto, original: dict[str, np.ndarray]) -> list[int]:
    """Which original heads the slimmed model's output projection still reads."""
    wo = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "wo"))
    rows = wo.reshape(-1, D_HEAD, D_MODEL)
    blocks = original["wo"].reshape(H, D_HEAD, D_MODEL)
    return [h for h in range(H) if any(np.allclose(r, blocks[h]) for r in rows)]


def feeds(batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, 1, 1, T), np.float32)
    mask[0, ..., -2:] = -10000.0  # padding in the first sequence
    return {"x": rng.standard_normal((batch, T, D_MODEL)).astype(np.float32), "mask": mask}


def slim_checked(model: onnx.ModelProto, **kw):
    result = slim(model, latency_runs=0, **kw)
    onnx.checker.check_model(result.model, full_check=True)
    return result


@pytest.mark.parametrize("fused", [False, True], ids=["separate_qkv", "fused_split"])
def test_heads_are_one_group_of_whole_heads(fused):
    groups = build_groups(Graph(normalize(encoder(random_weights(), fused))))
    [heads] = [g for g in groups.groups.values() if g.unit > 1]
    assert (heads.size, heads.unit, heads.frozen) == (H, D_HEAD, None)
    assert heads.read_points == ["heads_out"]


@pytest.mark.parametrize("private", [False, True], ids=["shared_target", "private_targets"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate_qkv", "fused_split"])
def test_duplicate_and_dead_heads_are_removed_exactly(fused, private):
    w = random_weights()
    plant_duplicate(w, src=0, dst=2)
    plant_dead(w, 3)
    model = encoder(w, fused, private=private)
    result = slim_checked(model)
    wo = numpy_helper.to_array(next(i for i in result.model.graph.initializer
                                    if i.name == "wo"))
    assert wo.shape == (2 * D_HEAD, D_MODEL)  # heads 2 (duplicate) and 3 (dead) removed
    np.testing.assert_allclose(wo[:D_HEAD], w["wo"][head(0)] + w["wo"][head(2)], rtol=1e-6)
    np.testing.assert_allclose(wo[D_HEAD:], w["wo"][head(1)], rtol=1e-6)
    for batch in (1, 3):
        assert_same_function(model, result.model, feeds=feeds(batch), rtol=1e-5, atol=1e-5)
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
              for o in result.model.graph.value_info}
    assert shapes["q4"][2:] == [2, D_HEAD]  # the Reshape's H follows the kept heads
    assert shapes["heads_out"][-1] == 2 * D_HEAD


def test_live_distinct_heads_stay_exactly():
    model = encoder(random_weights())
    result = slim_checked(model)
    assert kept_heads(result.model, random_weights()) == list(range(H))


def test_equal_v_with_different_q_is_not_a_duplicate():
    w = random_weights()
    w["wv"][:, head(1)] = w["wv"][:, head(0)]
    w["bv"][head(1)] = w["bv"][head(0)]
    result = slim_checked(encoder(w))
    assert kept_heads(result.model, w) == list(range(H))


@pytest.mark.parametrize("private", [False, True], ids=["shared_target", "private_targets"])
def test_calibrated_ratio_removes_whole_heads_within_budget(private):
    """Private targets sit outside the region a sensitivity probe runs: the Reshapes get
    targets of their own there."""
    w = random_weights(3)
    model = encoder(w, private=private)
    rng = np.random.default_rng(5)
    data = {"x": rng.standard_normal((96, T, D_MODEL)).astype(np.float32),
            "mask": np.zeros((96, 1, 1, T), np.float32)}
    result = slim_checked(model, data=data, ratio=0.4)
    wo = numpy_helper.to_array(next(i for i in result.model.graph.initializer
                                    if i.name == "wo"))
    assert wo.shape[0] % D_HEAD == 0 and wo.shape[0] < HD  # whole heads went
    report = result.report
    assert report.after.flops <= 0.6 * report.before.flops * 1.02
    outs = result.model.graph.value_info
    q4 = next(o for o in outs if o.name == "q4").type.tensor_type.shape.dim
    assert q4[2].dim_value == wo.shape[0] // D_HEAD


def test_attention_matmuls_are_counted_in_the_cost():
    model = normalize(encoder(random_weights()))
    groups = build_groups(Graph(model))
    cost = CostModel(Graph(model), groups, feeds={"x": np.zeros((1, T, D_MODEL), np.float32),
                                                   "mask": np.zeros((1, 1, 1, T), np.float32)})
    [heads] = [g for g in groups.groups.values() if g.unit > 1]
    linear = 4 * T * D_MODEL * HD  # Q, K, V and output projections
    attention = 2 * H * T * T * D_HEAD  # QKᵀ and P·V
    assert cost.total() == pytest.approx(linear + attention)
    one_head_less = linear * (H - 1) / H + attention * (H - 1) / H
    assert cost.total({heads.id: H - 1}) == pytest.approx(one_head_less)


def test_fused_attention_op_freezes_with_a_reason():
    """onnxruntime's transformer optimizer writes com.microsoft.Attention: not followed."""
    w = random_weights()
    n = helper.make_node
    w_in = np.concatenate([w["wq"], w["wk"], w["wv"]], axis=1)
    b_in = np.concatenate([w["bq"], w["bk"], w["bv"]])
    nodes = [n("MatMul", ["x", "w0"], ["h"], name="pre"),
             n("Attention", ["h", "w_in", "b_in"], ["a"], domain="com.microsoft", num_heads=H,
               name="fused"),
             n("MatMul", ["a", "wo"], ["y"], name="out_proj")]
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D_MODEL])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D_MODEL])],
        [_init("w0", np.eye(D_MODEL, dtype=np.float32)), _init("w_in", w_in),
         _init("b_in", b_in), _init("wo", w["wo"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    groups = build_groups(Graph(normalize(model)))
    reasons = [g.frozen for g in groups.groups.values()]
    assert any("com.microsoft::Attention" in (r or "") for r in reasons)


def test_heads_merged_with_the_batch_freeze_with_a_precise_reason():
    """nn.MultiheadAttention's [T, B*H, d] layout: heads merge with a symbolic batch."""
    n = helper.make_node
    rng = np.random.default_rng(0)
    nodes = [n("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             n("Reshape", ["q", "shape"], ["q3"], name="q_heads"),
             n("MatMul", ["q3", "wd"], ["y"], name="after")]
    graph = helper.make_graph(
        nodes, "tbh", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "B", D_MODEL])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("wq", rng.standard_normal((D_MODEL, HD)).astype(np.float32)),
         _init("shape", np.array([T, -1, D_HEAD], np.int64)),
         _init("wd", rng.standard_normal((D_HEAD, 3)).astype(np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    groups = build_groups(Graph(normalize(model)))
    reasons = [g.frozen or "" for g in groups.groups.values()]
    assert any("merges attention heads with the batch axis" in r for r in reasons)
