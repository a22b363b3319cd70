"""Validation inputs that exercise the model: every branch, meaningful ids, sizes it accepts.

Zeros for every boolean and integer input and 1 for every dynamic dimension validate one
branch of an `If`, an embedding's row 0 only, and a U-Net whose Concat needs even sizes not
at all. Here booleans come all-False, all-True and random; an integer that indexes a table
(Gather, GatherElements, OneHot, EmbedLayerNormalization...) gets ids in [0, rows); other
integers small non-negative values; dynamic dimensions the first of 1, graph hints and
typical sizes on which the ORIGINAL model runs. Only when none runs is the input refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from . import weights
from .errors import BadDataError, BadModelError
from .runtime import first_line, input_specs, is_float, run_error, session

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Shapes = Mapping[str, Sequence[int]]

TYPICAL_SIZES = (32, 64, 224)
MAX_SIZES = 8  # sizes tried per model: each try runs the original once
SMALL = 4  # integers of unknown use are drawn from [0, SMALL)
INT_MODES = ("random", "ones", "zeros")

# (op, input index) of an index read -> (input holding the table, default axis; None: any)
_INDEX_READS = {
    ("Gather", 1): (0, 0), ("GatherElements", 1): (0, 0), ("GatherND", 1): (0, None),
    ("ScatterElements", 1): (0, 0), ("ScatterND", 1): (0, None),
    ("EmbedLayerNormalization", 0): (2, 0), ("EmbedLayerNormalization", 1): (3, 0),
}
# ops an id passes through unchanged on its way to the table it indexes
_TRANSPARENT = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose",
                "Concat", "Expand", "Tile", "Slice", "Split"}


@dataclass(frozen=True)
class _Draw:
    """How one feed dict is drawn: dynamic size, integer mode, boolean mode, seed."""

    size: int
    ints: str = "random"
    bools: str = "random"
    seed: int = 0


def random_feeds(model: onnx.ModelProto, *, shapes: Shapes | None = None, seed: int = 0,
                 batch: int = 1, size: int = 1) -> Feeds:
    """Standard-normal floats, ids within their table, random booleans; dynamic dims are
    `batch` on axis 0 and `size` elsewhere. Draws only: nothing is run."""
    return _Drawer(model, shapes or {}, batch).draw(_Draw(size, seed=seed))


def validation_feeds(model: onnx.ModelProto, shapes: Shapes | None = None, *, seed: int = 0,
                     count: int = 3, batch: int = 1,
                     fallback: Sequence[Mapping[str, np.ndarray]] = ()) -> list[Feeds]:
    """`count` seeded feed dicts the original model runs on, plus all-False / all-True
    variants of booleans. Sizes for dynamic dims are searched (1, graph hints, typical
    sizes; when 1 runs, one larger size that runs is added too). When none runs, the first
    sample of `fallback` (calibration data) stands in; without one, the inputs are refused
    with a message naming them."""
    drawer = _Drawer(model, shapes or {}, batch)
    sess = _session(model)
    found, first_error = None, None
    for draw in _tries(drawer, seed):
        error = run_error(sess, drawer.draw(draw))
        if error is None:
            found = draw
            break
        first_error = first_error or error
    if found is None:
        if fallback:
            return [{k: np.asarray(v)[:1] for k, v in fallback[0].items()}]
        raise BadDataError(drawer.refusal(first_error))
    variants = [_Draw(found.size, found.ints, "random", seed + i) for i in range(count)]
    if drawer.has_bools:
        variants += [_Draw(found.size, found.ints, b, seed) for b in ("false", "true")]
    out = [drawer.draw(variants[0])]
    for draw in variants[1:]:
        feeds = drawer.draw(draw)
        error = run_error(sess, feeds)
        if error is None:
            out.append(feeds)
        else:
            log.info("validation variant %s dropped: the original fails on it: %s", draw, error)
    return out + _larger(drawer, sess, found)


def _larger(drawer: _Drawer, sess, found: _Draw, tries: int = 3) -> list[Feeds]:
    """One more feed dict at the first larger size the original runs on, when size 1 was
    chosen: at size 1 a convolution sees mostly padding, at 32 mostly the interior."""
    if found.size != 1 or not drawer.dynamic:
        return []
    for size in drawer.sizes()[1:1 + tries]:
        feeds = drawer.draw(replace(found, size=size, seed=found.seed + 1))
        if run_error(sess, feeds) is None:
            return [feeds]
    return []


def _tries(drawer: _Drawer, seed: int) -> Iterator[_Draw]:
    modes = INT_MODES if drawer.has_ints else INT_MODES[:1]
    for size in drawer.sizes():
        for mode in modes:
            yield _Draw(size, mode, "random", seed)


def _session(model: onnx.ModelProto):
    try:
        return session(model)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise BadModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from None


class _Drawer:
    """What the graph says about its inputs, and feed dicts drawn from it."""

    def __init__(self, model: onnx.ModelProto, shapes: Shapes, batch: int) -> None:
        self.specs = input_specs(model)
        unknown = sorted(set(shapes) - set(self.specs))
        if unknown:
            raise BadDataError(f"--input-shape names {', '.join(unknown)}, not an input of the "
                               f"model (inputs: {', '.join(self.specs) or 'none'})")
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.batch = batch
        self.model = model
        index = _GraphIndex(model)
        self.bounds = {name: index.index_bound(name) for name in self.specs}
        self.hints = index.size_hints()
        self.batch_params = {d.dim_param for vi in model.graph.input
                             for d in vi.type.tensor_type.shape.dim[:1]
                             if d.dim_param and len(vi.type.tensor_type.shape.dim) > 1}
        self.unranked = {vi.name for vi in model.graph.input
                         if not vi.type.tensor_type.HasField("shape")}
        kinds = [np.dtype(dtype).kind for _, dtype in self.specs.values()]
        self.has_ints = any(k in "iu" for k in kinds)
        self.has_bools = "b" in kinds

    @property
    def dynamic(self) -> list[str]:
        """Inputs with a dynamic dimension the user did not fix."""
        return [n for n, (dims, _) in self.specs.items() if n not in self.shapes and (
            any(d is None for d in dims) or n in self.unranked)]

    def sizes(self) -> list[int]:
        """Sizes tried on non-batch dynamic axes: 1, hints from the graph, typical sizes
        rounded up to the graph's downsampling step."""
        if not self.dynamic:
            return [1]
        step = self.hints.step
        typical = [math.ceil(s / step) * step for s in TYPICAL_SIZES]
        out: list[int] = []
        for s in [1, *self.hints.sizes, step, *typical]:
            if s not in out and 0 < s <= 4096:
                out.append(s)
        return out[:MAX_SIZES]

    def shape(self, name: str, size: int) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        vi = next(v for v in self.model.graph.input if v.name == name)
        dims = vi.type.tensor_type.shape.dim
        out = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                out.append(d.dim_value)
            elif (i == 0 and len(dims) > 1) or (d.dim_param and d.dim_param in self.batch_params):
                out.append(self.batch)
            else:
                out.append(size)
        return tuple(out)

    def draw(self, how: _Draw) -> Feeds:
        rng = np.random.default_rng(how.seed)
        feeds = {}
        for name, (_, dtype) in self.specs.items():
            shape = self.shape(name, how.size)
            feeds[name] = self._value(name, np.dtype(dtype), shape, how, rng)
        return feeds

    def _value(self, name: str, dtype: np.dtype, shape: tuple[int, ...], how: _Draw,
               rng: np.random.Generator) -> np.ndarray:
        if is_float(dtype):
            return rng.standard_normal(shape).astype(dtype)
        if dtype.kind == "b":
            if how.bools == "random":
                return rng.integers(0, 2, shape).astype(bool)
            return np.full(shape, how.bools == "true")
        if dtype.kind in "iu":
            if how.ints != "random":
                return np.full(shape, 1 if how.ints == "ones" else 0, dtype=dtype)
            bound = self.bounds.get(name) or SMALL
            return rng.integers(0, max(bound, 1), shape).astype(dtype)
        return np.full(shape, "", dtype=object) if dtype.kind == "O" else np.zeros(shape, dtype)

    def refusal(self, error: str | None) -> str:
        if self.dynamic:
            names = ", ".join(self.dynamic)
            tried = ", ".join(map(str, self.sizes()))
            return (f"the model does not run on any validation input tried for {names} "
                    f"(dynamic dimensions other than the batch tried at {tried}; the batch at "
                    f"1): {error}; give the shape with "
                    f"--input-shape {self.dynamic[0]}:DxDxD")
        return f"onnxruntime rejected the inputs: {error}"


