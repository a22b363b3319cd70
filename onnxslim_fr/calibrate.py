"""Calibration data in, streaming channel statistics out.

Data adapters accept an `.npz`/`.npy` path, a dict of stacked arrays (first axis =
samples), an iterable of feed dicts, or an onnxruntime `CalibrationDataReader` (anything
with `get_next()`). Statistics are float64 count, sums and Gram matrices per read point,
updated batch by batch: memory is O(C^2) per read point, never O(samples); time is
bounded too (ROWS_PER_CHANNEL observations per channel, positions subsampled beyond).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from . import progress
from .background import Background
from .channels.layout import Layout
from .channels.structures import GroupSet
from .errors import BadDataError
from .lumping import head_merge
from .lumping.consumers import occurrences
from .moments import Moments
from .runtime import input_specs, is_float, session
from .subgraph import with_outputs

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
            n = len(next(iter(batch.values())))  # a whole batch is itself (validate.References)
            out.append(batch if n <= limit - seen else {k: v[: limit - seen] for k, v in
                                                        batch.items()})
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
    with open(path, "rb") as f:
        magic = f.read(6)
    if not (magic.startswith(b"PK") or magic == b"\x93NUMPY"):  # a zip (.npz), a .npy
        raise BadDataError(f"{path} is not a .npz or .npy file (numpy.savez / numpy.save "
                           f"write them: .npz keyed by input name, or one .npy array)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:  # pickled objects: numpy's advice is not ours
        reason = "it holds Python objects, not arrays" if "pickle" in str(exc) else exc
        raise BadDataError(f"cannot read {path} as .npz/.npy: {reason}") from None
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
    batches = [{k: v[i:min(i + batch_size, n)] for k, v in full.items()}
               for i in range(0, n, batch_size)]
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
    want = "x".join("?" if d is None else str(d) for d in dims)
    if value.ndim == len(dims) + 1 and None not in dims and dims[:1] != (1,) and \
            tuple(value.shape[1:]) == tuple(dims):  # [1, ...] is a batch of one
        raise BadDataError(f"model input {name} ({want}) has no batch axis, so samples cannot "
                           f"be stacked on one: export the model with a batch axis on {name}, "
                           f"or with {name} as a constant")
    if value.ndim != len(dims) or any(d is not None and d != s
                                      for d, s in zip(dims[1:], value.shape[1:], strict=True)):
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
class ChannelStats:
    points: dict[tuple[str, int], Moments] = field(default_factory=dict)
    samples: int = 0
    #: attention heads, per feature (lumping/head_merge.py): a head is no channel's multiple
    features: dict[tuple[str, int], Moments] = field(default_factory=dict)


@progress.phase("channel statistics")
def collect(model: onnx.ModelProto, groups: GroupSet, data: Dataset) -> ChannelStats:
    """One onnxruntime session with the read points added as outputs; stream the batches."""
    wanted = [(t, g.id) for g in groups.active() for t in g.read_points
              if occurrences(groups, t, g.id)]
    tensors = sorted({t for t, _ in wanted})
    stats = ChannelStats()
    if not tensors:  # onnxruntime would return every output for an empty request
        return stats
    sess = session(with_outputs(model, tensors))
    bar = tqdm(data.batches, desc="calibrating", unit="batch", disable=not progress.shown(),
               leave=False)
    # One BLAS thread: the Gram products are a few percent of the forward pass's FLOPs,
    # so threads gain little, and on a busy machine their spin-waits cost 20x (ResNet-50
    # read points, 2 cores shared with other work: 2.6 s a batch on two threads, 0.13 s on one).
    with threadpool_limits(limits=1, user_api="blas"), Background(workers=1) as worker:
        points = _read_points(sess, tensors, data.batches, worker)
        for batch in bar:
            values = next(points)  # not zip: it holds the last item while making the next
            _add_batch(stats, groups, wanted, values, len(data.batches))
            stats.samples += len(next(iter(batch.values())))
            del values  # not alive while the next batch runs
    return stats


#: A batch's read-point values up to this size are computed while the one before is
#: being summed (worker thread: at most two more batches alive); larger ones one at a time.
AHEAD_BYTES = 512 * 1024**2


def _read_points(sess, tensors: list[str], batches: list[dict[str, np.ndarray]],
                 worker: Background) -> Iterator[dict[str, np.ndarray]]:
    """Read-point values per batch. The first batch runs here and measures a batch's size;
    when it is small enough and every batch has its input shapes, the rest run on `worker`
    ahead of the caller's sums (ResNet-50, 128 images: 14.4 -> 11.9 s)."""
    def values(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(tensors, sess.run(tensors, batch), strict=True))

    if not batches:
        return
    first = values(batches[0])
    size = sum(v.nbytes for v in first.values())
    yield first
    del first
    rest = batches[1:]
    shapes = {k: v.shape for k, v in batches[0].items()}
    if size > AHEAD_BYTES or any({k: v.shape for k, v in b.items()} != shapes for b in rest):
        yield from map(values, rest)
    else:
        yield from worker.stream(lambda: map(values, rest), ahead=1)


