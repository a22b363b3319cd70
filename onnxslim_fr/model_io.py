"""Loading and atomic saving: the only place that touches files holding models.

The input is never written. An output is written completely under no name (Linux
O_TMPFILE) or a hidden temporary name, then renamed into place, so a reader never sees
half a model and a killed run leaves no temporary file behind (none at all with O_TMPFILE).
Weights go to an external file beside the output when the input had one or when the model
would pass protobuf's 2 GiB limit; the data file is published before the model that
references it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, Message
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .atomic import staged
from .errors import BadModelError, UnsupportedError, UsageError

#: Largest IR version we hand to onnxruntime; newer models are run as a lowered copy and
#: written back with their own version.
MAX_IR_VERSION = 10
#: Protobuf cannot serialize a message over 2 GiB, and the pipeline hands whole models to
#: onnxruntime and the checker as one message: larger models are refused.
DEFAULT_MAX_BYTES = 2 * 1024**3 - 1
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
        if any(uses_external_data(t) for t in _tensors(proto)):
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
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    if size > max_bytes:
        raise UnsupportedError(f"the model's weights take {size / 1e9:.1f} GB; models over "
                               f"{max_bytes / 1e9:.1f} GB are not supported (protobuf)")
    _checked(proto)
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
            raise UnsupportedError(f"model file {path} is {size / 1e9:.1f} GB; models over "
                                   f"{max_bytes / 1e9:.1f} GB are not supported (protobuf)")
        proto = _parse(path.read_bytes(), str(path))
    except OSError as exc:
        raise BadModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    locations = {ExternalDataInfo(t).location for t in _tensors(proto) if uses_external_data(t)}
    if locations:
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise BadModelError(f"cannot read external data of {path}: {exc}") from None
    return proto, (path, *(path.parent / loc for loc in sorted(locations)))


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


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph of its nodes (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that can hold weights: initializers and tensor attributes, subgraphs too."""
    for graph in _graphs(proto.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _checked(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(proto)
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


def check_runnable(model: onnx.ModelProto) -> None:
    """Refuse, naming the node, a model onnxruntime cannot load: nothing could be
    validated, and the user must learn which op is the problem (a custom domain, mostly).
    Nodes are named uniquely for the check (onnxruntime refuses repeated names), then get
    their own names back, so the message names the user's node."""
    from .graph import name_nodes
    from .runtime import session

    names = [node.name for node in model.graph.node]
    try:
        session(name_nodes(model))
    except Exception as exc:  # onnxruntime raises several unrelated types
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).strip())
        first = text.splitlines()[0] if text else type(exc).__name__
        for node, name in zip(model.graph.node, names, strict=True):
            node.name = name
        culprit = _culprit(model, text)
        where = f"run {culprit}" if culprit else "load the model"
        raise UnsupportedError(f"onnxruntime cannot {where}: {first}") from None
    finally:
        for node, name in zip(model.graph.node, names, strict=True):
            node.name = name


def describe(node: onnx.NodeProto, index: int) -> str:
    """`node 'conv3' (ai.onnx::Conv)`, or `unnamed node #4 (...)` when it has no name."""
    kind = f"{node.domain or 'ai.onnx'}::{node.op_type}"
    return f"node {node.name!r} ({kind})" if node.name else f"unnamed node #{index} ({kind})"


_NAME_QUOTES = ("({})", "'{}'", "node name: {}", "Node:{}", "node {} ")


def _culprit(model: onnx.ModelProto, message: str) -> str | None:
    """The node onnxruntime's `message` is about: one it names, else one whose op type it
    names, else one the ONNX standard does not define from a domain it names."""
    local = {(f.domain, f.name) for f in model.functions}
    nodes = [n for g in _graphs(model.graph) for n in g.node]

    def mentioned(word: str) -> bool:
        return bool(word) and re.search(rf"(?<![\w.]){re.escape(word)}(?![\w])", message) \
            is not None

    def named(name: str) -> bool:  # as onnxruntime quotes node names
        return bool(name) and any(f.format(name) in message for f in _NAME_QUOTES)

    def unknown(n: onnx.NodeProto) -> bool:
        domain = "" if n.domain == "ai.onnx" else n.domain
        return (n.domain, n.op_type) not in local and not onnx.defs.has(n.op_type, domain)

    for test in (lambda n: named(n.name),
                 lambda n: mentioned(n.op_type) and unknown(n),
                 lambda n: mentioned(n.op_type),
                 lambda n: unknown(n) and mentioned(n.domain)):
        for i, node in enumerate(nodes):
            if test(node):
                return describe(node, i)
    return None


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
    big = [t for t in model.graph.initializer if t.ByteSize() >= EXTERNAL_THRESHOLD]
    external = external or sum(t.ByteSize() for t in model.graph.initializer) > INLINE_LIMIT
    try:
        with staged() as stage:
            if external and big:
                data = data_path(target)
                model = _externalized(model, stage(data), data.name)
            stage(target).write(_serialized(model, ir_version or model.ir_version))
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None


def _serialized(model: onnx.ModelProto, ir_version: int) -> bytes:
    """The model's bytes with `ir_version` in the header (set and restored, not copied:
    a copy would hold every weight twice)."""
    kept = model.ir_version
    model.ir_version = ir_version
    try:
        return model.SerializeToString()
    finally:
        model.ir_version = kept


def _externalized(model: onnx.ModelProto, out: BinaryIO, location: str) -> onnx.ModelProto:
    """A copy of `model` whose large initializers point into `out` (written here, one
    tensor at a time, so no second copy of all weights is ever held)."""
    header = _without(model, {"graph"})
    _copy_fields(model.graph, header.graph, {"initializer"})
    for tensor in model.graph.initializer:
        entry = header.graph.initializer.add()
        raw = _raw(tensor) if tensor.ByteSize() >= EXTERNAL_THRESHOLD else None
        if raw is None:
            entry.CopyFrom(tensor)
            continue
        _copy_fields(tensor, entry, _DATA_FIELDS)
        offset = out.tell()
        if len(raw) >= _BIG and offset % _PAGE:
            out.write(b"\0" * (_PAGE - offset % _PAGE))
            offset = out.tell()
        out.write(raw)
        entry.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
            entry.external_data.add(key=key, value=str(value))
    return header


_DATA_FIELDS = {"raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data", "external_data", "data_location"}


def _raw(tensor: onnx.TensorProto) -> bytes | None:
    """The tensor's little-endian bytes, or None when it cannot live in an external file."""
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


def _copy_fields(src: Message, dst: Message, skip: set[str]) -> None:
    """Copy every set field of `src` into `dst` except those in `skip` (a shallow header
    copy: the skipped fields are the ones holding weights)."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if isinstance(value, Message):
            getattr(dst, field.name).CopyFrom(value)
        elif isinstance(value, str | bytes | int | float):
            setattr(dst, field.name, value)
        else:
            getattr(dst, field.name).extend(value)
