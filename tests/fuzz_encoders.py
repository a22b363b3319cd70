"""Random small transformer encoders built with onnx.helper, with planted exact redundancy in
the FFN neurons and in the attention heads, for tests/test_fuzz_encoders.py.

    x [B,T,D] ─┬─ (LN) ─ Q/K/V MatMul+Add ─ Reshape [B,T,H,d] ─ Transpose ─ QKᵀ ─ scale
               │        ─ (+ mask) ─ Softmax ─ ·V ─ Transpose ─ Reshape [B,T,H*d]
               │        ─ MatMul+Add (output projection) ─┐
               └────────────────────────── Add (residual) ┴─ (LN) ─ FFN ─ Add ─ (LN) ─ ...
    FFN: MatMul+Add ─ Relu | Gelu op | Erf GELU ─ MatMul+Add
    plant: FFN neuron 5 := neuron 2 (dup), neuron 7 dead, neuron 9 := 2.5 x neuron 1 (Relu);
           head 3 := head 0 (Q, K, V columns and biases copied), head 1 dead (V and bias 0)

Layer norm is the LayerNormalization op or its decomposition (ReduceMean, Sub, Pow,
ReduceMean, Add, Sqrt, Div, Mul, Add); pre- or post-norm. The planted counts are exact: seeded
Gaussian weights have no redundancy of their own, so an exact slim must take every FFN layer
from `ffn` to `ffn - planted` neurons and every attention from `heads` to
`heads - planted` heads, and nothing else changes the function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

ACTIVATIONS = ("Relu", "Gelu", "GeluErf")
GELU_OP_OPSET = 20  # the Gelu op exists from opset 20
OPSET = 17  # LayerNormalization exists from 17
TOKENS = 5
EPS = 1e-5


@dataclass(frozen=True)
class Spec:
    """The drawn architecture."""

    layers: int
    d_model: int
    heads: int
    head_dim: int
    ffn: int
    activation: str
    norm_op: bool  # LayerNormalization op, else decomposed
    pre_norm: bool
    mask: bool
    reshape: str  # "zeros" ([0, 0, H, d]), "minus_one" ([-1, T, H, d]) or "computed" (Shape)
    seed: int

    @property
    def opset(self) -> int:
        return GELU_OP_OPSET if self.activation == "Gelu" else OPSET


@dataclass
class Planted:
    """What was planted, per layer: FFN neurons and heads that exact mode can remove."""

    ffn: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)


@dataclass
class Encoder:
    """A built model, its spec and its planted redundancy."""

    model: onnx.ModelProto
    spec: Spec
    planted: Planted


@st.composite
def specs(draw) -> Spec:
    return Spec(
        layers=draw(st.integers(1, 2)), d_model=draw(st.integers(4, 12)),
        heads=draw(st.integers(2, 4)), head_dim=draw(st.integers(2, 5)),
        ffn=draw(st.integers(6, 16)), activation=draw(st.sampled_from(ACTIVATIONS)),
        norm_op=draw(st.booleans()), pre_norm=draw(st.booleans()), mask=draw(st.booleans()),
        reshape=draw(st.sampled_from(("zeros", "minus_one", "computed"))),
        seed=draw(st.integers(0, 10_000)))


@st.composite
def encoders(draw, plant_ffn: bool = True, plant_heads: bool = True) -> Encoder:
    """A random encoder with planted FFN neurons and heads (each layer draws its own)."""
    spec = draw(specs())
    plants: list[tuple[list[tuple[str, int, int, float]], list[tuple[str, int, int]]]] = []
    for _ in range(spec.layers):
        plants.append((draw(ffn_plants(spec)) if plant_ffn else [],
                       draw(head_plants(spec)) if plant_heads else []))
    return build(spec, plants)


@st.composite
def ffn_plants(draw, spec: Spec) -> list[tuple[str, int, int, float]]:
    """(kind, dst, src, factor) on distinct neurons: a planted neuron is never a source."""
    kinds = ["dup", "dead"] + (["mult"] if spec.activation == "Relu" else [])
    order = draw(st.permutations(range(spec.ffn)))
    count = draw(st.integers(0, spec.ffn // 3))
    return [(draw(st.sampled_from(kinds)), order[2 * i], order[2 * i + 1],
             draw(st.floats(0.3, 3.0))) for i in range(count)]


@st.composite
def head_plants(draw, spec: Spec) -> list[tuple[str, int, int]]:
    """(kind, dst, src) on distinct heads; at least one head stays unplanted."""
    order = draw(st.permutations(range(spec.heads)))
    count = draw(st.integers(0, spec.heads // 2))
    return [(draw(st.sampled_from(("dup", "dead"))), order[2 * i], order[2 * i + 1])
            for i in range(count)]


class _Graph:
    """Nodes and initializers of one encoder; every node named (tests find them by name)."""

    def __init__(self, spec: Spec) -> None:
        self.spec, self.rng = spec, np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, name: str, inputs: list[str], **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def weight(self, rows: int, cols: int) -> np.ndarray:
        return (self.rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def linear(self, name: str, x: str, w: np.ndarray, b: np.ndarray) -> str:
        y = self.op("MatMul", name, [x, self.const(f"{name}.w", w)])
        return self.op("Add", f"{name}.add", [y, self.const(f"{name}.b", b)])


def layer_norm(g: _Graph, name: str, x: str) -> str:
    d = g.spec.d_model
    gamma = g.const(f"{name}.g", (1 + 0.1 * g.rng.standard_normal(d)).astype(np.float32))
    beta = g.const(f"{name}.b", g.bias(d))
    if g.spec.norm_op:
        return g.op("LayerNormalization", name, [x, gamma, beta], axis=-1, epsilon=EPS)
    mean = reduce_mean(g, f"{name}.mean", x)
    centered = g.op("Sub", f"{name}.sub", [x, mean])
    sq = g.op("Pow", f"{name}.pow", [centered, g.const(f"{name}.two", np.float32(2.0))])
    var = reduce_mean(g, f"{name}.var", sq)
    std = g.op("Sqrt", f"{name}.sqrt",
               [g.op("Add", f"{name}.eps", [var, g.const(f"{name}.e", np.float32(EPS))])])
    normed = g.op("Div", f"{name}.div", [centered, std])
    return g.op("Add", f"{name}.shift", [g.op("Mul", f"{name}.scale", [normed, gamma]), beta])


def reduce_mean(g: _Graph, name: str, x: str) -> str:
    """Mean over the last axis; axes moved from attribute to input at opset 18."""
    if g.spec.opset < 18:
        return g.op("ReduceMean", name, [x], axes=[-1], keepdims=1)
    return g.op("ReduceMean", name, [x, g.const(f"{name}.axes", np.array([-1], np.int64))],
                keepdims=1)


def head_shape(g: _Graph, name: str, x: str) -> str:
    """The Reshape target [B, T, H, d], written the way the spec says."""
    s = g.spec
    tail = np.array([s.heads, s.head_dim], np.int64)
    if s.reshape == "zeros":
        return g.const(f"{name}.shape", np.concatenate([[0, 0], tail]))
    if s.reshape == "minus_one":
        return g.const(f"{name}.shape", np.concatenate([[-1, TOKENS], tail]))
    shape = g.op("Shape", f"{name}.shape_of", [x])
    bt = g.op("Slice", f"{name}.bt", [shape, g.const(f"{name}.s0", np.array([0], np.int64)),
                                      g.const(f"{name}.s2", np.array([2], np.int64))])
    return g.op("Concat", f"{name}.shape", [bt, g.const(f"{name}.hd", tail)], axis=0)


def attention(g: _Graph, name: str, x: str, plants: list[tuple[str, int, int]]) -> str:
    s = g.spec
    inner, d = s.heads * s.head_dim, s.d_model
    qkv = {k: (g.weight(d, inner), g.bias(inner)) for k in "qkv"}
    plant_heads(qkv, plants, s.head_dim)
    split = {}
    for k, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        y = g.linear(f"{name}.{k}", x, *qkv[k])
        r = g.op("Reshape", f"{name}.{k}.heads", [y, head_shape(g, f"{name}.{k}", y)])
        split[k] = g.op("Transpose", f"{name}.{k}.t", [r], perm=perm)
    scores = g.op("MatMul", f"{name}.qk", [split["q"], split["k"]])
    scale = np.float32(np.sqrt(s.head_dim))
    scores = g.op("Div", f"{name}.scaled", [scores, g.const(f"{name}.sqrt_d", scale)])
    if s.mask:
        scores = g.op("Add", f"{name}.masked", [scores, "mask"])
    probs = g.op("Softmax", f"{name}.softmax", [scores], axis=-1)
    ctx = g.op("MatMul", f"{name}.pv", [probs, split["v"]])
    ctx = g.op("Transpose", f"{name}.ctx.t", [ctx], perm=[0, 2, 1, 3])
    merged = g.op("Reshape", f"{name}.merge",
                  [ctx, g.const(f"{name}.merge.shape", np.array([0, 0, inner], np.int64))])
    return g.linear(f"{name}.out", merged, g.weight(inner, d), g.bias(d))


def plant_heads(qkv: dict[str, tuple[np.ndarray, np.ndarray]],
                plants: list[tuple[str, int, int]], hd: int) -> None:
    """dup: head dst's Q, K, V columns and biases := head src's; dead: V of dst := 0."""
    for kind, dst, src in plants:
        cols, from_cols = slice(dst * hd, (dst + 1) * hd), slice(src * hd, (src + 1) * hd)
        for k, (w, b) in qkv.items():
            if kind == "dup":
                w[:, cols], b[cols] = w[:, from_cols], b[from_cols]
            elif k == "v":
                w[:, cols], b[cols] = 0.0, 0.0


def activation(g: _Graph, name: str, x: str) -> str:
    act = g.spec.activation
    if act != "GeluErf":
        return g.op(act, name, [x])
    scaled = g.op("Div", f"{name}.div", [x, g.const(f"{name}.sqrt2", np.float32(np.sqrt(2)))])
    erf = g.op("Erf", f"{name}.erf", [scaled])
    one = g.op("Add", f"{name}.one", [erf, g.const(f"{name}.1", np.float32(1.0))])
    return g.op("Mul", f"{name}.half", [g.op("Mul", f"{name}.mul", [x, one]),
                                        g.const(f"{name}.05", np.float32(0.5))])


def ffn(g: _Graph, name: str, x: str, plants: list[tuple[str, int, int, float]]) -> str:
    s = g.spec
    w1, b1 = g.weight(s.d_model, s.ffn), g.bias(s.ffn)
    for kind, dst, src, factor in plants:
        scale = {"dup": 1.0, "dead": 0.0, "mult": factor}[kind]
        w1[:, dst], b1[dst] = scale * w1[:, src], scale * b1[src]
    hidden = activation(g, f"{name}.act", g.linear(f"{name}.ffn1", x, w1, b1))
    return g.linear(f"{name}.ffn2", hidden, g.weight(s.ffn, s.d_model), g.bias(s.d_model))


def block(g: _Graph, i: int, x: str, plants: tuple[list, list]) -> str:
    ffn_plan, head_plan = plants
    name = f"l{i}"
    if g.spec.pre_norm:
        x = g.op("Add", f"{name}.res1", [x, attention(g, name, layer_norm(g, f"{name}.ln1", x),
                                                      head_plan)])
        return g.op("Add", f"{name}.res2", [x, ffn(g, name, layer_norm(g, f"{name}.ln2", x),
                                                   ffn_plan)])
    x = layer_norm(g, f"{name}.ln1", g.op("Add", f"{name}.res1",
                                          [x, attention(g, name, x, head_plan)]))
    return layer_norm(g, f"{name}.ln2", g.op("Add", f"{name}.res2", [x, ffn(g, name, x,
                                                                            ffn_plan)]))


def build(spec: Spec, plants: list[tuple[list, list]]) -> Encoder:
    g = _Graph(spec)
    x = "x"
    for i, layer_plants in enumerate(plants):
        x = block(g, i, x, layer_plants)
    if spec.pre_norm:
        x = layer_norm(g, "final.ln", x)
    g.op("MatMul", "y", [x, g.const("head.w", g.weight(spec.d_model, 3))])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS,
                                                                     spec.d_model])]
    if spec.mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT,
                                                    ["batch", 1, 1, TOKENS]))
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TOKENS, 3])
    graph = helper.make_graph(g.nodes, "encoder", inputs, [output], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = 10
    planted = Planted(ffn=[len(p[0]) for p in plants], heads=[len(p[1]) for p in plants])
    return Encoder(model, spec, planted)


def width(model: onnx.ModelProto, node_name: str) -> int:
    """Output width of the MatMul `node_name` (its constant weight's last axis)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    return int(init.dims[-1])
