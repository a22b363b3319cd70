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
import onnxruntime as ort
import pytest
from fuzz_encoders import TOKENS, Spec, build, width
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import calibrate, refit, rewrite, slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.lumping import head_merge
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


def calibration(samples: int = 128, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((samples, T, D_MODEL)).astype(np.float32),
            "mask": np.zeros((samples, 1, 1, T), np.float32)}


def surviving_q_heads(model: onnx.ModelProto, original: dict[str, np.ndarray]) -> list[int]:
    """Original heads whose Q columns the slimmed model still computes (Q is never
    re-fitted, only sliced)."""
    wq = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "wq"))
    cols = wq.T.reshape(-1, D_HEAD, D_MODEL)
    blocks = original["wq"].T.reshape(H, D_HEAD, D_MODEL)
    return [h for h in range(H) if any(np.allclose(c, blocks[h]) for c in cols)]


def relative_error(model: onnx.ModelProto, slimmed: onnx.ModelProto) -> float:
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(None, feeds(8, seed=9))[0] for m in (model, slimmed)]
    return float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max())


def test_calibrated_removes_a_head_that_is_a_feature_map_of_another():
    """Head 2 attends like head 0 (same Q, K) and its values are head 0's mixed by a
    d x d matrix: each of its features is a linear function of head 0's features, though
    no head is a multiple of another. Removing it and re-solving the output projection
    feature by feature (lumping/head_merge.py) keeps the function. A merge with one
    coefficient per head sees no redundancy there and removed a live head instead."""
    w = random_weights(3)
    plant_duplicate(w, src=0, dst=2)
    mixing = np.random.default_rng(7).standard_normal((D_HEAD, D_HEAD)).astype(np.float32)
    w["wv"][:, head(2)] = w["wv"][:, head(0)] @ mixing
    w["bv"][head(2)] = w["bv"][head(0)] @ mixing
    model = encoder(w)
    assert len(surviving_q_heads(slim_checked(model).model, w)) == H  # not exact lumping's
    result = slim_checked(model, data=calibration(), ratio=0.22, round_to=1)  # 1 head of 4
    kept = surviving_q_heads(result.model, w)
    assert {1, 3} <= set(kept)  # head 0 or 2 went (they share Q, so both show as kept)
    assert len(numpy_helper.to_array(next(i for i in result.model.graph.initializer
                                          if i.name == "wq")).T) == 3 * D_HEAD
    assert relative_error(model, result.model) < 1e-3


def test_calibrated_removes_the_planted_useless_head_and_keeps_outputs_close():
    """Head 1 barely reaches the output (its output-projection rows are 1e-3 of the
    others'): at a budget of one head it is the one removed, whole (Q, K and V)."""
    w = random_weights(4)
    w["wo"][head(1)] *= 1e-3
    model = encoder(w)
    result = slim_checked(model, data=calibration(), ratio=0.22, round_to=1)
    assert surviving_q_heads(result.model, w) == [0, 2, 3]
    shapes = {o.name: o.type.tensor_type.shape.dim for o in result.model.graph.value_info}
    assert shapes["q4"][2].dim_value == 3 and shapes["v4"][2].dim_value == 3
    assert relative_error(model, result.model) < 1e-2


def test_heads_compete_with_ffn_neurons_in_one_allocation():
    """Two encoder layers (computed Reshape targets, mask, decomposed LayerNorm, Erf
    GELU): layer 1's head 2 barely reaches the output. A budget of about one head's MACs
    (its Q, K, V rows, QKᵀ, P·V and output columns: 630 of 7080) is best spent on that
    head, not on FFN neurons or another layer's heads."""
    spec = Spec(layers=2, d_model=8, heads=4, head_dim=3, ffn=12, activation="GeluErf",
                norm_op=False, pre_norm=False, mask=True, reshape="computed", seed=11)
    model = build(spec, [([], []), ([], [])]).model
    out_w = next(t for t in model.graph.initializer if t.name == "l1.out.w")
    scaled = numpy_helper.to_array(out_w).copy()
    scaled[6:9] *= 1e-3  # head 2's rows of the output projection
    out_w.CopyFrom(numpy_helper.from_array(scaled, out_w.name))
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((128, TOKENS, 8)).astype(np.float32),
            "mask": np.zeros((128, 1, 1, TOKENS), np.float32)}
    result = slim_checked(model, data=data, ratio=0.085, round_to=1)
    widths = {n: width(result.model, n) for n in ("l0.q", "l0.ffn1", "l1.q", "l1.ffn1")}
    assert widths == {"l0.q": 12, "l0.ffn1": 12, "l1.q": 9, "l1.ffn1": 12}
    wq = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                    if t.name == "l1.q.w"))
    original = numpy_helper.to_array(next(t for t in model.graph.initializer
                                          if t.name == "l1.q.w"))
    np.testing.assert_array_equal(wq, np.delete(original, [6, 7, 8], axis=1))
    feeds8 = {k: v[:8] for k, v in data.items()}
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(None, feeds8)[0] for m in (model, result.model)]
    assert np.abs(outs[0] - outs[1]).max() < 1e-2 * np.abs(outs[0]).max()


def test_refit_of_heads_is_feature_by_feature_and_identity_when_nothing_is_removed():
    """The sequential refit re-solves a head group's output projection per feature: on an
    unslimmed model it gives back the identity over all H*d features (a per-head map could
    only scale whole heads); with head 1 removed it rebuilds head 1's features from the
    kept ones, the least squares of lumping/head_merge.py."""
    model = normalize(encoder(random_weights(3)))
    graph = Graph(model)
    groups = build_groups(graph)
    [heads] = [g for g in groups.groups.values() if g.unit > 1]
    data = calibrate.load_data(calibration(), model)
    _, plans = refit.refit(model, graph, groups, {}, data, [heads.id])
    mix, offset = plans[heads.id].features["heads_out"]
    np.testing.assert_allclose(mix, np.eye(HD), atol=1e-4)
    np.testing.assert_allclose(offset, 0.0, atol=1e-4)
    stats = calibrate.collect(model, groups, data)
    head_model = head_merge.head_models(graph, groups, stats.features)[heads.id]
    keep = np.array([0, 2, 3])
    slimmed, plans = refit.refit(model, graph, groups,
                                 {heads.id: head_model.plan(keep, True, "lfrns")}, data,
                                 [heads.id])
    mix, _ = plans[heads.id].features["heads_out"]
    assert mix.shape == (HD, 3 * D_HEAD)
    np.testing.assert_allclose(mix[head(0)], np.eye(3 * D_HEAD)[:D_HEAD], atol=1e-3)
    dropped = rewrite.apply(model, graph, groups, {heads.id: head_model.plan(keep, False, "x")})
    assert squared_error(model, slimmed) < 0.8 * squared_error(model, dropped)


def squared_error(model: onnx.ModelProto, slimmed: onnx.ModelProto) -> float:
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(None, calibration(64, seed=11))[0] for m in (model, slimmed)]
    return float(np.mean(np.square(outs[0] - outs[1])))
