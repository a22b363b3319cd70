"""Hugging Face attention as torch.onnx.export writes it (BERT, DistilBERT, RoBERTa with
``attn_implementation="sdpa"``, TorchScript and dynamo): heads are free and removed exactly.

    attention_mask [M, T] ─ Cast bool ─ Unsqueeze [M,1,1,T] ─ Expand(shape) ─ Where(·, 0, -big)
        shape = Where(Equal(s, -1), 1, s), s = Concat(Shape(x)[0], -1, T, T)   (torch expand)
    x ─ MatMul Wq/Wk/Wv + b ─ Reshape [B,T,H,d] ─ Transpose ─ QKᵀ·scale ─ Add mask ─ Softmax
      ─ Where(IsNaN(P), 0, P)  (a fully masked row) ─ MatMul V ─ Transpose
      ─ Reshape Concat(Shape(x)[0], Shape(x)[1], -1) ─ MatMul Wo + bo

The Expand's shape is computed, so shape inference leaves the mask [?, ?, ?, ?]; the
evaluated shape ([B, 1, T, T]) tells it is the same for every head. The mask's batch
symbol is not x's (M), so after the mask Add the batch is a fresh symbol and the merge
back ``[B', T, H, d] -> [B, T, -1]`` is told only by its reader: Wo has H*d rows.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxslim_fr import slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.shape_values import value_of
from onnxslim_fr.testing import assert_same_function

H, DH, T, D = 4, 3, 5, 8
HD = H * DH


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _weights(seed: int = 0, duplicate: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {f"w{p}": rng.standard_normal((D, HD)) for p in "qkv"}
    w |= {f"b{p}": rng.standard_normal(HD) for p in "qkv"}
    w |= {"wo": rng.standard_normal((HD, D)), "bo": rng.standard_normal(D)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    if duplicate is not None:
        src, dst = (slice(h * DH, (h + 1) * DH) for h in duplicate)
        for p in "qkv":
            w[f"w{p}"][:, dst], w[f"b{p}"][dst] = w[f"w{p}"][:, src], w[f"b{p}"][src]
    return w


def _mask_nodes() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The additive mask of the diagram, with torch's expand target."""
    n = helper.make_node
    nodes = [n("Cast", ["attention_mask"], ["mb"], to=TensorProto.BOOL, name="m_bool"),
             n("Unsqueeze", ["mb", "ax12"], ["m4"], name="m_unsq"),
             n("Shape", ["x"], ["sx"], name="m_shape"),
             n("Gather", ["sx", "i0"], ["b0"], axis=0, name="m_b"),
             n("Unsqueeze", ["b0", "ax0"], ["b1"], name="m_b1"),
             n("Concat", ["b1", "m1", "t1", "t1"], ["s"], axis=0, name="m_target"),
             n("Reshape", ["s", "m1"], ["s1"], name="m_flat"),
             n("Shape", ["s1"], ["s_len"], name="m_len"),
             n("ConstantOfShape", ["s_len"], ["ones"], name="m_ones",
               value=numpy_helper.from_array(np.array([1], np.int64))),
             n("Mul", ["ones", "neg1"], ["negs"], name="m_negs"),
             n("Equal", ["s1", "negs"], ["is_neg"], name="m_eq"),
             n("Where", ["is_neg", "ones", "s1"], ["shape"], name="m_where_shape"),
             n("Expand", ["m4", "shape"], ["me"], name="m_expand"),
             n("Where", ["me", "zero_f", "big_neg"], ["bias"], name="m_bias")]
    inits = [_c("ax12", np.array([1, 2], np.int64)), _c("ax0", np.array([0], np.int64)),
             _c("i0", np.array(0, np.int64)), _c("m1", np.array([-1], np.int64)),
             _c("t1", np.array([T], np.int64)), _c("neg1", np.array(-1, np.int64)),
             _c("zero_f", np.array(0.0, np.float32)),
             _c("big_neg", np.array(-3.4e38, np.float32))]
    return nodes, inits


