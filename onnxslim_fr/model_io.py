"""Loading and atomic saving: the only place that touches files holding models.

The input is never written. An output is written completely under no name (Linux
O_TMPFILE) or a hidden temporary name, then renamed into place, so a reader never sees
half a model and a killed run leaves no temporary file behind (none at all with O_TMPFILE).
Weights go to an external file beside the output when the input had one or when the model
would pass protobuf's 2 GiB limit; the data file is published before the model that
references it.

Models over 2 GiB live in memory as one ModelProto (protobuf's limit is on serialized
messages, not on messages in memory), so nothing may serialize a whole model or ask its
ByteSize: sizes are summed tensor by tensor (`byte_size`), the checker and shape inference
see the skeleton (graph.skeleton), onnxruntime reads a spilled copy (`spilled`), and every
remaining whole-model serialization goes through `serialized`, which refuses past
PROTOBUF_LIMIT instead of letting protobuf fail somewhere deep.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from . import weights
from .atomic import staged
from .errors import BadModelError, InternalError, UnsupportedError, UsageError

#: Largest IR version we hand to onnxruntime; newer models are run as a lowered copy and
#: written back with their own version.
MAX_IR_VERSION = 10
#: Protobuf cannot serialize or parse a message over 2 GiB: a model file must stay under
#: it (its weights then go to external data), and no model past it is serialized whole.
PROTOBUF_LIMIT = 2 * 1024**3 - 1
#: A .onnx file larger than this cannot be parsed (kept for callers of `read`).
DEFAULT_MAX_BYTES = PROTOBUF_LIMIT
#: Outputs whose weights pass this are written with external data (2 GiB less room for
#: the graph itself).
INLINE_LIMIT = 2 * 1024**3 - 64 * 1024**2
#: Tensors smaller than this stay inside the .onnx file, as `onnx.save_model` does.
EXTERNAL_THRESHOLD = 1024
_PAGE, _BIG = 4096, 1024**2  # tensors of 1 MiB or more start on a page (mmap-friendly)


@dataclass
class Source:
    """A loaded model and what the output must keep from where it came from."""

    model: onnx.ModelProto  # private copy: external data inlined, IR lowered for the runtime
    ir_version: int  # the input's IR version: the output is written with it
    files: tuple[Path, ...] = ()  # the model file and its external data files: never written
    external: bool = False  # the input kept its weights in external files


def load(model: str | os.PathLike[str] | bytes | onnx.ModelProto,
         *, max_bytes: int = DEFAULT_MAX_BYTES) -> onnx.ModelProto:
    """Return a private copy of `model` with external data loaded; never edits the source."""
    return read(model, max_bytes=max_bytes).model


def read(model: str | os.PathLike[str] | bytes | onnx.ModelProto,
         *, max_bytes: int = DEFAULT_MAX_BYTES) -> Source:
    """Load `model` (a path, bytes or a ModelProto) and record what the output must keep."""
    files: tuple[Path, ...] = ()
    external = False
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        if any(uses_external_data(t) and not weights.stored(t) for t in _tensors(proto)):
            raise BadModelError("the model's weights are in external files: pass the model's "
                                "path so they can be found")
    elif isinstance(model, bytes | bytearray):
        proto = _parse(bytes(model), "<bytes>")
    elif isinstance(model, str | os.PathLike):
        proto, files = _read_path(Path(model), max_bytes)
        external = len(files) > 1
    else:
        raise BadModelError(f"model must be a path, bytes or an onnx.ModelProto, not "
                            f"{type(model).__name__}")
    proto = weights.intern(_checked(_densified(proto)))  # in slim: large weights to its store
    ir_version = proto.ir_version
    proto.ir_version = min(ir_version, MAX_IR_VERSION)
    return Source(proto, ir_version, files, external)


def _read_path(path: Path, max_bytes: int) -> tuple[onnx.ModelProto, tuple[Path, ...]]:
    if not os.path.isfile(path):  # os.path: never raises (a directory we may not search)
        raise BadModelError(f"model file not found: {path}" if not os.path.exists(path) else
                            f"model path {path} is not a file")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UnsupportedError(f"model file {path} is {size / 1e9:.1f} GB; protobuf cannot "
                                   f"read a file over {max_bytes / 1e9:.1f} GB: save its "
                                   "weights as external data (onnx.save_model(..., "
                                   "save_as_external_data=True))")
        proto = _parse(path.read_bytes(), str(path))
    except OSError as exc:
        raise BadModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    locations = _locations(proto)
    if locations:
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise BadModelError(f"cannot read external data of {path}: {exc}") from None
    return proto, (path, *(path.parent / loc for loc in sorted(locations)))


def data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files the model file at `path` refers to (none when it cannot be
    read: loading it reports why)."""
    path = Path(path)
    try:
        proto = _parse(path.read_bytes(), str(path))
    except (OSError, BadModelError):
        return []
    return [path.parent / loc for loc in sorted(_locations(proto))]


