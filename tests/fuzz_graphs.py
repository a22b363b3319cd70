"""Random ONNX graphs drawn from every op the channel handlers claim, with planted exact
redundancy, for the differential fuzzer (tests/test_fuzz_exact.py).

    x ─ Conv ─ BN ─ Gelu ─ MaxPool ─┬─ Conv ─ ... ─ GAP ─ Flatten ─ Gemm ─ (head 1)
            plant: ch4 = 2.5 ch1,   └─ If(cond){ Relu(outer read) } ─ (head 2)
            ch2 dead, ch5 = ch0

A `Builder` emits ops with the attribute forms valid at the drawn opset (onnx.defs decides)
and tracks, per tensor, which planted relations between channels still hold exactly
(`Rel`): carriers get parameters that keep them, ops that break one drop it. Where the
graph is plain (no subgraph readers, no extra outputs) that bookkeeping says how many
channels exact mode must remove from each producer (`Plant.expected`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

#: Open bugs the properties steer around (the generator avoids the construct, or
#: test_fuzz_exact.SYMPTOMS skips the exact crash); each has a strict xfail repro in
#: tests/test_fuzz_exact.py. Fixed one? Delete its entry here and its xfail mark there.
KNOWN_BUGS: frozenset[str] = frozenset()

HOMOGENEOUS = ("Relu", "LeakyRelu", "Identity", "Dropout")  # f(a x) = a f(x), a > 0
ODD = ("Tanh", "Erf", "Softsign", "Neg", "Sin", "Asinh", "Atan")  # f(-x) = -f(x)
GENERAL = ("Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Clip", "Gelu",
           "Mish", "Abs", "Exp", "Cast")
ZERO_AT_ZERO = {*HOMOGENEOUS, *ODD, "HardSwish", "Elu", "Selu", "Gelu", "Mish", "Abs", "Cast",
                "PRelu"}
ACTIVATIONS = (*HOMOGENEOUS, *ODD, *GENERAL)
RECURRENT = ("LSTM", "GRU", "RNN")
PIECES = ("Split", "Slice", "Gather")
CARRIERS = ("BatchNormalization", "InstanceNormalization", "PRelu", "Add", "Sub", "Mul", "Div",
            "DepthwiseConv")
POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
         "GlobalLpPool", "ReduceMean", "ReduceMax", "ReduceSum", "Pad", "Resize", "Upsample")
SHAPES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Shape", "Size")
PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Every op a strategy here can draw (DepthwiseConv is a Conv with group = channels).
FUZZED_OPS = frozenset({*ACTIVATIONS, *CARRIERS, *POOLS, *SHAPES, *PRODUCERS, *RECURRENT,
                        *PIECES}
                       - {"DepthwiseConv"})
OPSETS = (9, 10, *range(11, 22))


def version(op: str, opset: int) -> int | None:
    """The since-version of `op`'s schema in force at `opset`; None when absent/deprecated."""
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None
    return None if schema.deprecated else schema.since_version


@dataclass(frozen=True)
class Rel:
    """An exact relation among channels of one tensor: v[dst] = factor * v[src] (dup, mult,
    flip) or v[dst] constant (const; `zero` when the constant is 0)."""

    kind: str
    dst: int
    src: int = -1
    factor: float = 1.0
    zero: bool = False


@dataclass
class Chan:
    """What the generator knows about a tensor's channel axis: groups and relations."""

    axis: int
    segs: tuple[tuple[str | None, int], ...]
    rels: tuple[Rel, ...] = ()
    stride: int = 1  # features per channel after a Flatten
    firsts: tuple[int, ...] = ()  # group index of each segment's first channel (cut pieces)

    @property
    def size(self) -> int:
        return sum(n for _, n in self.segs)

    def owner(self, c: int) -> tuple[str | None, int]:
        """(group, index of the channel within its group) of channel c."""
        for k, (group, n) in enumerate(self.segs):
            if c < n:
                return group, c + (self.firsts[k] if self.firsts else 0)
            c -= n
        raise IndexError(c)

    def first(self, k: int) -> int:
        return self.firsts[k] if self.firsts else 0

    def related(self) -> set[int]:
        return {r.dst for r in self.rels} | {r.src for r in self.rels if r.src >= 0}


@dataclass
class Plant:
    """A producer (found by its weight initializer) and the channels exact mode must remove."""

    weight: str
    op: str
    expected: int


@dataclass
class Case:
    model: onnx.ModelProto
    bools: list[str]
    plants: list[Plant]
    ops: set[str]
    plain: bool
    ints: dict[str, int] = field(default_factory=dict)  # integer input -> upper bound

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        return f"Case(plain={self.plain}, plants={self.plants})\n" + \
            onnx.printer.to_text(self.model)


@dataclass
class Options:
    plain: bool = False  # no subgraph readers, extra outputs, freeze paths, Pad values
    bugs: frozenset[str] = field(default_factory=lambda: KNOWN_BUGS)


def output_channels(model: onnx.ModelProto, weight: str, op: str) -> int:
    """Output channels of the producer reading initializer `weight` (names survive slimming)."""
    w = next(t for t in model.graph.initializer if t.name == weight)
    node = next(n for n in model.graph.node if weight in n.input)
    trans = any(a.name == "transB" and a.i for a in node.attribute)
    return int(w.dims[0] if op == "Conv" or (op == "Gemm" and trans) else w.dims[1])


def feeds(model: onnx.ModelProto, bools: list[str], seed: int = 1234,
          ints: dict[str, int] | None = None) -> list[dict]:
    """Fresh standard-normal inputs (batch 2, dynamic dims 2), every bool input both ways,
    integer inputs (ids) uniform below their bound in `ints`."""
    rng = np.random.default_rng(seed)
    ints = ints or {}
    specs = []
    for vi in model.graph.input:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else 2 for d in t.shape.dim)
        specs.append((vi.name, dims, t.elem_type))
    out = []
    for values in itertools.product((True, False), repeat=len(bools)):
        flags = dict(zip(bools, values, strict=True))
        for _ in range(2):
            out.append({name: np.array(flags[name]) if name in flags else
                        rng.integers(0, ints[name], dims) if name in ints else
                        rng.standard_normal(dims).astype(np.float32)
                        for name, dims, _ in specs})
    return out


def _keep(p: np.ndarray, rels: list[Rel], shift: bool) -> np.ndarray:
    """Per-channel parameters that keep `rels` exact: a scale-like parameter is copied from
    the source channel, a shift-like one scaled by the factor (and 0 for a dead channel)."""
    for r in rels:
        if r.kind != "const":
            p[r.dst] = (r.factor if shift else 1.0) * p[r.src]
        elif shift and r.zero:
            p[r.dst] = 0.0
    return p


def _through(rels: tuple[Rel, ...], keep: set[str], zero_ok: bool,
             const_ok: bool = True) -> tuple[Rel, ...]:
    """Relations that survive an op: kinds in `keep`; constants stay constants (`const_ok`),
    and stay zero when the op maps 0 to 0 (`zero_ok`)."""
    out = []
    for r in rels:
        if r.kind == "const":
            if const_ok or (r.zero and zero_ok):
                out.append(replace(r, zero=r.zero and zero_ok))
        elif r.kind in keep:
            out.append(r)
    return tuple(out)


LINEAR = {"dup", "mult", "flip"}
POSITIVE = {"dup", "mult"}


@functools.cache
def _index(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n - 1)


