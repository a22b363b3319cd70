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
from .lumping.consumers import segment_of
from .runtime import input_specs, session

DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]
LABELS = "labels"


@dataclass
class Dataset:
    """Checked batches of feeds, plus labels when the source had them."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.batches)

    def head(self, limit: int) -> list[dict[str, np.ndarray]]:
        """The batches of the first `limit` samples (the last one cut to fit)."""
        out, seen = [], 0
        for batch in self.batches:
            if seen >= limit:
                break
            n = len(next(iter(batch.values())))
            out.append({k: v[: limit - seen] for k, v in batch.items()})
            seen += min(n, limit - seen)
        return out


def load_data(source: DataSource, model: onnx.ModelProto, *, batch_size: int = 64,
              max_samples: int | None = None) -> Dataset:
    """Read and check calibration or hold-out data against the model's inputs."""
    specs = input_specs(model)
    if isinstance(source, str | os.PathLike):
        source = _read_file(Path(source))
    if isinstance(source, Mapping):
        return _from_arrays(dict(source), specs, batch_size, max_samples)
    if hasattr(source, "get_next"):
        source = iter(source.get_next, None)
    batches, labels, seen = [], [], 0
    for feeds in source:
        feeds = dict(feeds)
        label = feeds.pop(LABELS, None)
        batch = _checked(feeds, specs)
        n = len(next(iter(batch.values())))
        if max_samples is not None and seen + n > max_samples:
            batch = {k: v[: max_samples - seen] for k, v in batch.items()}
            label = None if label is None else label[: max_samples - seen]
        batches.append(batch)
        labels.append(label)
        seen += len(next(iter(batch.values())))
        if max_samples is not None and seen >= max_samples:
            break
    if not batches:
        raise BadDataError("calibration data is empty")
    have = [lab for lab in labels if lab is not None]
    return Dataset(batches, np.concatenate(have) if len(have) == len(labels) else None)


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
                 max_samples: int | None) -> Dataset:
    labels = arrays.pop(LABELS, None)
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {next(iter(specs)): next(iter(arrays.values()))}
    full = _checked(arrays, specs)
    n = len(next(iter(full.values())))
    if labels is not None and len(labels) != n:
        raise BadDataError(f"labels has {len(labels)} entries for {n} samples")
    n = min(n, max_samples) if max_samples else n
    batches = [{k: v[i:i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]
    return Dataset(batches, None if labels is None else np.asarray(labels)[:n])


def _checked(feeds: dict[str, np.ndarray], specs: dict) -> dict[str, np.ndarray]:
    missing = sorted(set(specs) - set(feeds))
    extra = sorted(set(feeds) - set(specs))
    if missing or extra:
        raise BadDataError(f"data inputs {sorted(feeds)} do not match the model's "
                           f"{sorted(specs)}" + (f" (missing {missing})" if missing else ""))
    out = {}
    for name, (dims, dtype) in specs.items():
        value = np.asarray(feeds[name])
        if np.issubdtype(dtype, np.floating) != np.issubdtype(value.dtype, np.floating) or \
                value.dtype.kind not in "fiub":
            raise BadDataError(f"input {name} has dtype {value.dtype}, model expects "
                               f"{np.dtype(dtype)}")
        if value.ndim != len(dims) or any(d is not None and d != s
                                          for d, s in zip(dims[1:], value.shape[1:], strict=True)):
            want = "x".join("?" if d is None else str(d) for d in dims)
            raise BadDataError(f"input {name} has shape {'x'.join(map(str, value.shape))}, "
                               f"model expects {want}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise BadDataError(f"input {name} contains NaN or Inf")
        out[name] = value.astype(dtype, copy=False)
    return out


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
              if segment_of(groups, t, g.id) is not None]
    tensors = sorted({t for t, _ in wanted})
    sess = session(with_outputs(model, tensors))
    stats = ChannelStats()
    bar = tqdm(data.batches, desc="calibrating", unit="batch", disable=not sys.stderr.isatty(),
               leave=False)
    for batch in bar:
        values = dict(zip(tensors, sess.run(tensors, batch), strict=True))
        for tensor, gid in wanted:
            k, _ = segment_of(groups, tensor, gid)
            rows = channel_rows(values[tensor], groups.layouts[tensor], k)
            point = stats.points.get((tensor, gid))
            if point is None:
                c = rows.shape[1]
                point = stats.points[(tensor, gid)] = PointStats(0, np.zeros(c), np.zeros((c, c)))
            point.count += len(rows)
            point.total += np.ones(len(rows), rows.dtype) @ rows  # BLAS, not a ufunc reduce
            point.gram += rows.T @ rows
        stats.samples += len(next(iter(batch.values())))
    return stats


def channel_rows(value: np.ndarray, lay: Layout, k: int) -> np.ndarray:
    """(samples*positions, C) view of segment k's channels in an activation, in the
    activation's dtype: products are taken per batch in float32 (BLAS) and accumulated in
    float64, which keeps the sums exact enough and the pass close to onnxruntime's cost."""
    idx = lay.feature_index(k)  # (C, q)
    c, q = idx.shape
    if q == 1 and int(idx[-1, 0]) - int(idx[0, 0]) == c - 1:  # a contiguous run of channels
        block = np.moveaxis(value, lay.axis, -1)[..., int(idx[0, 0]):int(idx[0, 0]) + c]
        return block.reshape(-1, c)
    block = np.moveaxis(value, lay.axis, -1)[..., idx]  # (..., C, q)
    return np.moveaxis(block, -1, -2).reshape(-1, c)


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `tensors`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in tensors:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    return out


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
    return sorted(wanted, key=lambda n: order[id(n)]), list(frontier)


def cut(graph: Graph, outputs: list[str], available: frozenset[str] | set[str] = frozenset()
        ) -> onnx.ModelProto:
    """The slice computing `outputs` as a model whose inputs are the tensors it reads: a
    stage that reads one layer pays for the layers since the last values it has, not for
    the whole model."""
    model = graph.model
    nodes, reads = slice_of(graph, outputs, available)
    declared = {i.name: i for i in model.graph.input}
    names = {t for n in nodes for t in graph.inputs_of(n)}
    g = onnx.helper.make_graph(
        nodes, model.graph.name,
        [declared.get(t) or onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
         for t in reads],
        [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs],
        [graph.initializers[n] for n in sorted(names) if n in graph.initializers])
    return onnx.helper.make_model(g, opset_imports=model.opset_import,
                                  ir_version=model.ir_version)
