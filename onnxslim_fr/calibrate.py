"""Calibration data in, streaming channel statistics out.

Data adapters accept an `.npz`/`.npy` path, a dict of stacked arrays (first axis =
samples), an iterable of feed dicts, or an onnxruntime `CalibrationDataReader` (anything
with `get_next()`). Statistics are float64 count, sums and Gram matrices per read point,
updated batch by batch: memory is O(C^2) per read point, never O(samples).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from .channels.layout import Layout
from .channels.structures import GroupSet
from .errors import BadDataError
from .graph import Graph
from .lumping.consumers import occurrences
from .runtime import input_specs, is_float, session

DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]
LABELS = "labels"


@dataclass
class Dataset:
    """Checked batches of feeds, plus labels when the source had them."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    fixed_batch: int | None = None  # the model's inputs take exactly this many samples

    @property
    def samples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.batches)

    def head(self, limit: int) -> list[dict[str, np.ndarray]]:
        """The batches of the first `limit` samples (the last one cut to fit; whole batches,
        at least one, when the model's batch size is fixed)."""
        if self.fixed_batch:
            return self.batches[:max(1, limit // self.fixed_batch)]
        out, seen = [], 0
        for batch in self.batches:
            if seen >= limit:
                break
            n = len(next(iter(batch.values())))
            out.append({k: v[: limit - seen] for k, v in batch.items()})
            seen += min(n, limit - seen)
        return out


def load_data(source: DataSource, model: onnx.ModelProto, *, batch_size: int = 64,
              max_samples: int | None = None, what: str = "calibration data") -> Dataset:
    """Read and check calibration or hold-out data (`what`, for messages) against the
    model's inputs: names, shapes, dtypes, ranges, labels; empty data is refused."""
    specs = input_specs(model)
    if isinstance(source, str | os.PathLike):
        source = _read_file(Path(source))
    if isinstance(source, Mapping):
        return _from_arrays(dict(source), specs, batch_size, max_samples, what)
    fixed = fixed_batch(specs)
    if hasattr(source, "get_next"):
        source = iter(source.get_next, None)
    if not isinstance(source, Iterable):
        raise BadDataError(f"{what} must be a .npz/.npy path, a dict of arrays, an iterable of "
                           f"feed dicts or a CalibrationDataReader, not {type(source).__name__}")
    batches, labels, seen = [], [], 0
    for feeds in source:
        if not isinstance(feeds, Mapping):
            raise BadDataError(f"{what}: each item must be a dict of input name -> array, "
                               f"not {type(feeds).__name__}")
        feeds = dict(feeds)
        label = feeds.pop(LABELS, None)
        batch = _checked(feeds, specs, what)
        n = len(next(iter(batch.values())))
        label = None if label is None else _labels(label, n)
        if n == 0:
            continue
        if fixed and n != fixed:
            raise BadDataError(f"{what}: the model takes batches of exactly {fixed} samples, "
                               f"got a batch of {n}")
        if max_samples is not None and seen + n > max_samples and not fixed:
            batch = {k: v[: max_samples - seen] for k, v in batch.items()}
            label = None if label is None else label[: max_samples - seen]
        batches.append(batch)
        labels.append(label)
        seen += len(next(iter(batch.values())))
        if max_samples is not None and seen >= max_samples:
            break
    if not batches:
        raise BadDataError(f"{what} is empty (no samples)")
    have = [lab for lab in labels if lab is not None]
    return Dataset(batches, np.concatenate(have) if len(have) == len(labels) else None, fixed)


def fixed_batch(specs: dict) -> int | None:
    """The batch size every input fixes on its first axis, if any does."""
    sizes = {dims[0] for dims, _ in specs.values() if dims and dims[0] is not None}
    return sizes.pop() if len(sizes) == 1 else None


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BadDataError(f"data file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadDataError(f"cannot read {path} as .npz/.npy: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return {"": loaded}
    return {k: loaded[k] for k in loaded.files}


def _from_arrays(arrays: dict[str, np.ndarray], specs: dict, batch_size: int,
                 max_samples: int | None, what: str = "calibration data") -> Dataset:
    labels = arrays.pop(LABELS, None)
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {next(iter(specs)): next(iter(arrays.values()))}
    full = _checked(arrays, specs, what)
    n = len(next(iter(full.values())))
    if n == 0:
        raise BadDataError(f"{what} is empty (no samples)")
    labels = None if labels is None else _labels(labels, n)
    n = min(n, max_samples) if max_samples else n
    fixed = fixed_batch(specs)
    if fixed:  # batches of exactly the model's size; a short tail cannot be fed
        if n < fixed:
            raise BadDataError(f"{what} has {n} samples; the model takes batches of exactly "
                               f"{fixed}")
        batch_size, n = fixed, n - n % fixed
    batches = [{k: v[i:i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]
    return Dataset(batches, None if labels is None else labels[:n], fixed)


def _labels(labels: object, samples: int) -> np.ndarray:
    """Class ids, one per sample: accuracy compares them with an arg-max."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        shape = "x".join(map(str, array.shape)) or "scalar"
        raise BadDataError(f"labels must be a 1-D array of integer class ids, got {array.dtype} "
                           f"of shape {shape}")
    if len(array) != samples:
        raise BadDataError(f"labels has {len(array)} entries for {samples} samples")
    return array


def _checked(feeds: dict[str, np.ndarray], specs: dict,
             what: str = "calibration data") -> dict[str, np.ndarray]:
    if not feeds:
        raise BadDataError(f"{what} is empty (no arrays)")
    missing = sorted(set(specs) - set(feeds))
    extra = sorted(set(feeds) - set(specs))
    if missing or extra:
        raise BadDataError(f"data inputs {sorted(feeds)} do not match the model's "
                           f"{sorted(specs)}" + (f" (missing {missing})" if missing else ""))
    out = {name: _fitted(name, np.asarray(feeds[name]), dims, np.dtype(dtype))
           for name, (dims, dtype) in specs.items()}
    counts = {name: len(value) for name, value in out.items()}
    if len(set(counts.values())) > 1:
        raise BadDataError(f"inputs have different numbers of samples: {counts}")
    return out


def _fitted(name: str, value: np.ndarray, dims: tuple, dtype: np.dtype) -> np.ndarray:
    """`value` in the model's dtype; refused when its kind, shape or range does not fit
    (a float64 1e39 would silently become inf in float32, an int64 wrap in int32)."""
    if is_float(dtype) != is_float(value.dtype) or \
            not (is_float(value.dtype) or value.dtype.kind in "iub"):
        raise BadDataError(f"input {name} has dtype {value.dtype}, model expects {dtype}")
    if value.ndim == 0:
        raise BadDataError(f"input {name} is a scalar: data needs a first axis of samples")
    if value.ndim != len(dims) or any(d is not None and d != s
                                      for d, s in zip(dims[1:], value.shape[1:], strict=True)):
        want = "x".join("?" if d is None else str(d) for d in dims)
        raise BadDataError(f"input {name} has shape {'x'.join(map(str, value.shape))}, "
                           f"model expects {want}")
    if is_float(value.dtype) and not _finite(value):
        raise BadDataError(f"input {name} contains NaN or Inf")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = value.astype(dtype, copy=False)
    if is_float(dtype) and not _finite(cast):
        raise BadDataError(f"input {name} has values beyond the range of {dtype} (largest "
                           f"magnitude {float(np.abs(value).max()):.3g})")
    if dtype.kind in "iu" and value.size and value.dtype.kind != "b":
        info = np.iinfo(dtype)
        low, high = value.min(), value.max()
        if low < info.min or high > info.max:
            raise BadDataError(f"input {name} has values in [{low}, {high}], beyond the range "
                               f"of {dtype} [{info.min}, {info.max}]")
    if dtype.kind == "b" and value.dtype.kind != "b" and not np.isin(value, (0, 1)).all():
        raise BadDataError(f"input {name} is boolean, but the data has values other than 0 "
                           "and 1")
    return cast


def _finite(value: np.ndarray) -> bool:
    """All finite; ml_dtypes' bfloat16 / float8 are widened first (no isfinite of their own)."""
    return bool(np.isfinite(value if value.dtype.kind == "f" else value.astype(np.float32)).all())


@dataclass
class PointStats:
    """Running moments of one group's channels at one read point (positions = samples)."""

    count: int
    total: np.ndarray
    gram: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def cov(self) -> np.ndarray:
        m = self.mean
        return self.gram / max(self.count, 1) - np.outer(m, m)


@dataclass
class ChannelStats:
    points: dict[tuple[str, int], PointStats] = field(default_factory=dict)
    samples: int = 0


def collect(model: onnx.ModelProto, groups: GroupSet, data: Dataset) -> ChannelStats:
    """One onnxruntime session with the read points added as outputs; stream the batches."""
    wanted = [(t, g.id) for g in groups.active() for t in g.read_points
              if occurrences(groups, t, g.id)]
    tensors = sorted({t for t, _ in wanted})
    stats = ChannelStats()
    if not tensors:  # onnxruntime would return every output for an empty request
        return stats
    sess = session(with_outputs(model, tensors))
    bar = tqdm(data.batches, desc="calibrating", unit="batch", disable=not sys.stderr.isatty(),
               leave=False)
    for batch in bar:
        values = dict(zip(tensors, sess.run(tensors, batch), strict=True))
        for tensor, gid in wanted:
            for k, _ in occurrences(groups, tensor, gid):  # a repeated group pools them
                rows = channel_rows(values[tensor], groups.layouts[tensor], k)
                point = stats.points.get((tensor, gid))
                if point is None:
                    c = rows.shape[1]
                    point = stats.points[(tensor, gid)] = PointStats(0, np.zeros(c),
                                                                     np.zeros((c, c)))
                point.count += len(rows)
                point.total += np.ones(len(rows), rows.dtype) @ rows  # BLAS, not ufunc reduce
                point.gram += rows.T @ rows
        stats.samples += len(next(iter(batch.values())))
    return stats


def channel_rows(value: np.ndarray, lay: Layout, k: int) -> np.ndarray:
    """(samples*positions, C) view of segment k's channels in an activation, in the
    activation's dtype: products are taken per batch in float32 (BLAS) and accumulated in
    float64, which keeps the sums exact enough and the pass close to onnxruntime's cost.
    Narrower floats (float16, bfloat16) become float32 first: their per-batch sums overflow
    at 65504."""
    if is_float(value.dtype) and value.dtype.itemsize < 4:
        value = value.astype(np.float32)
    idx = lay.feature_index(k)  # (C, q)
    c, q = idx.shape
    if q == 1 and int(idx[-1, 0]) - int(idx[0, 0]) == c - 1:  # a contiguous run of channels
        block = np.moveaxis(value, lay.axis, -1)[..., int(idx[0, 0]):int(idx[0, 0]) + c]
        return block.reshape(-1, c)
    block = np.moveaxis(value, lay.axis, -1)[..., idx]  # (..., C, q)
    return np.moveaxis(block, -1, -2).reshape(-1, c)


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `tensors`, each declared with its real element
    type (a float16 read point declared FLOAT is rejected by onnxruntime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    types = _ElemTypes(model)
    for name in tensors:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(
                name, types[name], None))
    return out


_INT64_OPS = ("Shape", "Size", "ArgMax", "ArgMin", "NonZero")
_BOOL_OPS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or",
             "Xor", "IsNaN", "IsInf")


class _ElemTypes:
    """Element type of a tensor by name: declared (inputs, outputs, value_info), an
    initializer's, or derived from the node that writes it; FLOAT when nothing says."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.known = {t.name: t.data_type for t in g.initializer}
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.type.tensor_type.elem_type:
                self.known[vi.name] = vi.type.tensor_type.elem_type
        self.producer = {o: n for n in g.node for o in n.output if o}

    def __getitem__(self, name: str) -> int:
        for _ in range(64):  # walk back through type-preserving ops
            if name in self.known:
                return self.known[name]
            node = self.producer.get(name)
            if node is None:
                break
            if node.op_type == "Cast":
                return next(a.i for a in node.attribute if a.name == "to")
            if node.op_type in _INT64_OPS:
                return onnx.TensorProto.INT64
            if node.op_type in _BOOL_OPS:
                return onnx.TensorProto.BOOL
            name = node.input[1] if node.op_type == "CastLike" else \
                next((i for i in node.input if i), "")
        return onnx.TensorProto.FLOAT


def slice_of(graph: Graph, outputs: list[str], available: frozenset[str] | set[str]
             ) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes computing `outputs` from the graph inputs and the `available` tensors, in
    graph order, and the tensors among those that they read (the slice's inputs)."""
    declared = {i.name for i in graph.model.graph.input if i.name not in graph.initializers}
    wanted, todo, seen, frontier = [], list(outputs), set(), {}
    while todo:
        name = todo.pop()
        if name in available or name in declared:
            frontier[name] = None
            continue
        node = graph.producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        wanted.append(node)
        todo.extend(graph.inputs_of(node))
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    made = {o for n in wanted for o in n.output}  # a Split computing one output makes all
    return sorted(wanted, key=lambda n: order[id(n)]), [t for t in frontier if t not in made]


def cut(graph: Graph, outputs: list[str], available: frozenset[str] | set[str] = frozenset()
        ) -> onnx.ModelProto:
    """The slice computing `outputs` as a model whose inputs are the tensors it reads: a
    stage that reads one layer pays for the layers since the last values it has, not for
    the whole model."""
    model = graph.model
    nodes, reads = slice_of(graph, outputs, available)
    declared = {i.name: i for i in model.graph.input}
    names = {t for n in nodes for t in graph.inputs_of(n)}
    types = _ElemTypes(model)
    g = onnx.helper.make_graph(
        nodes, model.graph.name,
        [declared.get(t) or onnx.helper.make_tensor_value_info(t, types[t], None)
         for t in reads],
        [onnx.helper.make_tensor_value_info(t, types[t], None) for t in outputs],
        [graph.initializers[n] for n in sorted(names) if n in graph.initializers])
    return onnx.helper.make_model(g, opset_imports=model.opset_import,
                                  ir_version=model.ir_version)
