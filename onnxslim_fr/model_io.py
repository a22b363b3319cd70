"""Loading and atomic saving: the only place that touches files holding models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import BadModelError

#: Largest IR version onnxruntime reads on this stack; newer files are rewritten down.
MAX_IR_VERSION = 10
#: Protobuf cannot serialize a model over 2 GiB in one piece, so we refuse larger ones.
DEFAULT_MAX_BYTES = 2 * 1024**3 - 1


def load(model: str | os.PathLike[str] | bytes | onnx.ModelProto,
         *, max_bytes: int = DEFAULT_MAX_BYTES) -> onnx.ModelProto:
    """Return a private copy of `model` with external data loaded; never edits the source."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return _checked(copy)
    if isinstance(model, bytes | bytearray):
        return _checked(_parse(bytes(model), "<bytes>"))
    path = Path(model)
    if not path.is_file():
        raise BadModelError(f"model file not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise BadModelError(f"model file {path} is {size / 1e9:.1f} GB, over the "
                            f"{max_bytes / 1e9:.1f} GB this machine can slim in memory")
    proto = _parse(path.read_bytes(), str(path))
    if _has_external_data(proto):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise BadModelError(f"cannot read external data of {path}: {exc}") from None
    return _checked(proto)


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


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _checked(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadModelError(f"invalid ONNX model: {first}") from None
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a model."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model.SerializeToString())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
