"""Large weights kept once, on disk, while `slim` runs: protos stay small and share them.

A ResNet-50 slimmed in memory held its weights six to nine times over: the original, the
normalized copy, each round's rewrite, the index's numpy arrays, onnxruntime's serialized
bytes, its parsed copy and its own tensors. Inside `scope()` every initializer larger than
SMALL_ELEMENTS is written once to a file of a private temporary directory (the store) and
the proto keeps an external-data reference to it, so:

* copying a model (normalize, rewrite, calibration outputs) copies references, not weights;
* the index (graph.Graph.const) reads a weight as a read-only memory map of that file;
* onnxruntime opens a small header written beside the files and maps the weights itself;
* models past protobuf's 2 GiB never need to be one message.

Only models whose weights pass STORE_BYTES use the store; small ones stay as they came.
What leaves `slim` (the returned model) is made whole again with `materialize`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from .errors import UsageError

#: Models whose initializers take more bytes than this keep them in the store.
STORE_BYTES = 16 * 1024**2
#: Initializers up to this many elements stay inside the proto: shape inference reads
#: small constants (graph.skeleton keeps exactly these), and they cost nothing.
SMALL_ELEMENTS = 4096
_PREFIX = "onnxslim-fr-"
_PAGE = 4096


class Store:
    """A temporary directory of weight files, one per interned model; the directory is
    made when the first weight arrives (most models never need it)."""

    def __init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._names = itertools.count()

    @property
    def dir(self) -> Path:
        if self._tmp is None:
            with writing(Path(tempfile.gettempdir())):
                self._tmp = tempfile.TemporaryDirectory(prefix=_PREFIX,
                                                        ignore_cleanup_errors=True)
        return Path(self._tmp.name)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def new_name(self, suffix: str) -> str:
        return f"{_PREFIX}{next(self._names):06d}{suffix}"

    def owns(self, tensor: onnx.TensorProto) -> bool:
        """True when `tensor` is a reference into this store."""
        return self._tmp is not None and \
            tensor.data_location == onnx.TensorProto.EXTERNAL and \
            _entry(tensor, "location").startswith(_PREFIX) and \
            os.path.isfile(self.dir / _entry(tensor, "location"))

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """Read-only memory map of a stored tensor: no copy, pages read on use."""
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(tensor.dims)
        if not int(np.prod(shape)):
            return np.zeros(shape, dtype)
        return np.memmap(self.dir / _entry(tensor, "location"), dtype=dtype, mode="r",
                         offset=int(_entry(tensor, "offset") or 0), shape=shape
                         ).view(np.ndarray)

    def raw(self, tensor: onnx.TensorProto) -> bytes:
        with open(self.dir / _entry(tensor, "location"), "rb") as f:
            f.seek(int(_entry(tensor, "offset") or 0))
            return f.read(int(_entry(tensor, "length")))


_STORE: ContextVar[Store | None] = ContextVar("onnxslim_fr_store", default=None)


def current() -> Store | None:
    return _STORE.get()


@contextlib.contextmanager
def scope() -> Iterator[Store]:
    """A store for the duration of the block; its files are removed after, on errors too."""
    store = Store()
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)
        store.close()


@contextlib.contextmanager
def writing(directory: Path) -> Iterator[None]:
    """A temporary file that cannot be written (a full disk) is the user's to fix: one line
    that says where, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"cannot write temporary weights in {directory}: "
                         f"{exc.strerror or exc}; set TMPDIR to a directory with room for "
                         "twice the model") from None


def scoped(fn: Callable) -> Callable:
    """Decorator: `fn` runs in a store scope; the `.model` of what it returns (if any) is
    materialized before the store goes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with scope():
            result = fn(*args, **kwargs)
            if isinstance(getattr(result, "model", None), onnx.ModelProto):
                result.model = materialize(result.model)
            return result
    return wrapper


def stored(tensor: onnx.TensorProto) -> bool:
    store = current()
    return store is not None and store.owns(tensor)


def array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of an initializer, stored or inline (the only reader of weights)."""
    store = current()
    if store is not None and store.owns(tensor):
        return store.array(tensor)
    return numpy_helper.to_array(tensor)


def nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor's data takes wherever it is (a stored one's proto is tiny)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        length = _entry(tensor, "length")
        if length:
            return int(length) + tensor.ByteSize()
    return tensor.ByteSize()


def inline_size(tensor: onnx.TensorProto) -> int:
    """Serialized size of `tensor` with its data inline (exact, stored or not)."""
    store = current()
    if store is None or not store.owns(tensor):
        return tensor.ByteSize()
    header = onnx.TensorProto()
    copy_fields(tensor, header, DATA_FIELDS)
    length = int(_entry(tensor, "length"))
    raw = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
    return header.ByteSize() + len(varint(raw << 3 | 2)) + len(varint(length)) + length


def varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a length or key."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def intern(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its large inline initializers moved to the store (one new file); the
    same object when there is no store, the model is small, or nothing is inline. A new
    proto is built rather than fields cleared: protobuf frees memory with the message."""
    store = current()
    if store is None or sum(nbytes(t) for t in model.graph.initializer) <= STORE_BYTES:
        return model
    moving = [t for t in model.graph.initializer if _movable(t)]
    if not moving:
        return model
    out = onnx.ModelProto()
    copy_fields(model, out, {"graph"})
    copy_fields(model.graph, out.graph, {"initializer"})
    name = store.new_name(".bin")
    with writing(store.dir), open(store.dir / name, "wb") as f:
        for tensor in model.graph.initializer:
            entry = out.graph.initializer.add()
            if not _movable(tensor):
                entry.CopyFrom(tensor)
                continue
            if f.tell() % _PAGE:
                f.write(b"\0" * (_PAGE - f.tell() % _PAGE))
            offset, raw = f.tell(), _raw(tensor)
            f.write(raw)
            refer(entry, tensor, name, offset, len(raw))
    return out


def refer(entry: onnx.TensorProto, tensor: onnx.TensorProto, location: str, offset: int,
          length: int) -> None:
    """Fill `entry` as `tensor` whose data is at `offset` of file `location`."""
    copy_fields(tensor, entry, DATA_FIELDS)
    entry.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry.external_data.add(key=key, value=str(value))


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every stored tensor inline again: a self-contained model for callers
    outside the scope (the same object when nothing is stored)."""
    store = current()
    if store is None or not any(store.owns(t) for t in model.graph.initializer):
        return model
    out = onnx.ModelProto()
    copy_fields(model, out, {"graph"})
    copy_fields(model.graph, out.graph, {"initializer"})
    for tensor in model.graph.initializer:
        out.graph.initializer.append(inline(tensor))
    return out


def inline(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor` with its data in the proto (itself when it is not stored)."""
    store = current()
    if store is None or not store.owns(tensor):
        return tensor
    entry = onnx.TensorProto()
    copy_fields(tensor, entry, DATA_FIELDS)
    entry.raw_data = store.raw(tensor)
    return entry


DATA_FIELDS = {"raw_data", "float_data", "int32_data", "string_data", "int64_data",
               "double_data", "uint64_data", "external_data", "data_location"}


def _movable(tensor: onnx.TensorProto) -> bool:
    """Inline, large, and of a plain numeric type a memory map can read back."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or \
            int(np.prod(tensor.dims)) <= SMALL_ELEMENTS:
        return False
    try:
        kind = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).kind
    except (KeyError, ValueError, TypeError):
        return False
    return kind in "fiub"


def _raw(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


def _entry(tensor: onnx.TensorProto, key: str) -> str:
    return next((e.value for e in tensor.external_data if e.key == key), "")


def copy_fields(src: Message, dst: Message, skip: set[str]) -> None:
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