@dataclass
class _Hints:
    sizes: list[int]
    step: int


class _GraphIndex:
    """Readers, constants and shapes over the graph and its subgraphs (names resolved by
    name only: good enough for hints, which are only tried, never trusted)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.consts: dict[str, onnx.TensorProto] = {}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        self.nodes: list[onnx.NodeProto] = []
        self._walk(model.graph)

    def _walk(self, g: onnx.GraphProto) -> None:
        self.consts.update((t.name, t) for t in g.initializer)
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                             for d in vi.type.tensor_type.shape.dim)
        for node in g.node:
            self.nodes.append(node)
            for i, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((node, i))
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = node.attribute[0].t
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    self._walk(sub)

    def const(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return None if t is None else weights.array(t)

    def dims(self, name: str) -> tuple[int | None, ...] | None:
        return tuple(self.consts[name].dims) if name in self.consts else self.shapes.get(name)

    def index_bound(self, name: str, depth: int = 6) -> int | None:
        """Rows of the smallest table `name` indexes (through pass-through ops), or None."""
        bounds, todo, seen = [], [(name, 0)], set()
        while todo:
            tensor, d = todo.pop()
            if tensor in seen or d > depth:
                continue
            seen.add(tensor)
            for node, i in self.readers.get(tensor, ()):
                bound = self._bound_at(node, i)
                if bound:
                    bounds.append(bound)
                elif node.op_type in _TRANSPARENT and (i == 0 or node.op_type == "Concat"):
                    todo.extend((o, d + 1) for o in node.output)
        return min(bounds) if bounds else None

    def _bound_at(self, node: onnx.NodeProto, i: int) -> int | None:
        if node.op_type == "OneHot" and i == 0:
            depth = self.const(node.input[1]) if len(node.input) > 1 else None
            return int(depth.reshape(-1)[0]) if depth is not None and depth.size else None
        how = _INDEX_READS.get((node.op_type, i))
        if how is None or len(node.input) <= how[0]:
            return None
        dims = self.dims(node.input[how[0]])
        if not dims:
            return None
        if how[1] is None:  # GatherND / ScatterND: any leading axis may be indexed
            known = [d for d in dims if d]
            return min(known) if known and len(known) == len(dims) else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), how[1])
        axis = axis + len(dims) if axis < 0 else axis
        return dims[axis] if 0 <= axis < len(dims) and dims[axis] else None

    def size_hints(self) -> _Hints:
        """Sizes a dynamic axis may need: the product of the downsampling strides (a Concat
        of upsampled features needs a multiple of it), pads + 1 (reflect padding needs a
        longer signal), and the positive values of Reshape shapes."""
        step, sizes = 1, []
        for node in self.nodes:
            if node.op_type in ("Conv", "MaxPool", "AveragePool", "ConvTranspose"):
                strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [])
                if node.op_type != "ConvTranspose":
                    step *= max(strides, default=1)
            elif node.op_type in ("Resize", "Upsample"):
                step *= self._downscale(node)
            elif node.op_type == "Pad" and len(node.input) > 1:
                pads = self.const(node.input[1])
                if pads is not None and pads.size:
                    sizes.append(int(pads.max()) + 1)
            elif node.op_type == "Reshape" and len(node.input) > 1:
                target = self.const(node.input[1])
                if target is not None:
                    sizes.extend(int(v) for v in target.reshape(-1) if v > 1)
        step = min(step, 64)
        multiples = sorted({math.ceil(s / step) * step for s in sizes if s > 1})
        return _Hints(multiples[:3], step)

    def _downscale(self, node: onnx.NodeProto) -> int:
        """1/scale of a Resize that shrinks by an integer factor, else 1."""
        index = 2 if node.op_type == "Resize" else 1
        scales = self.const(node.input[index]) if len(node.input) > index else None
        if scales is None or not scales.size:
            return 1
        factors = [round(1 / s) for s in scales.reshape(-1) if 0 < s < 1]
        return max((f for f in factors if f > 1), default=1)
