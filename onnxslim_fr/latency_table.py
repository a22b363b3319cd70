"""Per-layer latency tables: what a Conv / Gemm / MatMul costs in milliseconds at a width.

`--target latency` allocates channels by measured cost, not MACs: onnxruntime's blocked
convolutions run a multiple of 8 channels much faster per MAC than the counts between, and
a small layer costs its launch overhead whatever its width. Each costed layer is rebuilt
alone (same op, attributes and input size, random weights) at a small grid of input x
output widths and timed on the current execution provider at the latency batch; between
grid points the table is interpolated bilinearly, and made non-decreasing along each axis
(a narrower layer is never charged more: noise must not make the allocation prefer it).
Costs count the time above each layer's floor (its narrowest measured widths): per-node
overhead no width removes must not make a latency ratio look reachable only by removing
nearly every channel (`Curve`).

Three layers of the same shape share one entry, and entries are cached on disk (a JSON file
per provider, onnxruntime version, batch and threads, under ``$ONNXSLIM_FR_CACHE`` or
``~/.cache/onnxslim-fr``), so a model is measured once. A layer that cannot be rebuilt
alone (grouped but not depthwise Conv, ConvTranspose, recurrent, MatMul of two activations)
is charged its MACs at the rate measured on the layers that could.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .atomic import write_atomic
from .graph import Graph
from .lumping.budget import allowed_counts
from .report import _static_shapes as static_shapes
from .runtime import current_provider, runner, session

log = logging.getLogger(__name__)

GRID = 4  # widths measured per axis (the smallest allowed, the full one, two between)


@dataclass(frozen=True)
class Layer:
    """One layer to rebuild alone: `op` with `attrs`, reading [batch, cin, *spatial]
    (Conv) or [*lead, cin] (Gemm/MatMul), writing `cout`; `depthwise` scales both."""

    op: str
    attrs: tuple[tuple[str, object], ...]
    cin: int
    cout: int
    spatial: tuple[int, ...]  # Conv: input H, W; Gemm/MatMul: leading dims after the batch
    kernel: tuple[int, ...] = ()
    depthwise: bool = False
    trans_b: bool = False

    def key(self, ci: int, co: int) -> str:
        return f"{self.op}{list(self.attrs)}|{self.spatial}|{self.kernel}|dw{self.depthwise}" \
               f"|tb{self.trans_b}|{ci}x{co}"


def layer_of(node: onnx.NodeProto, graph: Graph, shapes: Graph) -> Layer | None:
    """The standalone layer `node` runs, or None when it cannot be rebuilt alone."""
    w = graph.initializers.get(node.input[1]) if len(node.input) > 1 else None
    x = shapes.shape(node.input[0])
    if w is None or x is None or not all(isinstance(d, int) and d > 0 for d in x[1:]):
        return None
    attrs = tuple(sorted((a.name, _plain(helper.get_attribute_value(a)))
                         for a in node.attribute))
    if node.op_type == "Conv":
        group = dict(attrs).get("group", 1)
        depthwise = group > 1 and group == x[1] == w.dims[0] and w.dims[1] == 1
        if group != 1 and not depthwise:
            return None
        return Layer("Conv", attrs, int(x[1]), int(w.dims[0]), tuple(x[2:]), tuple(w.dims[2:]),
                     depthwise)
    if node.op_type == "Gemm" and len(x) == 2 and not dict(attrs).get("transA", 0):
        trans_b = bool(dict(attrs).get("transB", 0))
        cin, cout = (w.dims[1], w.dims[0]) if trans_b else (w.dims[0], w.dims[1])
        return Layer("Gemm", attrs, int(cin), int(cout), (), (), trans_b=trans_b)
    if node.op_type == "MatMul" and len(w.dims) == 2 and len(x) >= 2:
        return Layer("MatMul", (), int(w.dims[0]), int(w.dims[1]), tuple(x[1:-1]))
    return None


def _plain(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else \
        value.decode() if isinstance(value, bytes) else value


def grid(full: int, counts: np.ndarray) -> list[int]:
    """At most GRID widths of the allowed `counts`, evenly spread, the full width last."""
    counts = np.asarray(counts)
    picks = np.unique(np.round(np.linspace(0, len(counts) - 1, min(GRID, len(counts)))))
    return sorted({int(counts[int(i)]) for i in picks} | {full})


class Table:
    """Milliseconds of standalone layers at given widths, measured once and cached."""

    def __init__(self, batch: int = 1, threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, runs: int = 10,
                 min_seconds: float = 0.02) -> None:
        self.batch, self.threads, self.runs, self.min_seconds = batch, threads, runs, min_seconds
        base = Path(cache_dir or os.environ.get("ONNXSLIM_FR_CACHE")
                    or Path.home() / ".cache" / "onnxslim-fr")
        name = f"{current_provider()}-ort{ort.__version__}-b{batch}-t{threads or 'auto'}.json"
        self.path = base / "latency" / name
        self.entries: dict[str, float] = self._read()
        self.measured = 0  # entries timed by this table (the rest came from the cache)

    def _read(self) -> dict[str, float]:
        try:
            return {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def ms(self, layer: Layer, ci: int, co: int) -> float:
        key = layer.key(ci, co)
        if key not in self.entries:
            self.entries[key] = self._time(layer, ci, co)
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        """Merge into the file on disk (another run may have added entries meanwhile)."""
        if not self.measured:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.entries}
            write_atomic(self.path, json.dumps(merged, indent=0, sort_keys=True).encode())
        except OSError as exc:  # a read-only home: the tables are only lost, not wrong
            log.warning("latency tables not cached at %s: %s", self.path, exc)

    def _time(self, layer: Layer, ci: int, co: int) -> float:
        model, feeds = standalone(layer, ci, co, self.batch)
        go = runner(session(model, self.threads), feeds)
        go()
        go()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.runs or time.perf_counter() - start < self.min_seconds:
            tick = time.perf_counter()
            go()
            times.append((time.perf_counter() - tick) * 1e3)
            if len(times) >= 20 * self.runs:
                break
        return float(np.median(times))


def standalone(layer: Layer, ci: int, co: int, batch: int
               ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`layer` alone at ci input / co output channels, and an input to run it on."""
    rng = np.random.default_rng(0)
    attrs = dict(layer.attrs)
    if layer.op == "Conv":
        x_shape = (batch, ci, *layer.spatial)
        w_shape = (ci, 1, *layer.kernel) if layer.depthwise else (co, ci, *layer.kernel)
        if layer.depthwise:
            attrs["group"] = ci
    elif layer.op == "Gemm":
        x_shape, w_shape = (batch, ci), (co, ci) if layer.trans_b else (ci, co)
    else:
        x_shape, w_shape = (batch, *layer.spatial, ci), (ci, co)
    w = numpy_helper.from_array((rng.standard_normal(w_shape) * 0.05).astype(np.float32), "w")
    node = helper.make_node(layer.op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, x_shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


class Curve:
    """ms of one layer above its floor at (fraction of input width, fraction of output
    width): bilinear between the measured grid, non-decreasing along both axes.

    The floor, the layer at its narrowest grid widths, is what no channel count removes
    (the kernel launch, onnxruntime's per-node overhead): a small model's layers are
    mostly floor, and charging it would make a 50% latency cut look reachable only by
    removing nearly every channel. So costs, and a `--ratio` of them, count the part of the
    time that shrinks with width; `floor` and `full` tell the note how large each part is."""

    def __init__(self, table: Table, layer: Layer, ins: list[int], outs: list[int]) -> None:
        if layer.depthwise:  # one width: input and output channels are the same
            outs = [layer.cout]
        values = np.array([[table.ms(layer, ci, ci if layer.depthwise else co) for co in outs]
                           for ci in ins])
        self.values = np.maximum.accumulate(np.maximum.accumulate(values, axis=0), axis=1)
        self.xs, self.ys = np.asarray(ins, float), np.asarray(outs, float)
        self.layer = layer
        self.floor, self.full = float(self.values[0, 0]), float(self.values[-1, -1])

    def __call__(self, frac_in: float, frac_out: float) -> float:
        ci = frac_in * self.layer.cin
        co = ci if self.layer.depthwise else frac_out * self.layer.cout
        i = np.clip(np.searchsorted(self.xs, ci) - 1, 0, max(len(self.xs) - 2, 0))
        j = np.clip(np.searchsorted(self.ys, co) - 1, 0, max(len(self.ys) - 2, 0))
        return _bilinear(self.values, self.xs, self.ys, int(i), int(j), ci, co) - self.floor


def _bilinear(v: np.ndarray, xs: np.ndarray, ys: np.ndarray, i: int, j: int,
              x: float, y: float) -> float:
    i2, j2 = min(i + 1, len(xs) - 1), min(j + 1, len(ys) - 1)
    tx = 0.0 if i2 == i else float(np.clip((x - xs[i]) / (xs[i2] - xs[i]), 0.0, 1.0))
    ty = 0.0 if j2 == j else float(np.clip((y - ys[j]) / (ys[j2] - ys[j]), 0.0, 1.0))
    top = v[i, j] * (1 - ty) + v[i, j2] * ty
    bottom = v[i2, j] * (1 - ty) + v[i2, j2] * ty
    return float(top * (1 - tx) + bottom * tx)


def layer_costs(graph: Graph, feeds: Mapping[str, np.ndarray] | None, table: Table,
                round_to: int = 1) -> dict[int, Curve]:
    """Measured ms (node index -> at width fractions) of every layer that can be rebuilt
    alone, at the sizes of `feeds` with the batch replaced by the table's. Grids are
    taken among the counts the allocation may choose (`allowed_counts(size, round_to)`)."""
    shapes = static_shapes(graph.model, feeds)
    out = {}
    for index, node in enumerate(graph.nodes):
        layer = layer_of(node, graph, shapes) if node.op_type in ("Conv", "Gemm", "MatMul") \
            else None
        if layer is not None:
            out[index] = Curve(table, layer,
                               grid(layer.cin, allowed_counts(layer.cin, round_to)),
                               grid(layer.cout, allowed_counts(layer.cout, round_to)))
    table.save()
    log.info("latency tables: %d layers, %d widths measured, %d from %s", len(out),
             table.measured, len(table.entries) - table.measured, table.path)
    return out


def measure_layers(graph: Graph, feeds: Mapping[str, np.ndarray] | None, batch: int,
                   threads: int | None, round_to: int, notes: list[str]
                   ) -> dict[int, Curve]:
    """`layer_costs` at the latency batch and threads, with a note that says how many
    layers were timed, how many widths came from the cache, and how much of the layers'
    time is floor that no width removes (the ratio applies to the rest)."""
    table = Table(batch, threads)
    costs = layer_costs(graph, feeds, table, round_to)
    full = sum(c.full for c in costs.values())
    floor = sum(c.floor for c in costs.values()) / full if full > 0 else 0.0
    notes.append(f"target latency: {len(costs)} layers costed by their measured ms at batch "
                 f"{batch} ({table.measured} widths timed, {len(table.entries) - table.measured}"
                 f" from the cache {table.path}); {floor:.0%} of their time does not shrink "
                 f"with width, --ratio applies to the rest")
    return costs