def _scaled_attention(q: str, k_t: str, v: str, mask: str) -> list[onnx.NodeProto]:
    """Both exporters' attention core: q and kᵀ each scaled by DH^-1/4, the mask added,
    softmax with the NaN guard of a fully masked row, times v, heads moved back (ctx_t)."""
    n = helper.make_node
    return [n("Mul", [q, "sqrt_scale"], ["qs"], name="q_scale"),
            n("Mul", [k_t, "sqrt_scale"], ["k_scaled"], name="k_scale"),
            n("MatMul", ["qs", "k_scaled"], ["scores"], name="qk"),
            n("Add", ["scores", mask], ["masked"], name="mask_add"),
            n("Softmax", ["masked"], ["p0"], axis=-1, name="softmax"),
            n("IsNaN", ["p0"], ["nan"], name="is_nan"),
            n("Where", ["nan", "zero_f", "p0"], ["probs"], name="nan_guard"),
            n("MatMul", ["probs", v], ["ctx"], name="pv"),
            n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_t")]


def hf_encoder(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    n = helper.make_node
    nodes, inits = _mask_nodes()
    inits += [_c(k, v) for k, v in w.items()]
    inits += [_c("split", np.array([0, 0, H, DH], np.int64)),
              _c("ax0_1", np.array([0], np.int64)), _c("i1", np.array(1, np.int64)),
              _c("sqrt_scale", np.array(DH ** -0.25, np.float32))]
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"),
                  n("Add", [f"{p}0", f"b{p}"], [f"{p}1"], name=f"{p}_bias"),
                  n("Reshape", [f"{p}1", "split"], [f"{p}4"], name=f"{p}_heads"),
                  n("Transpose", [f"{p}4"], [f"{p}t"], perm=perm, name=f"{p}_t")]
    nodes += _scaled_attention("qt", "kt", "vt", "bias")
    nodes += [n("Gather", ["sx", "i1"], ["t0"], axis=0, name="t_dim"),
              n("Unsqueeze", ["t0", "ax0_1"], ["t_1"], name="t_1"),
              n("Concat", ["b1", "t_1", "m1"], ["merged"], axis=0, name="merged"),
              n("Reshape", ["ctx_t", "merged"], ["heads_out"], name="merge"),
              n("MatMul", ["heads_out", "wo"], ["y0"], name="out_proj"),
              n("Add", ["y0", "bo"], ["y"], name="out_bias")]
    graph = helper.make_graph(
        nodes, "hf_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["M", T])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", T, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    mask = np.ones((batch, T), np.int64)
    mask[0, -2:] = 0  # padding in the first sequence
    return {"x": rng.standard_normal((batch, T, D)).astype(np.float32),
            "attention_mask": mask}


def test_torch_expand_target_evaluates_to_one_on_the_head_axis():
    """Where(Equal(s, -1), 1, s): a dimension symbol is never -1, the literal -1 is."""
    graph = Graph(normalize(hf_encoder(_weights())))
    assert value_of("shape", graph) == ["B", 1, T, T]
    assert graph.symbolic_shape("bias")[1:] == (1, T, T)


def test_heads_behind_an_hf_mask_and_nan_guard_are_one_free_group():
    groups = build_groups(Graph(normalize(hf_encoder(_weights()))))
    heads = [g for g in groups.groups.values() if g.unit == DH]
    assert len(heads) == 1
    assert heads[0].frozen is None and heads[0].size == H
    assert {m.node for m in heads[0].members} >= {"q_proj", "k_proj", "v_proj"}


def test_duplicate_head_is_removed_exactly_with_padding():
    model = hf_encoder(_weights(duplicate=(0, 2)))
    result = slim(model, latency_runs=0)
    wq = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
              if t.name.startswith("wq"))
    assert wq.shape == (D, HD - DH)
    onnx.checker.check_model(result.model, full_check=True)
    for batch in (3, 1):
        assert_same_function(model, result.model, feeds=_feeds(batch), rtol=1e-5, atol=1e-5)


def test_mask_that_varies_along_the_heads_freezes():
    """An expand target with H on the head axis: the mask differs per head position, so
    removing a head would leave a mask of the wrong size."""
    model = hf_encoder(_weights())
    for t in model.graph.node:
        if t.name == "m_target":
            t.input[1] = "h_dim"
    model.graph.initializer.append(_c("h_dim", np.array([H], np.int64)))
    groups = build_groups(Graph(normalize(model)))
    heads = [g for g in groups.groups.values() if g.unit == DH]
    assert heads and all(g.frozen for g in heads)


# ------------------------------------------------- dynamo SDPA, dynamic sequence length

BIG = 9223372036854775807


def _shape_part(src: str, start: int, end: int, out: str) -> onnx.NodeProto:
    return helper.make_node("Shape", [src], [out], start=start, end=end, name=out)


def _kt_nodes(literal_heads: bool) -> list[onnx.NodeProto]:
    """Kᵀ as dynamo writes it inside scaled_dot_product_attention: [B,H,T,d] -> [-1,T,d]
    -> Transpose -> Concat(Shape(k)[:-2], d, T); `literal_heads`: H spelled as a literal."""
    n = helper.make_node
    lead = ["kb", "h_lit"] if literal_heads else ["k_lead"]
    return [n("Shape", ["kt4"], ["ks"], name="k_shape"),
            n("Slice", ["ks", "m1", "big"], ["k_last"], name="k_last"),
            n("Slice", ["ks", "m2", "m1"], ["k_prev"], name="k_prev"),
            n("Slice", ["ks", "small", "m2"], ["k_lead"], name="k_lead"),
            n("Slice", ["ks", "zero", "one"], ["kb"], name="k_b"),
            n("Concat", ["m1", "k_prev", "k_last"], ["k_flat"], axis=0, name="k_flat"),
            n("Reshape", ["kt4", "k_flat"], ["k3"], name="k_merge"),
            n("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1], name="k_swap"),
            n("Concat", [*lead, "k_last", "k_prev"], ["k_back"], axis=0, name="k_back_shape"),
            n("Reshape", ["k3t", "k_back"], ["kT"], name="k_back")]


def sdpa_dynamic_t(w: dict[str, np.ndarray], literal_heads: bool = False) -> onnx.ModelProto:
    """BERT through the dynamo exporter with a dynamic T: every target computed from
    Shape(x), scaled_dot_product_attention decomposed with the merged-batch Kᵀ."""
    n = helper.make_node
    nodes = [_shape_part("x", 0, 1, "b_dim"), _shape_part("x", 1, 2, "t_dim"),
             n("Concat", ["b_dim", "t_dim", "m1", "dh"], ["split"], axis=0, name="split"),
             n("Concat", ["b_dim", "t_dim", "m1"], ["merged"], axis=0, name="merged")]
    for p in "qkv":
        nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"),
                  n("Add", [f"{p}0", f"b{p}"], [f"{p}1"], name=f"{p}_bias"),
                  n("Reshape", [f"{p}1", "split"], [f"{p}4"], allowzero=1, name=f"{p}_heads"),
                  n("Transpose", [f"{p}4"], [f"{p}t4"], perm=[0, 2, 1, 3], name=f"{p}_t")]
    nodes += _kt_nodes(literal_heads)
    nodes += _scaled_attention("qt4", "kT", "vt4", "mask")
    nodes += [n("Reshape", ["ctx_t", "merged"], ["heads_out"], allowzero=1, name="merge"),
              n("MatMul", ["heads_out", "wo"], ["y0"], name="out_proj"),
              n("Add", ["y0", "bo"], ["y"], name="out_bias")]
    ints = {"m1": [-1], "m2": [-2], "big": [BIG], "small": [-BIG - 1], "zero": [0],
            "one": [1], "dh": [DH], "h_lit": [H]}
    inits = [_c(k, np.array(v, np.int64)) for k, v in ints.items()]
    inits += [_c(k, v) for k, v in w.items()]
    inits += [_c("sqrt_scale", np.array(DH ** -0.25, np.float32)),
              _c("zero_f", np.array(0.0, np.float32))]
    graph = helper.make_graph(
        nodes, "sdpa_dynamic_t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", D]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _sdpa_feeds(batch: int, t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(t)
    mask = np.zeros((batch, 1, 1, t), np.float32)
    mask[0, ..., -1] = -np.inf  # a padded key
    return {"x": rng.standard_normal((batch, t, D)).astype(np.float32), "mask": mask}


def test_dynamo_sdpa_with_a_dynamic_sequence_length_slims_heads():
    """The Kᵀ targets read T (and H) from Shape: they follow the new head count with no
    rewrite, so the heads are free and a duplicate is removed; any T still runs."""
    model = sdpa_dynamic_t(_weights(duplicate=(1, 3)))
    groups = build_groups(Graph(normalize(model)))
    heads = [g for g in groups.groups.values() if g.unit == DH]
    assert [(g.size, g.frozen) for g in heads] == [(H, None)]
    result = slim(model, latency_runs=0)
    wk = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
              if t.name.startswith("wk"))
    assert wk.shape == (D, HD - DH)
    onnx.checker.check_model(result.model, full_check=True)
    for batch, t in ((3, T), (1, 7), (2, 2)):
        assert_same_function(model, result.model, feeds=_sdpa_feeds(batch, t), rtol=1e-5,
                             atol=1e-5)


def test_dynamo_kt_target_with_a_literal_head_count_freezes():
    """``Concat(B, 4, d, T)``: the 4 would not follow, and T makes a constant impossible."""
    groups = build_groups(Graph(normalize(sdpa_dynamic_t(_weights(), literal_heads=True))))
    heads = [g for g in groups.groups.values() if g.unit == DH]
    assert heads and all(g.frozen for g in heads)
    assert any("dynamic sequence length" in g.frozen for g in heads)


# ------------------------------------------------------------ GPT-2's Conv1D and gelu_new

F = 6  # FFN width


def _gelu_new(x: str, out: str) -> list[onnx.NodeProto]:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as TorchScript writes gelu_new."""
    n = helper.make_node
    return [n("Pow", [x, "three"], [f"{out}_p"], name=f"{out}_pow"),
            n("Mul", [f"{out}_p", "c_044"], [f"{out}_m"], name=f"{out}_m"),
            n("Add", [x, f"{out}_m"], [f"{out}_a"], name=f"{out}_a"),
            n("Mul", [f"{out}_a", "c_sqrt"], [f"{out}_s"], name=f"{out}_s"),
            n("Tanh", [f"{out}_s"], [f"{out}_t"], name=f"{out}_tanh"),
            n("Add", [f"{out}_t", "one_f"], [f"{out}_1"], name=f"{out}_1"),
            n("Mul", [x, "half"], [f"{out}_h"], name=f"{out}_h"),
            n("Mul", [f"{out}_h", f"{out}_1"], [out], name=f"{out}_out")]


def conv1d_mlp(shared_target: bool = False, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """``x.view(-1, C)`` ─ Gemm ─ view(B, T, F) ─ gelu_new ─ view(-1, F) ─ Gemm ─ view(B, T, C).
    The view targets are Concat(Shape(x)[:2], width); `shared_target`: a second branch
    reads the same [B, T, F] target (dynamo shares equal computations)."""
    n = helper.make_node
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((D, F)), "b1": rng.standard_normal(F),
         "w2": rng.standard_normal((F, D)), "b2": rng.standard_normal(D),
         "w3": rng.standard_normal((D, F)), "b3": rng.standard_normal(F),
         "w4": rng.standard_normal((F, D))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    w["w1"][:, 1], w["b1"][1] = w["w1"][:, 0], w["b1"][0]  # neuron 1 copies neuron 0
    nodes = [_shape_part("x", 0, 2, "bt"),
             n("Concat", ["bt", "f_lit"], ["to_f"], axis=0, name="to_f"),
             n("Concat", ["bt", "d_lit"], ["to_d"], axis=0, name="to_d"),
             n("Reshape", ["x", "flat_d"], ["xf"], name="x_flat"),
             n("Gemm", ["xf", "w1", "b1"], ["h"], name="fc"),
             n("Reshape", ["h", "to_f"], ["h3"], name="h_back"),
             *_gelu_new("h3", "g"),
             n("Reshape", ["g", "flat_f"], ["gf"], name="g_flat"),
             n("Gemm", ["gf", "w2", "b2"], ["o"], name="proj"),
             n("Reshape", ["o", "to_d"], ["y0"], name="o_back")]
    out = "y0"
    if shared_target:
        nodes += [n("Gemm", ["xf", "w3", "b3"], ["u"], name="fc_b"),
                  n("Reshape", ["u", "to_f"], ["u3"], name="u_back"),
                  n("Relu", ["u3"], ["ur"], name="u_relu"),
                  n("MatMul", ["ur", "w4"], ["u4"], name="u_proj"),
                  n("Add", ["y0", "u4"], ["y1"], name="join")]
        out = "y1"
    nodes.append(n("Identity", [out], ["y"], name="out"))
    consts = {"f_lit": np.array([F], np.int64), "d_lit": np.array([D], np.int64),
              "flat_d": np.array([-1, D], np.int64), "flat_f": np.array([-1, F], np.int64),
              "three": np.array(3.0, np.float32), "c_044": np.array(0.044715, np.float32),
              "c_sqrt": np.array(np.sqrt(2 / np.pi), np.float32),
              "one_f": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    used = {i for node in nodes for i in node.input}
    inits = [_c(k, v) for k, v in {**consts, **w}.items() if k in used]
    graph = helper.make_graph(
        nodes, "conv1d_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            ["B", T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", T, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(3).standard_normal((3, T, D)).astype(np.float32)
    return model, {"x": x}


def _assert_one_neuron_less(model: onnx.ModelProto, slimmed: onnx.ModelProto,
                            feeds: dict[str, np.ndarray]) -> None:
    """The planted duplicate FFN neuron is gone (w1 has F - 1 columns), nothing else
    changed the function, and the model is valid."""
    w1 = next(numpy_helper.to_array(t) for t in slimmed.graph.initializer
              if t.name.startswith("w1"))
    assert w1.shape == (D, F - 1)
    onnx.checker.check_model(slimmed, full_check=True)
    assert_same_function(model, slimmed, feeds=feeds, rtol=1e-5, atol=1e-5)


def test_conv1d_flatten_gemm_and_gelu_new_neurons_are_free():
    """The Gemm's rows are B*T ('B*5' from the flatten, not a fresh symbol), so the view
    back maps them onto [B, T]; Pow by a constant is element-wise: a duplicate neuron
    through gelu_new is removed."""
    model, feeds = conv1d_mlp()
    groups = build_groups(Graph(normalize(model)))
    ffn = [g for g in groups.groups.values() if any(m.node == "fc" for m in g.members)]
    assert [(g.size, g.frozen) for g in ffn] == [(F, None)]
    result = slim(model, latency_runs=0)
    _assert_one_neuron_less(model, result.model, feeds)


def test_width_literal_in_a_shared_computed_target_is_never_left_stale():
    """Two Reshapes read one Concat(Shape(x)[:2], F): slimming one branch must not keep
    F in the target it shares (a crash, or a wrong model, before): the slimmed branch's
    Reshape gets a private target [-1, T, F - 1] (T is static), the other keeps F."""
    model, feeds = conv1d_mlp(shared_target=True)
    result = slim(model, latency_runs=0)
    _assert_one_neuron_less(model, result.model, feeds)


def _shared_view_target_model() -> onnx.ModelProto:
    """GPT-2's views as the dynamo exporter writes them with a dynamic sequence length:

        x [B, T, 4] ─ Reshape [-1, 4] ─┬ Gemm W1 (6; 5 = 0) ─ view ─ Relu ─ MatMul ─┐
                                       └ Gemm W3 (6) ────────────── view ─ MatMul ─ Add ─ y
        view = Reshape(·, Concat(Shape(x)[0:1], Shape(x)[1:2], [6]))   one Concat, both views

    ``['B*T', 6] -> [B, T, 6]`` has no private constant target (two symbols before the
    channel axis), and the Concat with its literal 6 is read by both views."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    w1[:, 5] = w1[:, 0]
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "w1"), (rng.standard_normal((4, 6)).astype(np.float32), "w3"),
        (rng.standard_normal((6, 3)).astype(np.float32), "w2"),
        (rng.standard_normal((6, 3)).astype(np.float32), "w4"),
        (np.array([-1, 4], np.int64), "flat"), (np.array([6], np.int64), "six"))]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["xf"]),
        helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
        helper.make_node("Shape", ["x"], ["t"], start=1, end=2),
        helper.make_node("Concat", ["b", "t", "six"], ["tgt"], axis=0),
        helper.make_node("Gemm", ["xf", "w1"], ["h1"]),
        helper.make_node("Reshape", ["h1", "tgt"], ["v1"]),
        helper.make_node("Relu", ["v1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["y1"]),
        helper.make_node("Gemm", ["xf", "w3"], ["h2"]),
        helper.make_node("Reshape", ["h2", "tgt"], ["v2"]),
        helper.make_node("MatMul", ["v2", "w4"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "shared_view", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["B", "T", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_views_sharing_one_computed_target_each_get_their_own_and_slim():
    """Seen on GPT-2 (dynamo, dynamic sequence length): every width behind a shared view
    target froze ("a value shared with other nodes"); each view now reads its own copy of
    the Concat and its literal, and the planted duplicate goes at every sequence length."""
    model = _shared_view_target_model()
    result = slim(model, latency_runs=0)
    assert sum(g["size"] - g["kept"] for g in result.report.groups) == 1
    for t in (1, 5):
        feeds = {"x": np.random.default_rng(t).standard_normal((2, t, 4)).astype(np.float32)}
        assert_same_function(model, result.model, feeds=feeds, rtol=1e-5, atol=1e-5)


def test_calibrated_probe_of_a_width_behind_a_computed_view_target_runs_its_rewrite():
    """Seen on GPT-2 (dynamo, dynamic sequence length): the sensitivity probe cut the model
    after the view target's Concat and fed it the original's value, so the trial model's
    view still spelled the old width and onnxruntime refused it (exit 3)."""
    model = _shared_view_target_model()
    x = np.random.default_rng(0).standard_normal((64, 5, 4)).astype(np.float32)
    result = slim(model, data={"x": x}, holdout={"x": x[:16]}, ratio=0.3, round_to=1,
                  latency_runs=0)
    assert result.report.after.flops < result.report.before.flops