class Builder:
    """Emits nodes at one opset. `index` (hypothesis, in the strategy) makes the structural
    choices, a seeded rng the weights and attributes; every planted relation is tracked in
    `chan` (see the module doc)."""

    def __init__(self, index: Callable[[int], int], opset: int, seed: int, names: str,
                 opts: Options) -> None:
        self.index, self.opset, self.opts, self.names = index, opset, opts, names
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.shape: dict[str, tuple] = {}
        self.chan: dict[str, Chan] = {}
        self.reads: dict[str, list[tuple[bool, frozenset[int]]]] = {}
        self.groups: dict[str, str] = {}  # group id (its first producer's weight) -> op
        self.alias: dict[str, str] = {}
        self.frozen: set[str] = set()
        self.ops: set[str] = set()
        self.bools: list[str] = []
        self.not_float: set[str] = set()
        self.indirect: dict[str, str] = {}  # weight -> how it is computed (see `build`)
        self.cuts: dict[str, set[int]] = {}  # group -> where a Split / Slice cut it
        self.widths: dict[str, int] = {}
        self.int_inputs: dict[str, int] = {}  # integer input -> exclusive upper bound
        self._k = 0
        self.batch = self.pick(["N", "N", 2])

    # low level ------------------------------------------------------------------------
    def has(self, op: str) -> bool:
        return version(op, self.opset) is not None

    def since(self, op: str) -> int:
        return version(op, self.opset) or 0

    def bug(self, name: str) -> bool:
        return name in self.opts.bugs

    # Attribute-level choices come from the seeded rng (a hypothesis draw costs ~0.3 ms);
    # the structure (blocks, ops, counts) from hypothesis, so examples still shrink.
    def maybe(self, one_in: int) -> bool:
        return int(self.rng.integers(one_in)) == 0

    def pick(self, options):
        options = list(options)
        return options[int(self.rng.integers(len(options)))]

    def coin(self) -> bool:
        return bool(self.rng.integers(2))

    def int(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def choose(self, options):
        options = list(options)
        return options[self.index(len(options))]

    def count(self, lo: int, hi: int) -> int:
        return lo + self.index(hi - lo + 1)

    def chance(self, one_in: int) -> bool:
        return self.index(one_in) == 0

    def neg(self, forms: list) -> list:
        """Negative axes are valid from opset 11."""
        return forms if self.opset >= 11 else []

    def fresh(self, hint: str) -> str:
        self._k += 1
        return f"{hint}{self._k}"

    def _node_name(self, op: str) -> str:
        policy = self.names
        if policy == "mixed":
            policy = ("unique", "unnamed", "dup")[int(self.rng.integers(3))]
        return {"unique": self.fresh(op.lower() + "_"), "unnamed": "", "dup": "n"}[policy]

    def node(self, op: str, inputs: list[str], shape: tuple, *, outputs: int = 1,
             **attrs) -> str:
        outs = [self.fresh("t") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self._node_name(op), **attrs))
        self.shape[outs[0]] = tuple(shape)
        self.ops.add(op)
        return outs[0]

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.weights[name] = np.array(value, dtype=dtype)
        return name

    def ints(self, values) -> str:
        return self.const(values, np.int64, "i")

    def input(self, shape: tuple, elem: int = TensorProto.FLOAT) -> str:
        name = "cond" if elem == TensorProto.BOOL else f"x{len(self.inputs)}"
        if elem == TensorProto.INT64:
            name = f"ids{len(self.inputs)}"
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        self.shape[name] = tuple(shape)
        return name

    def nonzero(self) -> float:
        return float(self.rng.choice([-1.0, 1.0]) * self.rng.uniform(0.2, 1.0))

    def freeze(self, t: str) -> None:
        """Bookkeeping only: the groups in `t` can promise nothing (output, subgraph read)."""
        ch = self.chan.get(t)
        self.frozen.update(g for g, _ in (ch.segs if ch else ()) if g is not None)

    def set_chan(self, t: str, ch: Chan | None, **changes) -> str:
        if ch is not None:
            self.chan[t] = replace(ch, **changes)
        return t

    # producers --------------------------------------------------------------------------
    def _read(self, x: str, w: np.ndarray, col_axis: int, axis: int, folds: bool) -> None:
        """A linear consumer reads `x` on `axis`; maybe zero the columns of a free channel."""
        ch = self.chan.get(x)
        if ch is None:
            return
        if ch.axis != axis:
            self.freeze(x)
            return
        free = [c for c in range(ch.size) if ch.owner(c)[0] and c not in ch.related()]
        zero: frozenset[int] = frozenset()
        if free and self.maybe(3):
            zero = frozenset(self.rng.permutation(free)[:self.int(1, 2)].tolist())
        cols = np.moveaxis(w, col_axis, 0)
        for c in zero:  # the features of channel c (a block of `stride` after a Flatten)
            cols[c * ch.stride:(c + 1) * ch.stride] = 0
        self.reads.setdefault(x, []).append((folds, zero))

    def draw_rels(self, width: int, kinds=("dup", "mult", "flip", "dead", "const")) -> list[Rel]:
        order = self.rng.permutation(width).tolist()
        rels = []
        for i in range(self.int(0, width // 2)):
            kind = self.pick(kinds)
            src, dst = order[2 * i], order[2 * i + 1]
            if kind in ("dead", "const"):
                rels.append(Rel("const", dst, zero=kind == "dead"))
            else:
                factor = {"dup": 1.0, "flip": -1.0}.get(kind) or \
                    self.pick([2.5, 0.5, 3.0, 1.7])
                rels.append(Rel(kind, dst, src, factor))
        return rels

    def plant(self, rels: list[Rel], w: np.ndarray, rows_axis: int,
              b: np.ndarray | None) -> None:
        rows = np.moveaxis(w, rows_axis, 0)
        for r in rels:
            if r.kind == "const":
                rows[r.dst] = 0
                if b is not None:
                    b[r.dst] = 0.0 if r.zero else self.nonzero()
            else:
                rows[r.dst] = r.factor * rows[r.src]
                if b is not None:
                    b[r.dst] = r.factor * b[r.src]

    def produce(self, y: str, weight: str, axis: int, rows_axis: int, b: np.ndarray | None,
                op: str, rels: list[Rel] | None = None) -> str:
        w = self.weights[weight]
        if not self.opts.plain and self.maybe(6):  # as exporters write weights
            self.indirect[weight] = self.pick(["Constant", "Transpose", "Cast"])
        width = w.shape[rows_axis]
        if rels is None:
            kinds = ("dup", "mult", "flip", "dead") + (("const",) if b is not None else ())
            rels = self.draw_rels(width, kinds)
        self.plant(rels, w, rows_axis, b)
        self.groups[weight] = op
        self.widths[weight] = width
        self.chan[y] = Chan(axis, ((weight, width),), tuple(rels))
        return y

    def conv(self, x: str, out: int, k: int = 3, pad: int | None = None, stride: int = 1,
             rels: list[Rel] | None = None) -> str:
        n, c, *sp = self.shape[x]
        pad = k // 2 if pad is None else pad
        w = self.rng.standard_normal((out, c, *[k] * len(sp))) / np.sqrt(c * k ** len(sp))
        weight = self.const(w, hint="convw")
        attrs: dict = {"kernel_shape": [k] * len(sp), "strides": [stride] * len(sp)}
        auto = None if self.opts.plain or stride > 1 else \
            self.pick([None, None, None, "SAME_UPPER", "SAME_LOWER"] +
                      (["VALID"] if pad == 0 else []))
        dil = 2 if k == 3 and stride == 1 and not auto and min(sp) >= 5 and \
            not self.opts.plain and self.maybe(5) else 1
        if dil > 1:
            attrs["dilations"] = [dil] * len(sp)
            pad *= dil
        if auto:
            attrs["auto_pad"] = auto
        elif pad or self.maybe(2):
            attrs["pads"] = [pad] * 2 * len(sp)
        padded = auto in ("SAME_UPPER", "SAME_LOWER") or pad > 0
        self._read(x, self.weights[weight], 1, 1, folds=not padded)
        inputs = [x, weight]
        b = None
        if (rels is not None and any(r.kind == "const" and not r.zero for r in rels)) or \
                self.coin():
            inputs.append(self.const(0.1 * self.rng.standard_normal(out), hint="convb"))
            b = self.weights[inputs[-1]]
        eff = dil * (k - 1) + 1
        size = [s if auto and auto != "VALID" else (s + 2 * pad - eff) // stride + 1 for s in sp]
        y = self.node("Conv", inputs, (n, out, *size), **attrs)
        return self.produce(y, weight, 1, 0, b, "Conv", rels)

    def gemm(self, x: str, out: int, rels: list[Rel] | None = None) -> str:
        n, k = self.shape[x]
        trans_b = self.coin()
        w = self.rng.standard_normal((out, k)) / np.sqrt(k)
        weight = self.const(w if trans_b else w.T, hint="gemmw")
        self._read(x, self.weights[weight], 1 if trans_b else 0, 1, folds=True)
        attrs = {"transB": 1} if trans_b else self.pick([{}, {"transB": 0}])
        for name in ("alpha", "beta"):
            value = self.pick([1.0, 1.0, 0.5, 2.0])
            if value != 1.0:
                attrs[name] = value
        form = self.pick(["vec", "vec", "row", "scalar", "none"])
        form = "vec" if form == "none" and self.since("Gemm") < 11 else form
        inputs, b = [x, weight], None
        if form != "none":
            shape = {"vec": (out,), "row": (1, out), "scalar": (1,)}[form]
            inputs.append(self.const(0.1 * self.rng.standard_normal(shape), hint="gemmb"))
            b = self.weights[inputs[-1]].reshape(-1) if form != "scalar" else None
        y = self.node("Gemm", inputs, (n, out), **attrs)
        kinds = ("dup",) if form == "scalar" else \
            ("dup", "mult", "flip", "dead") + (("const",) if b is not None else ())
        return self.produce(y, weight, 1, 0 if trans_b else 1, b, "Gemm",
                            self.draw_rels(out, kinds) if rels is None else rels)

    def matmul(self, x: str, out: int, rels: list[Rel] | None = None) -> str:
        shape = self.shape[x]
        k = shape[-1]
        weight = self.const(self.rng.standard_normal((k, out)) / np.sqrt(k), hint="matmulw")
        self._read(x, self.weights[weight], 0, len(shape) - 1, folds=True)
        y = self.node("MatMul", [x, weight], (*shape[:-1], out))
        self.produce(y, weight, len(shape) - 1, 1, None, "MatMul", rels)
        return self.arith(y, "Add") if self.coin() else y

    def conv_transpose(self, x: str, out: int) -> str:
        """ConvTranspose: weight (Cin, Cout, k, k), output rows on its axis 1."""
        n, c, h, w = self.shape[x]
        k, stride = self.pick([1, 2, 3]), self.pick([1, 1, 2])
        pad = self.pick([0, k - 1]) if stride == 1 and min(h, w) >= k else 0
        extra = self.pick([0, 1]) if stride == 2 else 0
        wt = self.rng.standard_normal((c, out, k, k)) / np.sqrt(c * k * k)
        weight = self.const(wt, hint="convtw")
        attrs: dict = {"kernel_shape": [k, k], "strides": [stride, stride]}
        if pad or self.coin():
            attrs["pads"] = [pad] * 4
        if extra:
            attrs["output_padding"] = [extra, extra]
        self._read(x, self.weights[weight], 0, 1, folds=stride == 1 and pad >= k - 1)
        inputs, b = [x, weight], None
        if self.coin():
            inputs.append(self.const(0.1 * self.rng.standard_normal(out), hint="convtb"))
            b = self.weights[inputs[-1]]
        size = [(s - 1) * stride - 2 * pad + k + extra for s in (h, w)]
        y = self.node("ConvTranspose", inputs, (n, out, *size), **attrs)
        return self.produce(y, weight, 1, 1, b, "ConvTranspose")

    def recurrent(self, x: str, op: str | None = None) -> str:
        """LSTM / GRU / RNN reading (seq, batch, channels) = x's (N, T, C); the hidden state
        is a new, untracked tensor (N, T, H)."""
        n, t, c = self.shape[x]
        op = op or self.choose(["LSTM", "GRU", "RNN"])
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        hidden, dirs = self.int(2, 5), self.pick([1, 1, 2])
        direction = {1: self.pick(["forward", "reverse"]), 2: "bidirectional"}[dirs]
        w = self.const(self.rng.standard_normal((dirs, gates * hidden, c)) / np.sqrt(c), hint="rw")
        r = self.const(self.rng.standard_normal((dirs, gates * hidden, hidden)) / hidden,
                       hint="rr")
        self._read(x, self.weights[w], 2, 2, folds=True)
        inputs = [x, w, r]
        if self.coin():
            inputs.append(self.const(0.1 * self.rng.standard_normal((dirs, 2 * gates * hidden)),
                                     hint="rb"))
        attrs = {"hidden_size": hidden, "direction": direction}
        if op == "GRU" and self.coin():
            attrs["linear_before_reset"] = 1
        y = self.node(op, inputs, (n, dirs, t, hidden), **attrs)
        if dirs == 2:
            y = self.node("Add", [self.node("Gather", [y, self.ints(0)], (n, t, hidden), axis=1),
                                  self.node("Gather", [y, self.ints(1)], (n, t, hidden), axis=1)],
                          (n, t, hidden))
            return y
        return self._axes_op("Squeeze", y, [1], (n, t, hidden))

    def embedding(self, rels: list[Rel] | None = None) -> str:
        """Gather(table [V, D], ids [N, T]): D channels on the last axis, planted columns."""
        vocab, width, steps = self.int(3, 9), self.int(3, 8), self.int(2, 5)
        ids = self.input((self.batch, steps), TensorProto.INT64)
        self.int_inputs[ids] = vocab
        table = self.const(self.rng.standard_normal((vocab, width)), hint="table")
        y = self.node("Gather", [table, ids], (self.batch, steps, width), axis=0)
        return self.produce(y, table, 2, 1, None, "Gather", rels)

    def take_step(self, x: str) -> str:
        """Gather one position (the last time step) of a (N, T, C) tensor: (N, C)."""
        n, t, c = self.shape[x]
        y = self.node("Gather", [x, self.ints(self.pick([t - 1, -1, 0]))], (n, c), axis=1)
        ch = self.chan.get(x)
        return self.set_chan(y, ch, axis=1) if ch else y

    def split(self, x: str, sizes: list[int] | None = None) -> list[str]:
        """Split along the channel axis into two pieces (every opset's form)."""
        shape, ch = self.shape[x], self.chan.get(x)
        axis = self._axis(x)
        c = shape[axis]
        if not isinstance(c, int) or c < 2:
            return [x]
        if sizes is None:
            sizes = [c // 2, c - c // 2] if self.coin() else [a := self.int(1, c - 1), c - a]
        equal = sizes[0] == sizes[1]
        attrs: dict = {"axis": axis} if axis or self.coin() else {}
        inputs = [x]
        form = self.pick(["sizes", "implicit"] if equal else ["sizes"])
        if self.opset >= 18 and form == "implicit":
            attrs["num_outputs"] = 2
        elif self.opset >= 13 and (form == "sizes" or self.opset >= 18):
            inputs.append(self.ints(sizes))
        elif form == "sizes":
            attrs["split"] = sizes
        first = self.node("Split", inputs, (*shape[:axis], sizes[0], *shape[axis + 1:]),
                          outputs=2, **attrs)
        second = self.nodes[-1].output[1]
        self.shape[second] = (*shape[:axis], sizes[1], *shape[axis + 1:])
        if ch is not None:
            self._cut(ch, first, 0, sizes[0])
            self._cut(ch, second, sizes[0], c)
        return [first, second]

    def _cut(self, ch: Chan, t: str, a: int, b: int) -> None:
        """Channels [a, b) of `ch` as tensor t; relations across the cut are lost."""
        segs, firsts, start = [], [], 0
        for k, (group, n) in enumerate(ch.segs):
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                segs.append((group, hi - lo))
                firsts.append(ch.first(k) + lo - start)
                if group is not None:
                    self.cuts.setdefault(group, set()).update(
                        {firsts[-1], firsts[-1] + hi - lo})
            start += n
        rels = tuple(replace(r, dst=r.dst - a, src=r.src - a if r.src >= 0 else -1)
                     for r in ch.rels if a <= r.dst < b and (r.src < 0 or a <= r.src < b))
        self.chan[t] = replace(ch, segs=tuple(segs), rels=rels, firsts=tuple(firsts))

    def slice_channels(self, x: str, bounds: tuple[int, int] | None = None) -> str:
        """Slice a run of channels (or, on a spatial axis, every other position)."""
        shape, ch = self.shape[x], self.chan.get(x)
        axis, c = self._axis(x), self.shape[x][self._axis(x)]
        if not isinstance(c, int) or c < 2:
            return x
        spatial = bounds is None and len(shape) == 4 and self.coin() and min(shape[2:]) >= 2
        if spatial:  # every other column (a crop before opset 10, which has no steps)
            axis, start, end, step = 3, 0, shape[3], 2
            if self.since("Slice") < 10:
                start, step = 1, 1
        else:
            start, step = self.int(0, c - 2), 1
            end = self.int(start + 1, c)
            start, end = bounds or (start, end)
        out = list(shape)
        out[axis] = len(range(start, end, step))
        if self.since("Slice") < 10:
            y = self.node("Slice", [x], tuple(out), starts=[start], ends=[end], axes=[axis])
        else:
            n = shape[axis]
            form = [self.ints([start]), self.ints([self.pick([end, end - n]) if end < n
                                                   else self.pick([end, 2**31])])]
            form += [self.ints([self.pick([axis, axis - len(shape)])])]
            if step != 1 or self.coin():
                form.append(self.ints([step]))
            y = self.node("Slice", [x, *form], tuple(out))
        if ch is None:
            return y
        if spatial:
            return self.set_chan(y, ch)
        self._cut(ch, y, start, end)
        return y

    def split_block(self, x: str) -> str:
        """conv -> Split / Slice on channels -> activations -> Concat back (or one piece)."""
        y = self.conv(x, self.int(4, 8), 1, 0)
        if self.coin():
            return self.slice_channels(y)
        parts = [self.act(p, self.choose(ACTIVATIONS)) for p in self.split(y)]
        return self.concat(parts) if self.coin() else parts[0]

    # carriers: per-channel parameters chosen so that the planted relations stay exact ----
    def per_channel_shape(self, x: str) -> tuple[int, ...]:
        rank, axis = len(self.shape[x]), self._axis(x)
        c = self.shape[x][axis]
        tail = (1,) * (rank - axis - 1)
        return self.pick([(c, *tail), (*(1,) * axis, c, *tail)])

    def _axis(self, x: str) -> int:
        ch = self.chan.get(x)
        return ch.axis if ch else 1

    def _zero_plant(self, x: str, rels: list[Rel]) -> int | None:
        """A free channel to kill inside a carrier (scale 0), or None."""
        ch = self.chan.get(x)
        free = [c for c in range(ch.size) if c not in ch.related()] if ch else []
        return self.pick(free) if free and self.maybe(4) else None

    def carrier(self, x: str, op: str) -> str:
        return {"BatchNormalization": self.batchnorm, "InstanceNormalization": self.instnorm,
                "PRelu": self.prelu, "DepthwiseConv": self.depthwise}.get(
                    op, lambda t: self.arith(t, op))(x)

    def batchnorm(self, x: str) -> str:
        ch, c = self.chan.get(x), self.shape[x][1]
        rels = list(ch.rels) if ch and ch.axis == 1 else []
        scale = _keep(1 + 0.2 * self.rng.standard_normal(c), rels, False)
        shift = _keep(0.1 * self.rng.standard_normal(c), rels, True)
        mean = _keep(0.1 * self.rng.standard_normal(c), rels, True)
        var = _keep(1 + 0.2 * self.rng.random(c), rels, False)
        dead = self._zero_plant(x, rels) if self._axis(x) == 1 else None
        if dead is not None:
            scale[dead], zero = 0.0, self.coin()
            shift[dead] = 0.0 if zero else self.nonzero()
            rels.append(Rel("const", dead, zero=zero))
        params = [self.const(p, hint="bn") for p in (scale, shift, mean, var)]
        eps = {"epsilon": 1e-3} if self.maybe(3) else {}
        y = self.node("BatchNormalization", [x, *params], self.shape[x], **eps)
        if self._axis(x) != 1:  # normalizes another axis than the channels
            self.freeze(x)
            return self.set_chan(y, ch, rels=_through(ch.rels, {"dup"}, False, False))
        return self.set_chan(y, ch, rels=tuple(rels))

    def instnorm(self, x: str) -> str:
        ch, c = self.chan.get(x), self.shape[x][1]
        rels = list(ch.rels) if ch and ch.axis == 1 else []
        scale = _keep(1 + 0.2 * self.rng.standard_normal(c), rels, False)
        bias = _keep(0.1 * self.rng.standard_normal(c), rels, False)
        for r in rels:
            if r.kind == "const" and r.zero:
                bias[r.dst] = 0.0
        out = [r for r in rels if r.kind in ("dup", "const")]
        dead = self._zero_plant(x, rels)
        if dead is not None and self._axis(x) == 1:
            scale[dead] = 0.0
            out.append(Rel("const", dead, zero=bias[dead] == 0))
        params = [self.const(p, hint="in") for p in (scale, bias)]
        y = self.node("InstanceNormalization", [x, *params], self.shape[x])
        if self._axis(x) != 1:
            self.freeze(x)
            out = []
        return self.set_chan(y, ch, rels=tuple(out))

    def prelu(self, x: str) -> str:
        ch = self.chan.get(x)
        shape = self.pick([self.per_channel_shape(x), (1,)])
        slope = self.rng.uniform(0.05, 0.3, int(np.prod(shape)))
        if slope.size > 1:
            slope = _keep(slope, list(ch.rels) if ch else [], False)
        y = self.node("PRelu", [x, self.const(slope.reshape(shape), hint="slope")],
                      self.shape[x])
        return self.set_chan(y, ch, rels=_through(ch.rels, POSITIVE, True) if ch else ())

    def arith(self, x: str, op: str) -> str:
        """x op c with a per-channel (or scalar) constant c, on either side but Div's."""
        ch = self.chan.get(x)
        rels = list(ch.rels) if ch else []
        shape = self.pick([self.per_channel_shape(x)] * 3 + [(1,), ()])
        n = int(np.prod(shape))
        shift = op in ("Add", "Sub")
        c = self.rng.standard_normal(n) * 0.3 if shift else \
            self.rng.choice([-1.0, 1.0], n) * self.rng.uniform(0.5, 2.0, n)
        out = rels
        if n > 1:
            c = _keep(c, rels, shift)
            dead = self._zero_plant(x, rels) if op == "Mul" else None
            if dead is not None:
                c[dead] = 0.0
                out = [*rels, Rel("const", dead, zero=True)]
        elif shift:
            out = list(_through(tuple(rels), {"dup"}, False))
        inputs = [x, self.const(c.reshape(shape), hint=op.lower())]
        if op != "Div" and self.coin():
            inputs.reverse()
        y = self.node(op, inputs, self.shape[x])
        return self.set_chan(y, ch, rels=tuple(out))

    def depthwise(self, x: str) -> str:
        ch = self.chan.get(x)
        n, c, h, w = self.shape[x]
        rels = list(ch.rels) if ch else []
        k = self.pick([1, 3] if min(h, w) >= 3 else [1])
        pad = self.pick([0, k // 2])
        wt = _keep(self.rng.standard_normal((c, 1, k, k)) / k, rels, False)
        inputs = [x, self.const(wt, hint="dww")]
        b = None
        if self.coin():
            b = _keep(0.1 * self.rng.standard_normal(c), rels, True)
            inputs.append(self.const(b, hint="dwb"))
        out = list(_through(tuple(rels), LINEAR, True, const_ok=pad == 0))
        dead = self._zero_plant(x, rels)
        if dead is not None:
            self.weights[inputs[1]][dead] = 0.0
            out.append(Rel("const", dead, zero=b is None or b[dead] == 0))
        size = (h + 2 * pad - k + 1, w + 2 * pad - k + 1)
        y = self.node("Conv", inputs, (n, c, *size), group=c, kernel_shape=[k, k],
                      pads=[pad] * 4)
        self.ops.add("DepthwiseConv")
        return self.set_chan(y, ch, rels=tuple(out))

    # activations ------------------------------------------------------------------------
    def act(self, x: str, op: str) -> str:
        ch = self.chan.get(x)
        if op == "Cast":
            return self.cast_roundtrip(x)
        if not self.has(op):
            op = "Relu"
        inputs, attrs, zero_ok, outputs = [x], {}, op in ZERO_AT_ZERO, 1
        if op in ("LeakyRelu", "Elu", "HardSigmoid") and self.coin():
            attrs["alpha"] = self.pick([0.01, 0.1, 0.3, 1.5])
        if op in ("HardSigmoid", "Selu") and self.coin():
            attrs["gamma" if op == "Selu" else "beta"] = self.pick([0.4, 0.6, 1.2])
        if op == "Clip":
            inputs, attrs, zero_ok = self._clip(x)
        if op == "Gelu":
            approx = self.pick(["none", "tanh", None])
            attrs = {"approximate": approx} if approx else {}
        if op == "Dropout":
            inputs, attrs, outputs = self._dropout(x)
        y = self.node(op, inputs, self.shape[x], outputs=outputs, **attrs)
        if ch is None:
            return y
        keep = POSITIVE if op in HOMOGENEOUS else {"dup", "flip"} if op in ODD else {"dup"}
        return self.set_chan(y, ch, rels=_through(ch.rels, keep, zero_ok))

    def _clip(self, x: str) -> tuple[list[str], dict, bool]:
        lo, hi = self.pick([(None, None), (0.0, 6.0), (-1.0, 1.0), (None, 0.5), (-0.5, None),
                            (0.1, 2.0), (-2.0, -0.1)])
        zero_ok = (lo is None or lo <= 0) and (hi is None or hi >= 0)
        if self.since("Clip") < 11:
            attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
            return [x], attrs, zero_ok
        inputs = [x, "" if lo is None else self.const(lo, hint="lo"),
                  "" if hi is None else self.const(hi, hint="hi")]
        while inputs[-1] == "":
            inputs.pop()
        return inputs, {}, zero_ok

    def _dropout(self, x: str) -> tuple[list[str], dict, int]:
        outputs = self.pick([1, 1, 2])  # a mask output nobody reads
        if self.since("Dropout") >= 12:
            inputs = [x, self.const(self.pick([0.1, 0.5]), hint="ratio")] \
                if self.coin() else [x]
            return inputs, {}, outputs
        return [x], ({"ratio": 0.3} if self.coin() else {}), outputs

    def cast_roundtrip(self, x: str, to: int | None = None) -> str:
        ch = self.chan.get(x)
        kinds = [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.FLOAT] + \
            ([TensorProto.BFLOAT16] if self.opset >= 13 else [])
        to = self.pick(kinds) if to is None else to
        y = self.node("Cast", [x], self.shape[x], to=to)
        if to != TensorProto.FLOAT:
            self.not_float.add(y)
            y = self.node("Cast", [y], self.shape[x], to=TensorProto.FLOAT)
        return self.set_chan(y, ch, rels=_through(ch.rels, {"dup"}, True) if ch else ())

    # spatial ops (NCHW, channels on axis 1) -------------------------------------------
    def spatial(self, x: str) -> str:
        h, w = self.shape[x][2:]
        ops = ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceMax",
               "ReduceSum", "Pad", "Resize" if self.opset >= 10 else "Upsample"]
        if min(h, w) >= 2:
            ops += ["MaxPool", "AveragePool", "LpPool"]
        op = self.choose(ops)
        if op in ("Pad", "Resize", "Upsample"):
            return getattr(self, op.lower())(x)
        if op.startswith("Reduce"):
            return self.reduce(x, op, self.pick([[2, 3], [2], [3], *self.neg([[-1], [-2, -1]])]),
                               True)
        if op.startswith("Global"):
            attrs = {"p": self.pick([1, 3])} if op == "GlobalLpPool" and self.maybe(2) else {}
            y = self.node(op, [x], (*self.shape[x][:2], 1, 1), **attrs)
            return self._spatial_rels(x, y, op, padded=False)
        return self.window_pool(x, op)

    def window_pool(self, x: str, op: str) -> str:
        n, c, h, w = self.shape[x]
        k = self.pick([2, 3] if min(h, w) >= 3 else [2])
        stride, pad = self.pick([1, 2]), self.pick([0, 0, 1])
        attrs: dict = {"kernel_shape": [k, k], "strides": [stride, stride]}
        if pad or self.maybe(2):
            attrs["pads"] = [pad] * 4
        dil, outputs = 1, 1
        if op == "MaxPool" and self.opset >= 10 and self.maybe(4) and min(h, w) + 2 * pad > 2 * k:
            dil = 2
            attrs["dilations"] = [2, 2]
        if op == "MaxPool" and self.maybe(4):
            outputs = 2  # indices nobody reads
        if op in ("MaxPool", "AveragePool") and self.opset >= 10 and stride == 1 and self.maybe(3):
            attrs["ceil_mode"] = 1
        if op == "AveragePool" and self.coin():
            attrs["count_include_pad"] = self.pick([0, 1])
        if op == "LpPool" and self.coin():
            attrs["p"] = self.pick([1, 2, 3])
        eff = dil * (k - 1) + 1
        size = ((h + 2 * pad - eff) // stride + 1, (w + 2 * pad - eff) // stride + 1)
        y = self.node(op, [x], (n, c, *size), outputs=outputs, **attrs)
        counted = op == "AveragePool" and attrs.get("count_include_pad", 0) == 1
        return self._spatial_rels(x, y, op, padded=bool(pad) and (counted or op == "LpPool"))

    def _spatial_rels(self, x: str, y: str, op: str, padded: bool, value: float = 0.0) -> str:
        ch = self.chan.get(x)
        if ch is None:
            return y
        if "Max" in op:
            rels = _through(ch.rels, POSITIVE, True)
        elif "Lp" in op:
            rels = _through(ch.rels, POSITIVE, True, const_ok=False)
        elif value != 0.0:
            rels = _through(ch.rels, {"dup"}, False, const_ok=False)
        else:
            rels = _through(ch.rels, LINEAR, True, const_ok=not padded)
        return self.set_chan(y, ch, rels=rels)

    def reduce(self, x: str, op: str, axes: list[int], keepdims: bool) -> str:
        shape = list(self.shape[x])
        for a in axes:
            shape[a] = 1
        if not keepdims:
            shape = [d for i, d in enumerate(shape) if i not in {a % len(shape) for a in axes}]
        attrs = {"keepdims": int(keepdims)} if not keepdims or self.maybe(2) else {}
        if self.since(op) >= (13 if op == "ReduceSum" else 18):  # axes became an input
            y = self.node(op, [x, self.ints(axes)], tuple(shape), **attrs)
        else:
            y = self.node(op, [x], tuple(shape), axes=axes, **attrs)
        # a constant channel sums to a multiple of the positions: no constant to the planner
        return self._spatial_rels(x, y, op, padded=op == "ReduceSum")

    def pad(self, x: str) -> str:
        n, c, h, w = self.shape[x]
        modes = ["constant", "constant", "edge"] + (["reflect"] if min(h, w) >= 2 else []) + \
            (["wrap"] if self.opset >= 19 else [])
        mode = self.pick(modes)
        most = 2 if mode in ("constant", "edge") else min(2, min(h, w) - 1)
        p = [self.int(0, most) for _ in range(4)]  # h0, w0, h1, w1
        value = 0.0
        if mode == "constant" and not self.opts.plain:
            value = self.pick([0.0, 0.0, 0.5, -1.0])
        pads = [0, 0, p[0], p[1], 0, 0, p[2], p[3]]
        shape = (n, c, h + p[0] + p[2], w + p[1] + p[3])
        attrs = {"mode": mode} if mode != "constant" or self.maybe(2) else {}
        if self.since("Pad") < 11:
            if value or self.maybe(2):
                attrs["value"] = value
            y = self.node("Pad", [x], shape, pads=pads, **attrs)
        else:
            inputs = [x, self.ints(pads)]
            if value or self.maybe(2):
                inputs.append(self.const(value, hint="padv"))
            if self.opset >= 18 and not self.opts.plain and self.maybe(4):
                inputs += [""] * (3 - len(inputs)) + [self.ints([2, 3])]
                inputs[1] = self.ints([p[0], p[1], p[2], p[3]])
                self.freeze(x)
            y = self.node("Pad", inputs, shape, **attrs)
        return self._spatial_rels(x, y, "Pad", padded=mode == "constant", value=value)

    def resize(self, x: str) -> str:
        n, c, h, w = self.shape[x]
        scales = self.pick([(1, 1, 2, 2), (1, 1, 2, 1), (1, 1, 1, 2), (1, 1, 1.5, 1.5)])
        shape = (n, c, int(h * scales[2]), int(w * scales[3]))
        modes = ["nearest", "linear"] + (["cubic"] if self.opset >= 11 else [])
        attrs = {"mode": self.pick(modes)}
        scale = self.const(scales, hint="scales")
        if self.opset == 10:
            inputs = [x, scale]
        else:
            roi = self.const(np.zeros(0), hint="roi")
            inputs = [x, roi if self.opset < 13 or self.coin() else "", scale]
            if isinstance(n, int) and not self.opts.plain and self.maybe(4):
                inputs[2] = self.const(np.zeros(0), hint="noscales") if self.opset < 13 else ""
                inputs.append(self.ints(shape))
                self.freeze(x)
        y = self.node("Resize", inputs, shape, **attrs)
        return self._spatial_rels(x, y, "Resize", padded=False)

    def upsample(self, x: str) -> str:
        n, c, h, w = self.shape[x]
        scales = self.pick([(1, 1, 2, 2), (1, 1, 2, 1)])
        y = self.node("Upsample", [x, self.const(scales, hint="scales")],
                      (n, c, h * scales[2], w * scales[3]), mode=self.pick(["nearest", "linear"]))
        return self._spatial_rels(x, y, "Upsample", padded=False)

    # shape ops -------------------------------------------------------------------------
    def flatten(self, x: str) -> str:
        n, c, *rest = self.shape[x]
        inner = int(np.prod(rest))
        attrs = {"axis": 1} if self.maybe(2) else {}
        y = self.node("Flatten", [x], (n, c * inner), **attrs)
        ch = self.chan.get(x)
        return self.set_chan(y, ch, stride=ch.stride * inner) if ch else y

    def reshape(self, x: str, form: str | None = None) -> str:
        """(N, C, ...) -> (N, C * ...), the target constant or computed from Shape."""
        n, c, *rest = self.shape[x]
        inner = int(np.prod(rest))
        y = self.reshape_to(x, [0, -1], (n, c * inner), form)
        ch = self.chan.get(x)
        return self.set_chan(y, ch, stride=ch.stride * inner) if ch else y

    def reshape_to(self, x: str, target: list[int], shape: tuple,
                   form: str | None = None) -> str:
        """Reshape with `target` (0: copy, -1: infer) written as a constant, as the literal
        sizes, or as Shape -> Gather -> Concat like exporters do."""
        literal = [shape[i] if v in (0, -1) and isinstance(shape[i], int) else v
                   for i, v in enumerate(target)]
        if literal.count(-1) == 0 and 0 in literal and self.coin():
            literal[literal.index(0) if isinstance(shape[0], str) else 0] = -1
        form = form or self.pick(["const", "literal", "computed"])
        if form == "computed" and target[0] == 0:
            kept = [i for i, v in enumerate(target) if v == 0]
            head = kept[: next((k for k, i in enumerate(kept) if i != k), len(kept))]
            dims = self.node("Shape", [x], (len(self.shape[x]),))
            part = self.node("Gather", [dims, self.ints(head)], (len(head),), axis=0)
            rest = self.ints(target[len(head):])
            t = self.node("Concat", [part, rest], (len(target),), axis=0)
        else:
            t = self.ints(target if form == "const" or literal.count(-1) > 1 else literal)
        return self.node("Reshape", [x, t], shape)

    def reshape_block(self, x: str) -> str:
        """(N, C, H, W) -> (N, C, H*W) or (N, C*H, W), a 1-D conv, and back to 4-D."""
        n, c, h, w = self.shape[x]
        ch = self.chan.get(x)
        if self.coin():
            y = self.reshape_to(x, [0, 0, -1], (n, c, h * w))
            self.set_chan(y, ch)
            rows = (h, w)
        else:
            y = self.reshape_to(x, [0, c * h, w], (n, c * h, w))
            self.set_chan(y, ch, stride=ch.stride * h) if ch else None
            rows = (1, w)
        if self.coin():
            y = self.act(y, self.choose(ACTIVATIONS))
        out = self.int(3, 6)
        y = self.act(self.conv(y, out, 1, 0), self.choose(ACTIVATIONS))
        z = self.reshape_to(y, [0, 0, *rows] if self.coin() else [0, out, rows[0], -1],
                            (n, out, *rows))
        return self.set_chan(z, self.chan.get(y))

    def shape_reader(self, t: str, op: str | None = None) -> None:
        """Shape / Size of `t` read as a value by an untracked computation (an output)."""
        floats = [i.name for i in self.inputs
                  if i.type.tensor_type.elem_type == TensorProto.FLOAT]
        other = floats[0] if floats else t
        if (op or self.pick(["Size", "Shape"])) == "Size":
            value = self.node("Size", [t], ())
        else:
            dims = self.node("Shape", [t], (len(self.shape[t]),))
            value = self.node("Gather", [dims, self.ints(1)], (), axis=0)
        if self.bug("shape_value_read"):  # a read that does not depend on the channels
            value = self.node("Greater", [value, self.ints(0)], ())
        scale = self.node("Cast", [value], (), to=TensorProto.FLOAT)
        self.mark_output(self.node("Mul", [other, scale], self.shape[other]))

    def _axes_op(self, op: str, x: str, axes: list[int], shape: tuple) -> str:
        if self.since(op) >= 13:
            return self.node(op, [x, self.ints(axes)], shape)
        return self.node(op, [x], shape, axes=axes)

    def squeeze_roundtrip(self, x: str) -> str:
        shape = self.shape[x]
        k = self.int(0, len(shape))
        mid = (*shape[:k], 1, *shape[k:])
        form = self.pick([k, *self.neg([k - len(mid)])])
        y = self._axes_op("Unsqueeze", x, [form], mid)
        z = self._axes_op("Squeeze", y, [form], shape)
        ch = self.chan.get(x)
        if ch:
            self.set_chan(y, ch, axis=ch.axis + (k <= ch.axis))
            self.set_chan(z, ch)
        return z

    def squeeze_spatial(self, x: str) -> str:
        """(N, C, 1, 1) -> (N, C)."""
        y = self._axes_op("Squeeze", x, self.pick([[2, 3], *self.neg([[-1, -2]])]),
                          self.shape[x][:2])
        return self.set_chan(y, self.chan.get(x))

    def transpose(self, x: str, perm: list[int]) -> str:
        shape = tuple(self.shape[x][p] for p in perm)
        y = self.node("Transpose", [x], shape, perm=perm)
        ch = self.chan.get(x)
        return self.set_chan(y, ch, axis=perm.index(ch.axis)) if ch else y

    def concat(self, xs: list[str], axis: int = 1) -> str:
        shape = list(self.shape[xs[0]])
        shape[axis] = sum(self.shape[x][axis] for x in xs)
        form = self.pick([axis, *self.neg([axis - len(shape)])])
        y = self.node("Concat", xs, tuple(shape), axis=form)
        segs, firsts, rels, start = [], [], [], 0
        for x in xs:
            ch = self.chan.get(x)
            n = self.shape[x][axis]
            if ch is None or ch.axis != axis or ch.stride != 1:
                self.freeze(x)
                segs.append((None, n))
                firsts.append(0)
            else:
                segs.extend(ch.segs)
                firsts.extend(ch.first(k) for k in range(len(ch.segs)))
                rels += [replace(r, dst=r.dst + start, src=r.src + start if r.src >= 0 else -1)
                         for r in ch.rels]
            start += n
        if any(g for g, _ in segs):
            self.chan[y] = Chan(axis, tuple(segs), tuple(rels), firsts=tuple(firsts))
        return y

    def _piece(self, ch: Chan) -> bool:
        """Some segment is a cut piece of its group, not the whole group."""
        return any(g is not None and (ch.first(k) or n != self.widths[g])
                   for k, (g, n) in enumerate(ch.segs))

    def canon(self, g: str) -> str:
        while g in self.alias:
            g = self.alias[g]
        return g

    def join(self, a: str, b: str, op: str) -> str:
        """Add / Sub / Mul of two tensors: tracked on both sides, their groups become one."""
        y = self.node(op, [a, b], self.shape[a])
        ca, cb = self.chan.get(a), self.chan.get(b)
        same = ca and cb and [(g is None, n) for g, n in ca.segs] == \
            [(g is None, n) for g, n in cb.segs] and ca.axis == cb.axis and ca.stride == 1
        if not same:
            self.freeze(a)
            self.freeze(b)
            return y
        if any(self._piece(ch) for ch in (ca, cb)) and a != b:  # bookkeeping: give up
            self.freeze(a)
            self.freeze(b)
        for (ga, _), (gb, _) in zip(ca.segs, cb.segs, strict=True):
            if ga and gb and self.canon(ga) != self.canon(gb):
                self.alias[self.canon(gb)] = self.canon(ga)
        consts = {r.dst: r for r in cb.rels if r.kind == "const"}
        rels = []
        for r in ca.rels:
            if r.kind == "const" and r.dst in consts:
                zb = consts[r.dst].zero
                rels.append(replace(r, zero=r.zero or zb if op == "Mul" else r.zero and zb))
            elif r in cb.rels and (op != "Mul" or r.kind == "dup"):
                rels.append(r)
        return self.set_chan(y, ca, rels=tuple(rels))

    # readers the channel sweep must not miss -----------------------------------------------
    def cond(self) -> str:
        if not self.bools:
            self.bools.append(self.input((), TensorProto.BOOL))
        return self.bools[0]

    def _branch(self, nodes: list[onnx.NodeProto], out: str, rank: int) -> onnx.GraphProto:
        return helper.make_graph(nodes, self.fresh("branch"), [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                [None] * rank)])

    def subgraph_reader(self, t: str) -> None:
        """An If (or Loop) whose body reads `t` from the outer scope; its result is an output."""
        rank = len(self.shape[t])
        same = [n for n, shape in self.shape.items()
                if shape == self.shape[t] and n != t and n not in self.not_float]
        other = self.pick(same) if same else t
        variant = self.choose(["then", "then", "both", "nested"] +
                            (["loop"] if self.opset >= 11 and not self.bug("loop_outer_read")
                             else []) +
                            (["conv"] if rank == 4 else []))
        a, b, c, d = (self.fresh("sub") for _ in range(4))
        then = [helper.make_node("Relu", [t], [a], name=self.fresh("sub_relu"))]
        other_branch = [helper.make_node("Neg", [t if variant == "both" else other], [b],
                                         name=self.fresh("sub_neg"))]
        if variant == "conv":
            w = self.const(self.rng.standard_normal((2, self.shape[t][1], 1, 1)), hint="subw")
            then = [helper.make_node("Conv", [t, w], [a], name=self.fresh("sub_conv"))]
            other_branch = [helper.make_node("Conv", [other, w], [b], name=self.fresh("sub_conv"))]
        if variant == "nested":
            inner = helper.make_node(
                "If", [self.cond()], [a], name=self.fresh("sub_if"),
                then_branch=self._branch([helper.make_node("Abs", [t], [c])], c, rank),
                else_branch=self._branch([helper.make_node("Relu", [t], [d])], d, rank))
            then = [inner]
        if variant == "loop":
            y = self._loop(t, rank)
        else:
            y = self.node("If", [self.cond()], (None,) * rank,
                          then_branch=self._branch(then, a, rank),
                          else_branch=self._branch(other_branch, b, rank))
        self.outputs.append(y)
        self.freeze(t)

    def _loop(self, t: str, rank: int) -> str:
        i, c_in, c_out, scan = (self.fresh("loop") for _ in range(4))
        body = helper.make_graph(
            [helper.make_node("Identity", [c_in], [c_out]),
             helper.make_node("Sigmoid", [t], [scan])], self.fresh("body"),
            [helper.make_tensor_value_info(i, TensorProto.INT64, []),
             helper.make_tensor_value_info(c_in, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(c_out, TensorProto.BOOL, []),
             helper.make_tensor_value_info(scan, TensorProto.FLOAT, [None] * rank)])
        return self.node("Loop", [self.const(1, np.int64, "trips"), ""], (None,) * (rank + 1),
                         body=body)

    def mark_output(self, t: str) -> None:
        if t not in self.outputs:
            self.outputs.append(t)
        self.freeze(t)

    # blocks -----------------------------------------------------------------------------
    def image_carriers(self, x: str) -> list[str]:
        ops = ["BatchNormalization", "InstanceNormalization", "PRelu", "Add", "Sub", "Mul",
               "Div"]
        return ops + (["DepthwiseConv"] if self.shape[x][1] > 1 else [])

    def unit(self, x: str) -> str:
        """Conv, carriers, activation, maybe a spatial op."""
        h = min(self.shape[x][2:])
        k = self.pick([1, 3] if h >= 3 else [1])
        stride = self.pick([1, 1, 2]) if h >= 4 else 1
        y = self.conv(x, self.int(3, 8), k, self.pick([0, k // 2]), stride)
        for _ in range(self.count(0, 2)):
            y = self.carrier(y, self.choose(self.image_carriers(y)))
        y = self.act(y, self.choose(ACTIVATIONS))
        return self.spatial(y) if self.chance(2) else y

    def residual(self, x: str) -> str:
        ch = self.chan.get(x)
        width = self.shape[x][1]
        if ch and self.maybe(2) and min(self.shape[x][2:]) >= 3:
            rels = list(ch.rels)
            skip = x
        else:
            width = self.int(3, 8)
            rels = self.draw_rels(width)
            skip = self.conv(x, width, 1, 0, rels=rels)
        branch = self.conv(x, width, 3 if min(self.shape[x][2:]) >= 3 else 1, None, rels=rels)
        for _ in range(self.count(0, 1)):
            branch = self.carrier(branch, self.choose(["BatchNormalization", "Add", "Mul"]))
        y = self.join(branch, skip, self.choose(["Add", "Add", "Sub", "Mul"]))
        return self.act(y, self.choose(ACTIVATIONS))

    def concat_block(self, x: str) -> str:
        parts = []
        for _ in range(2):
            k = self.pick([1, 3])
            y = self.conv(x, self.int(2, 6), k, k // 2)
            parts.append(self.act(y, self.choose(ACTIVATIONS)))
        if not self.opts.plain and self.maybe(3):
            parts.append(x)
        self.rng.shuffle(parts)
        return self.concat(parts)

    def channels_last(self, x: str) -> str:
        y = self.transpose(x, [0, 2, 3, 1])
        y = self.matmul(y, self.int(3, 8))
        y = self.act(y, self.choose(ACTIVATIONS))
        return self.transpose(y, [0, 3, 1, 2])

    def upconv(self, x: str) -> str:
        y = self.conv_transpose(x, self.int(3, 8))
        return self.act(y, self.choose(ACTIVATIONS))

    def roundtrip(self, x: str) -> str:
        kind = self.choose(["squeeze", "swap", "act"])
        if kind == "squeeze":
            return self.squeeze_roundtrip(x)
        if kind == "swap":
            return self.transpose(x, [0, 1, 3, 2])
        return self.act(x, self.choose(["Identity", "Dropout", "Cast"]))

    def to_features(self, x: str) -> str:
        """(N, C, H, W) -> (N, F)."""
        kind = self.choose(["gap", "gmp", "reduce", "flatten", "reshape"])
        if kind in ("gap", "gmp"):
            op = "GlobalAveragePool" if kind == "gap" else "GlobalMaxPool"
            y = self.node(op, [x], (*self.shape[x][:2], 1, 1))
            y = self._spatial_rels(x, y, op, padded=False)
            return self.pick([self.flatten, self.reshape, self.squeeze_spatial])(y)
        if kind == "reduce":
            return self.reduce(x, self.pick(["ReduceMean", "ReduceMax", "ReduceSum"]),
                               self.pick([[2, 3], *self.neg([[-2, -1]])]), False)
        return self.flatten(x) if kind == "flatten" else self.reshape(x)

    def dense(self, x: str) -> str:
        """Gemm or MatMul, carriers, activation on (N, F) or (N, T, F) features."""
        width = self.int(3, 10)
        rank2 = len(self.shape[x]) == 2
        y = self.gemm(x, width) if rank2 and self.coin() else self.matmul(x, width)
        carriers = ["PRelu", "Add", "Sub", "Mul", "Div"]
        if rank2 or not self.opts.plain:  # on (N, T, C) they normalize T, not the channels
            carriers += ["BatchNormalization"]
        if not rank2 and not self.opts.plain:
            carriers += ["InstanceNormalization"]
        for _ in range(self.count(0, 2)):
            y = self.carrier(y, self.choose(carriers))
        return self.act(y, self.choose(ACTIVATIONS))

    def heads(self, x: str) -> None:
        for _ in range(self.choose([1, 1, 2])):
            out = self.int(2, 4)
            rank2 = len(self.shape[x]) == 2
            y = self.gemm(x, out) if rank2 and self.coin() else self.matmul(x, out)
            self.mark_output(y)

    def extras(self, x: str) -> str:
        """Non-plain graphs: subgraph readers, a middle tensor as output, freeze paths."""
        if self.opts.plain:
            return x
        if self.chance(3):
            self.subgraph_reader(x)
        if self.chance(6):
            self.mark_output(x)
        if self.chance(8):
            self.shape_reader(x)
        return self.oddity(x) if self.chance(4) else x

    def oddity(self, x: str) -> str:
        """Legal but unusual uses of a tracked tensor (most must freeze its group)."""
        rank = len(self.shape[x])
        kinds = ["self_join", "self_concat", "mask_used", "shared"]
        kinds += ["mask", "indices_used"] if rank == 4 else ["gemm_bias"] if rank == 2 else []
        kinds += ["empty_axes"] if self.opset >= 18 else []
        kind = self.choose(kinds)
        if kind == "self_join":
            return self.join(x, x, self.pick(["Add", "Sub", "Mul"]))
        if kind == "self_concat":
            return self.concat([x, x], self._axis(x))
        if kind == "mask":
            self.freeze(x)
            mask = self.const(self.rng.uniform(0.5, 1.5, (1, 1, *self.shape[x][2:])))
            return self.node("Mul", [x, mask], self.shape[x])
        if kind == "mask_used":
            self.freeze(x)
            y = self.node("Dropout", [x], self.shape[x], outputs=2)
            mask = self.nodes[-1].output[1]
            keep = self.node("Cast", [mask], self.shape[x], to=TensorProto.FLOAT)
            return self.node("Mul", [y, keep], self.shape[x])
        if kind == "indices_used":
            return self._indices_used(x)
        if kind == "gemm_bias":
            self.freeze(x)
            n, c = self.shape[x]
            w = self.const(self.rng.standard_normal((c, c)) / np.sqrt(c), hint="gemmw")
            return self.node("Gemm", [x, w, x], (n, c))
        if kind == "empty_axes":
            return self._empty_axes(x)
        return self._shared(x)

    def _indices_used(self, x: str) -> str:
        self.freeze(x)
        _n, _c, _h, _w = self.shape[x]
        y = self.node("MaxPool", [x], self.shape[x], outputs=2, kernel_shape=[1, 1])
        idx = self.node("Cast", [self.nodes[-1].output[1]], self.shape[x], to=TensorProto.FLOAT)
        small = self.node("Mul", [idx, self.const(1e-3)], self.shape[x])
        return self.node("Add", [y, small], self.shape[x])

    def _empty_axes(self, x: str) -> str:
        """ReduceMean over an empty axes list: everything, or nothing (noop_with_empty_axes)."""
        noop = 1 if self.bug("reduce_empty_axes") else self.pick([0, 1])
        shape = self.shape[x] if noop else (1,) * len(self.shape[x])
        r = self.node("ReduceMean", [x, self.const(np.zeros(0), np.int64, "axes")], shape,
                      noop_with_empty_axes=noop)
        if noop:
            return self.set_chan(r, self.chan.get(x))
        self.freeze(x)
        return self.node("Mul", [x, r], self.shape[x])

    def _shared(self, x: str) -> str:
        """A second Conv / MatMul reusing a weight initializer of an earlier producer."""
        axis, rank = self._axis(x), len(self.shape[x])
        c = self.shape[x][axis]
        op = "Conv" if axis == 1 and rank >= 3 else "MatMul" if axis == rank - 1 else None
        for name, group_op in self.groups.items():
            w = self.weights.get(name)
            if w is None or name in self.indirect or group_op != op:
                continue
            if op == "Conv" and w.shape[1] == c and w.ndim == rank and w.shape[2] == 1:
                self.freeze(x)
                return self.node("Conv", [x, name], (*self.shape[x][:1], w.shape[0],
                                                      *self.shape[x][2:]))
            if op == "MatMul" and w.shape[0] == c:
                self.freeze(x)
                return self.node("MatMul", [x, name], (*self.shape[x][:-1], w.shape[1]))
        return x


    # result -----------------------------------------------------------------------------
    def plants(self) -> list[Plant]:
        """Per group: channels removable at every read point where they are read (relations,
        zero columns); a group keeps one channel per piece a Split or Slice cut it into."""
        verdict: dict[str, dict[int, bool]] = {}
        for t, readers in self.reads.items():
            ch = self.chan.get(t)
            if ch is None:
                continue
            folds = all(f for f, _ in readers)
            ok = {r.dst for r in ch.rels if r.kind != "const" or r.zero or folds}
            ok |= frozenset.intersection(*(z for _, z in readers))
            for c in range(ch.size):
                group, local = ch.owner(c)
                if group is not None:
                    seen = verdict.setdefault(self.canon(group), {})
                    seen[local] = seen.get(local, True) and c in ok
        frozen = {self.canon(g) for g in self.frozen}
        return [Plant(g, self.groups[g], self._capped(g, seen))
                for g, seen in verdict.items() if g not in frozen]

    def _capped(self, group: str, seen: dict[int, bool]) -> int:
        """Removable channels, one kept per piece (exact mode never empties a group)."""
        cuts = sorted({0, self.width(group)} | self.cuts.get(group, set()))
        total = 0
        for a, b in itertools.pairwise(cuts):
            found = sum(seen.get(c, False) for c in range(a, b))
            total += min(found, b - a - 1)
        return total

    def width(self, group: str) -> int:
        return self.widths[group]

    def _materialize_weights(self) -> list[onnx.NodeProto]:
        """Weights behind a Constant node, a Transpose or a float16 Cast (folded on load)."""
        nodes = []
        for name, how in self.indirect.items():
            value = self.weights.pop(name)
            if how == "Constant":
                nodes.append(helper.make_node("Constant", [], [name], name=self._node_name(how),
                                              value=numpy_helper.from_array(value)))
                continue
            perm = [1, 0, *range(2, value.ndim)]
            stored = value.transpose(perm) if how == "Transpose" else value.astype(np.float16)
            self.weights[name + "_src"] = np.ascontiguousarray(stored)
            attrs = {"perm": perm} if how == "Transpose" else {"to": TensorProto.FLOAT}
            nodes.append(helper.make_node(how, [name + "_src"], [name],
                                          name=self._node_name(how), **attrs))
            self.ops.add(how)
        return nodes

    def build(self) -> Case:
        for t in self.outputs:
            self.freeze(t)
        self.nodes[:0] = self._materialize_weights()
        outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(self.shape[o]))
                   for o in self.outputs]
        inits = [numpy_helper.from_array(v, k) for k, v in self.weights.items()]
        graph = helper.make_graph(self.nodes, "fuzz", self.inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        return Case(model, list(self.bools), self.plants(), set(self.ops), self.opts.plain,
                    dict(self.int_inputs))


def _image(b: Builder) -> str:
    n = b.batch
    h = b.int(5, 8)
    x = b.input((n, b.int(1, 3), h, b.pick([h, h, 6])))
    if b.opset == 9 and b.chance(2):  # Upsample exists at opset 9 only
        x = b.upsample(x)
    for _ in range(b.count(1, 3)):
        block = b.choose(["unit", "unit", "residual", "concat_block", "channels_last",
                          "roundtrip", "spatial", "spatial", "reshape_block", "split_block",
                          "upconv"])
        x = getattr(b, block)(x)
        x = b.extras(x)
    if b.chance(5):
        b.mark_output(b.conv(x, b.int(2, 4), 1, 0))
        return ""
    return b.to_features(x)


def _features(b: Builder) -> str:
    x = b.input((b.batch, b.int(2, 10)))
    for _ in range(b.count(1, 3)):
        x = b.concat([b.dense(x), b.dense(x)]) if b.chance(4) else b.dense(x)
        x = b.extras(x)
    return x


def _sequence(b: Builder) -> str:
    x = b.embedding() if b.chance(3) else b.input((b.batch, b.int(2, 5), b.int(2, 8)))
    for _ in range(b.count(1, 3)):
        kind = b.choose(["dense", "dense", "conv1d", "recurrent", "split"])
        if kind == "conv1d":  # channels to axis 1, a 1-D convolution, and back
            y = b.transpose(x, [0, 2, 1])
            k = b.pick([1, 3])
            y = b.act(b.conv(y, b.int(3, 6), k, k // 2), b.choose(ACTIVATIONS))
            x = b.transpose(y, [0, 2, 1])
        elif kind == "recurrent":
            x = b.recurrent(x)
        elif kind == "split":
            x = b.pick(b.split(x)) if b.coin() else b.slice_channels(x)
        else:
            x = b.dense(x)
        x = b.extras(x)
    if b.chance(3):
        return x
    if b.chance(2):
        return b.take_step(x)
    return b.reduce(x, b.pick(["ReduceMean", "ReduceMax"]), [1], False)


def build_case(index: Callable[[int], int], plain: bool = False,
               bugs: frozenset[str] | None = None) -> Case:
    """A random model; every choice goes through `index(n)` (an int in [0, n)).
    `plain` models promise how many channels exact mode removes."""
    opts = Options(plain, KNOWN_BUGS if bugs is None else bugs)
    opset = OPSETS[index(len(OPSETS))]
    names = ("unique", "unique", "unnamed", "dup", "mixed")[index(5)]
    b = Builder(index, opset, index(2**16), names, opts)
    x = (_image, _image, _image, _features, _sequence)[index(5)](b)
    if x:
        if len(b.shape[x]) == 2 and b.chance(2):
            x = b.dense(x)
        b.heads(x)
    return b.build()


@st.composite
def graphs(draw, plain: bool = False, bugs: frozenset[str] | None = None) -> Case:
    """Hypothesis strategy over `build_case` (its structural choices shrink)."""
    return build_case(lambda n: draw(_index(n)), plain, bugs)


def sample_case(seed: int, plain: bool = False, bugs: frozenset[str] | None = None) -> Case:
    """The same generator driven by a numpy rng: fast and uniform, for coverage checks."""
    rng = np.random.default_rng(seed)
    return build_case(lambda n: int(rng.integers(n)), plain, bugs)
