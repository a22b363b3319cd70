"""The dynamo exporter's nn.MultiheadAttention (stock nn.TransformerEncoderLayer, either
batch_first or norm_first): heads are free channel groups, removed exactly as whole heads.

What torch.onnx.export(dynamo=True) writes, with a static sequence length T:

    x ─ [Transpose] ─ MatMul W_in [D, 3D] + b ─ Reshape [T, -1, 3, D] ─ Unsqueeze 0
      ─ Transpose(3,1,2,0,4) ─ Squeeze -2 ─ Gather 0 / 1 / 2 ─┐
    each: Reshape [T, -1, d] ─ Transpose(1,0,2) ─ Reshape [-1, H, T, d]        (heads split)
    K only: Shape ─ Slice ─ Concat [-1, T, d] ─ Reshape ─ Transpose(0,2,1)
            ─ Reshape [B, H, d, T] (target Concat of the Shape's slices)        (Kᵀ)
    Mul(Q, √scale), Mul(Kᵀ, √scale) ─ MatMul ─ Softmax ─ MatMul V ─ Transpose(2,0,1,3)
      ─ Reshape [-1, D] ─ Gemm Wo ─ Reshape [T, -1, D] ─ [Transpose] ─ MatMul head

With a dynamic T every target is computed from Shape (``Concat(T, B*4, [8])``); those
freeze with a reason that says so.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.testing import assert_same_function

H, DH, T = 4, 3, 5
D = H * DH
BIG = 9223372036854775807


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _weights(seed: int = 0, duplicate: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Random weights; `duplicate` (src, dst) makes head dst's Q, K, V rows head src's."""
    rng = np.random.default_rng(seed)
    w = {"w_in": rng.standard_normal((D, 3 * D)), "b_in": rng.standard_normal(3 * D),
         "wo": rng.standard_normal((D, D)), "bo": rng.standard_normal(D),
         "w_head": rng.standard_normal((D, 2))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    return w if duplicate is None else _weights_with(w, *duplicate)


def _k_transposed(k4: str) -> tuple[list[onnx.NodeProto], str]:
    """Kᵀ as dynamo writes it: heads merged with the batch, transposed, split back."""
    n = helper.make_node
    return [n("Shape", [k4], ["ks"], name="k_shape"),
            n("Slice", ["ks", "m1", "big"], ["k_last"], name="k_last"),
            n("Slice", ["ks", "m2", "m1"], ["k_prev"], name="k_prev"),
            n("Slice", ["ks", "small", "m2"], ["k_lead"], name="k_lead"),
            n("Concat", ["m1", "k_prev", "k_last"], ["k_flat_shape"], axis=0, name="k_fs"),
            n("Reshape", [k4, "k_flat_shape"], ["k3"], name="k_merge"),
            n("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1], name="kt_swap"),
            n("Concat", ["k_lead", "k_last", "k_prev"], ["k_back_shape"], axis=0,
              name="k_bs"),
            n("Reshape", ["k3t", "k_back_shape"], ["kt"], name="k_back")], "kt"


def _computed_targets() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The Reshape targets of a dynamic T: Concat of T (read by Shape) and literals."""
    n = helper.make_node
    lits = {"l_m1": -1, "l_3": 3, "l_d": D, "l_dh": DH, "l_h": H}
    nodes = [n("Shape", ["xt"], ["t_dim"], start=0, end=1, name="t_dim")]
    for name, parts in (("s_parts", ["t_dim", "l_m1", "l_3", "l_d"]),
                        ("s_bh", ["t_dim", "l_m1", "l_dh"]),
                        ("s_heads", ["l_m1", "l_h", "t_dim", "l_dh"]),
                        ("s_seq", ["t_dim", "l_m1", "l_d"])):
        nodes.append(n("Concat", parts, [name], axis=0, name=name))
    return nodes, [_c(k, np.array([v], np.int64)) for k, v in lits.items()]


def mha(w: dict[str, np.ndarray], batch_first: bool = True, static_t: bool = True
        ) -> onnx.ModelProto:
    """The dynamo export above, batch dynamic; T static unless `static_t` is False."""
    n = helper.make_node
    nodes = [n("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_seq")] if batch_first \
        else [n("Identity", ["x"], ["xt"], name="to_seq")]
    nodes += [n("MatMul", ["xt", "w_in"], ["p"], name="in_proj"),
              n("Add", ["p", "b_in"], ["pb"], name="in_bias"),
              n("Reshape", ["pb", "s_parts"], ["p4"], allowzero=1, name="parts"),
              n("Unsqueeze", ["p4", "zero"], ["p5"], name="unsq"),
              n("Transpose", ["p5"], ["p5t"], perm=[3, 1, 2, 0, 4], name="parts_t"),
              n("Squeeze", ["p5t", "m2"], ["p3"], name="sq")]
    for i, part in enumerate("qkv"):
        nodes += [n("Gather", ["p3", f"i{i}"], [f"{part}0"], axis=0, name=f"select_{part}"),
                  n("Reshape", [f"{part}0", "s_bh"], [f"{part}1"], allowzero=1,
                    name=f"{part}_bh"),
                  n("Transpose", [f"{part}1"], [f"{part}2"], perm=[1, 0, 2], name=f"{part}_t"),
                  n("Reshape", [f"{part}2", "s_heads"], [f"{part}4"], allowzero=1,
                    name=f"{part}_heads")]
    k_nodes, kt = _k_transposed("k4")
    nodes += k_nodes
    nodes += [n("Mul", ["q4", "sqrt_scale"], ["qs"], name="q_scale"),
              n("Mul", [kt, "sqrt_scale"], ["ks_"], name="k_scale"),
              n("MatMul", ["qs", "ks_"], ["scores"], name="qk"),
              n("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
              n("MatMul", ["probs", "v4"], ["ctx"], name="pv"),
              n("Transpose", ["ctx"], ["ctx_t"], perm=[2, 0, 1, 3], name="ctx_t"),
              n("Reshape", ["ctx_t", "s_flat"], ["ctx2"], allowzero=1, name="ctx_flat"),
              n("Gemm", ["ctx2", "wo_t", "bo"], ["o2"], transB=1, name="out_proj"),
              n("Reshape", ["o2", "s_seq"], ["o3"], allowzero=1, name="o_seq")]
    nodes += [n("Transpose", ["o3"], ["o"], perm=[1, 0, 2], name="to_batch")] if batch_first \
        else [n("Identity", ["o3"], ["o"], name="to_batch")]
    nodes += [n("MatMul", ["o", "w_head"], ["y"], name="head")]
    inits = [_c("w_in", w["w_in"]), _c("b_in", w["b_in"]), _c("wo_t", w["wo"].T.copy()),
             _c("bo", w["bo"]), _c("w_head", w["w_head"]),
             _c("s_parts", np.array([T, -1, 3, D], np.int64)),
             _c("s_bh", np.array([T, -1, DH], np.int64)),
             _c("s_heads", np.array([-1, H, T, DH], np.int64)),
             _c("s_flat", np.array([-1, D], np.int64)),
             _c("s_seq", np.array([T, -1, D], np.int64)),
             _c("zero", np.array([0], np.int64)), _c("m1", np.array([-1], np.int64)),
             _c("m2", np.array([-2], np.int64)), _c("big", np.array([BIG], np.int64)),
             _c("small", np.array([-BIG - 1], np.int64)),
             _c("sqrt_scale", np.array([DH ** -0.25], np.float32)),
             *(_c(f"i{i}", np.array(i, np.int64)) for i in range(3))]
    if not static_t:
        computed, literals = _computed_targets()
        nodes[1:1] = computed
        inits = [i for i in inits if i.name not in {c.output[0] for c in computed}] + literals
    t = T if static_t else "T"
    shape = ["B", t, D] if batch_first else [t, "B", D]
    graph = helper.make_graph(
        nodes, "dynamo_mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:2], 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _feeds(batch_first: bool, batch: int = 3) -> dict[str, np.ndarray]:
    shape = (batch, T, D) if batch_first else (T, batch, D)
    return {"x": np.random.default_rng(7).standard_normal(shape).astype(np.float32)}


def _head_groups(model: onnx.ModelProto):
    groups = build_groups(Graph(normalize(model)))
    return [g for g in groups.groups.values() if g.unit == DH]


@pytest.mark.parametrize("batch_first", [True, False])
def test_heads_of_the_dynamo_export_are_one_free_group(batch_first):
    """Q, K (through the merged-batch Kᵀ) and V join one group of H whole heads."""
    heads = _head_groups(mha(_weights(), batch_first))
    assert len(heads) == 1
    assert heads[0].frozen is None and heads[0].size == H


@pytest.mark.parametrize("batch_first", [True, False])
def test_duplicate_head_is_removed_exactly(batch_first):
    model = mha(_weights(duplicate=(0, 2)), batch_first)
    result = slim(model, latency_runs=0)
    w_in = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
                if t.name.startswith("w_in"))
    assert w_in.shape == (D, 3 * (D - DH))  # one whole head fewer in Q, K and V
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_function(model, result.model, feeds=_feeds(batch_first), rtol=1e-5, atol=1e-5)
    assert_same_function(model, result.model, feeds=_feeds(batch_first, batch=1), rtol=1e-5,
                         atol=1e-5)


def test_distinct_heads_stay():
    result = slim(mha(_weights()), latency_runs=0)
    assert result.report.after.params == result.report.before.params


def test_kt_chain_with_a_second_reader_freezes():
    """A tensor inside the merged-batch chain read elsewhere would see the old head count."""
    model = mha(_weights())
    model.graph.output.append(helper.make_tensor_value_info("k3t", TensorProto.FLOAT,
                                                            [None, DH, T]))
    heads = _head_groups(model)
    assert heads and all(g.frozen for g in heads)


def test_report_counts_heads_kept_of_a_packed_in_projection():
    """Three heads copy head 0: one head of DH channels is left in each of Q, K and V. The
    row reads 4 -> 1 heads (not the 3*DH features the packed producer writes, per head)."""
    w = _weights()
    for dst in (1, 2, 3):
        w = _weights_with(w, 0, dst)
    result = slim(mha(w), latency_runs=0)
    rows = [g for g in result.report.groups if g["unit"] == DH]
    assert [(g["size"], g["kept"]) for g in rows] == [(H, 1)]
    assert f"heads of {DH} channels" in result.report.render()
    assert result.report.after.channels == result.report.before.channels - 3 * 3 * DH
    assert_same_function(mha(w), result.model, feeds=_feeds(True), rtol=1e-5, atol=1e-5)


def _weights_with(w: dict[str, np.ndarray], src: int, dst: int) -> dict[str, np.ndarray]:
    w = {k: v.copy() for k, v in w.items()}
    for part in range(3):
        a, b = part * D + src * DH, part * D + dst * DH
        w["w_in"][:, b:b + DH] = w["w_in"][:, a:a + DH]
        w["b_in"][b:b + DH] = w["b_in"][a:a + DH]
    return w


def test_dynamic_sequence_length_freezes_with_a_reason_and_keeps_the_function():
    """Targets computed from a dynamic T cannot be replaced by constants: heads stay, and
    the model slims (the FFN-free block has nothing else to remove) to the same function."""
    model = mha(_weights(duplicate=(0, 2)), static_t=False)
    groups = build_groups(Graph(normalize(model)))
    qkv = [g for g in groups.groups.values() if any(m.node == "in_proj" for m in g.members)]
    assert qkv and all("dynamic sequence length" in (g.frozen or "") for g in qkv)
    result = slim(model, latency_runs=0)
    assert result.report.after.params == result.report.before.params
    assert_same_function(model, result.model, feeds=_feeds(True), rtol=1e-5, atol=1e-5)