def _add_batch(stats: ChannelStats, groups: GroupSet, wanted: list[tuple[str, int]],
               values: dict[str, np.ndarray], batches: int) -> None:
    """Fold one batch's read-point values into `stats` (`batches` in the whole set)."""
    for tensor, gid in wanted:
        if is_float(values[tensor].dtype) and not _finite(values[tensor]):  # Pow(0, -1)
            raise BadDataError(f"the calibration data makes tensor {tensor} NaN or infinite "
                               "in the original model; give data it computes finite values on")
        for k, _ in occurrences(groups, tensor, gid):  # a repeated group pools them
            lay = groups.layouts[tensor]
            point = stats.points.get((tensor, gid))
            if point is None:
                c = lay.feature_index(k).shape[0]
                point = stats.points[(tensor, gid)] = Moments.empty(c)
            accumulate(point, values[tensor], lay, k,
                       row_stride(values[tensor], lay, k, batches))
            if head_merge.is_heads(groups.groups[gid]):
                head_merge.add_features(stats.features, (tensor, gid), values[tensor], lay, k,
                                        head_merge.feature_stride(values[tensor], lay, k,
                                                                  batches, ROWS_PER_CHANNEL))


ROWS_PER_CHANNEL = 512  # observations per channel a read point's statistics need at most


def row_stride(value: np.ndarray, lay: Layout, k: int, batches: int) -> int:
    """Take every n-th observation when the whole calibration set (`batches` like this one)
    gives more than ROWS_PER_CHANNEL per channel: 256 images of 224x224 give a 256-channel
    ResNet layer 3,000 per channel, and products over all of them cost several forward
    passes while the covariance hardly moves (neighbouring positions are alike)."""
    c, q = lay.feature_index(k).shape
    rows = value.size // max(value.shape[lay.axis % value.ndim], 1) * q
    return max(1, rows * batches // (ROWS_PER_CHANNEL * c))


def accumulate(point: Moments, value: np.ndarray, lay: Layout, k: int,
               stride: int = 1) -> None:
    """Add an activation's count, sums and Gram for segment k's channels to `point`,
    from every `stride`-th observation (row_stride).

    A contiguous run of channels before the last axis (NCHW) is read in place, one
    (C, positions) matrix per leading index: the transposed copy channel_rows makes costs
    more than the products on a ResNet-50."""
    blocks = channel_blocks(value, lay, k)
    if blocks is None or stride > 1:
        rows = channel_rows(value, lay, k)[::stride] if blocks is None else \
            blocks[:, :, ::stride].transpose(0, 2, 1).reshape(-1, blocks.shape[1])
        point.count += len(rows)
        point.total += np.ones(len(rows), rows.dtype) @ rows  # BLAS, not ufunc reduce
        point.gram += rows.T @ rows
        return
    point.count += blocks.shape[0] * blocks.shape[2]
    ones = np.ones(blocks.shape[2], blocks.dtype)
    point.total += (blocks @ ones).sum(axis=0, dtype=np.float64)  # BLAS, not ufunc reduce
    for block in blocks:
        point.gram += block @ block.T


def channel_blocks(value: np.ndarray, lay: Layout, k: int) -> np.ndarray | None:
    """(leading, C, positions) view of segment k's channels when they are a contiguous
    run on an axis before the last with at least 2C positions after it, else None (then
    channel_rows: with few positions the per-sample C x C products cost more than the copy;
    measured: 256 channels at 56x56 0.7x the time, 1024 at 14x14 2x)."""
    if is_float(value.dtype) and value.dtype.itemsize < 4:
        return None
    idx = lay.feature_index(k)
    c, q = idx.shape
    axis = lay.axis % value.ndim
    if q != 1 or int(idx[-1, 0]) - int(idx[0, 0]) != c - 1 or axis == value.ndim - 1:
        return None
    lead, post = int(np.prod(value.shape[:axis])), int(np.prod(value.shape[axis + 1:]))
    if post < 2 * c:  # few positions: one product over all rows beats many small ones
        return None
    start = int(idx[0, 0])
    return value.reshape(lead, value.shape[axis], post)[:, start:start + c]


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