def _locations(proto: onnx.ModelProto) -> set[str]:
    return {ExternalDataInfo(t).location for t in _tensors(proto) if uses_external_data(t)}


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise BadModelError(f"{where} is not a readable ONNX model (truncated or not ONNX)") \
            from None
    if not proto.graph.node and not proto.graph.output:
        raise BadModelError(f"{where} is not an ONNX model (no graph)")
    return proto


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph of its nodes (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from graphs(sub)


def _tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that can hold weights: initializers and tensor attributes, subgraphs too."""
    for graph in graphs(proto.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _densified(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Sparse initializers as dense ones: every pass reads initializers (the checker even
    calls a node reading a sparse one unsorted). Subgraphs' stay sparse: a body is never
    slimmed."""
    graph = proto.graph
    for sparse in graph.sparse_initializer:
        try:
            values = numpy_helper.to_array(sparse.values)
            indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
            dense = np.zeros(int(np.prod(sparse.dims)), values.dtype)
            flat = np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims)) \
                if indices.ndim == 2 else indices
            dense[flat] = values.reshape(-1)
        except (ValueError, IndexError, TypeError) as exc:
            raise BadModelError(f"invalid ONNX model: sparse initializer "
                                f"{sparse.values.name!r} does not fit its dims: {exc}") from None
        graph.initializer.append(numpy_helper.from_array(dense.reshape(tuple(sparse.dims)),
                                                         sparse.values.name))
    del graph.sparse_initializer[:]
    return proto


def _checked(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The checker on the skeleton: it reads types and shapes, and the model itself may be
    past what protobuf serializes (onnxruntime then checks the weights' sizes)."""
    from .graph import skeleton

    try:
        onnx.checker.check_model(skeleton(proto))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadModelError(f"invalid ONNX model: {first}") from None
    _name_negative_dims(proto.graph)
    return proto


def _name_negative_dims(g: onnx.GraphProto) -> None:
    """Old exporters write a dynamic dimension as -1 (paddle's classifiers do); ONNX spells
    it as a symbol. Renamed once here, every later reader sees an ordinary dynamic dim."""
    for vi in [*g.input, *g.output, *g.value_info]:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                d.dim_param = f"{vi.name}_dim{axis}"


def data_path(output: str | os.PathLike[str]) -> Path:
    """Where the weights of `output` go when they are written beside it."""
    path = Path(output)
    return path.with_name(f"{path.name}.data")


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike[str], *,
                ir_version: int | None = None, external: bool = False) -> None:
    """Write `model` to `path` atomically, with `ir_version` (the input's) in the file.

    With `external` (the input had external data), or when the weights would pass
    protobuf's 2 GiB limit, tensors go to `<name>.data` beside the model.
    """
    target = Path(path)
    big = any(weights.nbytes(t) >= EXTERNAL_THRESHOLD for t in model.graph.initializer)
    external = external or weight_bytes(model) > INLINE_LIMIT or not fits(model)
    try:
        with staged() as stage:
            if external and big:
                data = data_path(target)
                model = _externalized(model, stage(data), data.name)
                stage(target).write(serialized(model, ir_version or model.ir_version))
            elif any(weights.stored(t) for t in model.graph.initializer):
                _write_inline(model, stage(target), ir_version or model.ir_version)
            else:
                stage(target).write(serialized(model, ir_version or model.ir_version))
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None


@contextmanager
def spilled(model: onnx.ModelProto) -> Iterator[Path]:
    """`model` written with external data, for readers that need a path (onnxruntime past
    2 GiB, and below it too: a session read from a file maps the weights instead of holding
    the serialized bytes, the parsed proto and its own copy at once). Inside `slim` the
    header goes beside the store's files and refers to them; elsewhere into a temporary
    directory. What was written is removed when the block ends."""
    store = weights.current()
    with contextlib.ExitStack() as stack:
        if store is None:
            directory, stem = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="onnxslim-fr-", ignore_cleanup_errors=True))), "model"
        else:
            directory, stem = store.dir, store.new_name("")
        path = directory / f"{stem}.onnx"
        try:
            with weights.writing(directory):
                with open(data_path(path), "wb") as out:
                    header = _externalized(model, out, data_path(path).name, keep_stored=True)
                path.write_bytes(serialized(header))
            del header
            yield path
        finally:
            for written in (path, data_path(path)):
                with contextlib.suppress(OSError):  # a file still mapped (Windows) stays
                    written.unlink(missing_ok=True)


def _write_inline(model: onnx.ModelProto, out: BinaryIO, ir_version: int) -> None:
    """Serialize `model` with its stored weights inline, one tensor at a time: protobuf
    accepts a message's fields in any order, so the header goes first and each
    initializer is appended to the graph field as it is read from the store."""
    header = _without(model, {"graph", "ir_version"})
    header.ir_version = ir_version
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, {"initializer"})
    sizes = [weights.inline_size(t) for t in model.graph.initializer]
    body = len(graph.SerializeToString()) + sum(
        len(_key(_INIT_FIELD)) + len(_varint(n)) + n for n in sizes)
    out.write(serialized(header))
    out.write(_key(_GRAPH_FIELD) + _varint(body) + graph.SerializeToString())
    for tensor, size in zip(model.graph.initializer, sizes, strict=True):
        out.write(_key(_INIT_FIELD) + _varint(size) + weights.inline(tensor).SerializeToString())


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


_varint = weights.varint


def weight_bytes(model: onnx.ModelProto) -> int:
    """Serialized bytes of the initializers, summed tensor by tensor (no whole-model
    ByteSize: past 2 GiB protobuf cannot compute it)."""
    return sum(weights.nbytes(t) for t in model.graph.initializer)


def byte_size(model: onnx.ModelProto) -> int:
    """The model's size as one file with every weight inline, stored ones too."""
    return _message_size(model, weights.inline_size)


def _message_size(model: onnx.ModelProto, tensor_size=onnx.TensorProto.ByteSize) -> int:
    """The serialized size, computed piece by piece (each under 2 GiB): the header, the
    graph without its initializers, and each initializer's `tensor_size` with its field's
    key and length."""
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, {"initializer"})
    body = graph.ByteSize() + sum(_field(_INIT_FIELD, tensor_size(t))
                                  for t in model.graph.initializer)
    return _without(model, {"graph"}).ByteSize() + _field(_GRAPH_FIELD, body)


def _field(number: int, size: int) -> int:
    """Bytes of a length-delimited field holding `size` bytes."""
    return len(_key(number)) + len(_varint(size)) + size


def fits(model: onnx.ModelProto) -> bool:
    """True when protobuf can serialize `model` as one file, stored weights inline."""
    return byte_size(model) <= PROTOBUF_LIMIT


def serialized(model: onnx.ModelProto, ir_version: int | None = None) -> bytes:
    """The model's bytes, with `ir_version` in the header when given (set and restored,
    not copied: a copy would hold every weight twice). Every whole-model serialization of
    the library goes through here, so a model past protobuf's limit fails with our message
    instead of deep inside protobuf."""
    if _message_size(model) > PROTOBUF_LIMIT:
        raise InternalError(f"a model of {_message_size(model) / 1e9:.2f} GB was serialized "
                            "as one message; it must be written with external data")
    kept = model.ir_version
    model.ir_version = kept if ir_version is None else ir_version
    try:
        return model.SerializeToString()
    finally:
        model.ir_version = kept


def _externalized(model: onnx.ModelProto, out: BinaryIO, location: str, *,
                  keep_stored: bool = False) -> onnx.ModelProto:
    """A copy of `model` whose large initializers point into `out` (written here, one
    tensor at a time, so no second copy of all weights is ever held). `keep_stored`:
    tensors already in the store keep pointing there (the header is read beside it)."""
    header = _without(model, {"graph"})
    _copy_fields(model.graph, header.graph, {"initializer"})
    for tensor in model.graph.initializer:
        entry = header.graph.initializer.add()
        keep = keep_stored and weights.stored(tensor)
        raw = _raw(tensor) if weights.nbytes(tensor) >= EXTERNAL_THRESHOLD and not keep \
            else None
        if raw is None:
            entry.CopyFrom(tensor)
            continue
        offset = out.tell()
        if len(raw) >= _BIG and offset % _PAGE:
            out.write(b"\0" * (_PAGE - offset % _PAGE))
            offset = out.tell()
        out.write(raw)
        weights.refer(entry, tensor, location, offset, len(raw))
    return header


def _raw(tensor: onnx.TensorProto) -> bytes | None:
    """The tensor's little-endian bytes, or None when it cannot live in an external file."""
    if weights.stored(tensor):
        return weights.current().raw(tensor)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
    except (TypeError, ValueError, KeyError):
        return None


def _without(model: onnx.ModelProto, skip: set[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    _copy_fields(model, out, skip)
    return out


_copy_fields = weights.copy_fields
