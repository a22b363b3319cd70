"""onnxruntime for the library: sessions, runs, and the inputs a model declares.

Every session the library builds comes from `session`, which takes the execution provider
from one place: a context variable that `slim` sets for the duration of a call
(`use_provider`), so calibration, refit, probes, validation and latency all run where the
user asked without passing the name through every call.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import onnx
import onnxruntime as ort

from . import model_io, weights
from .errors import BadDataError, UnsupportedError
from .graph import declare_weight_inputs, name_nodes

#: Models whose weights pass this are handed to onnxruntime as a file with external data
#: (model_io.spilled): built from bytes, a session holds the bytes, onnxruntime's parsed
#: copy and its own tensors at once (3.8x the weights for a ResNet-50, against 1.7x from a
#: file whose weights it maps). Below it the bytes are faster than a round trip to disk.
SPILL_BYTES = 16 * 1024**2


def np_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype onnxruntime exchanges for an ONNX element type (bfloat16 and the
    float8 types come from ml_dtypes, as onnx itself maps them); FLOAT when unset."""
    if elem_type == onnx.TensorProto.UNDEFINED:
        return np.dtype(np.float32)
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        return np.dtype(np.float32)


def is_float(dtype: np.dtype) -> bool:
    """Floating point, including ml_dtypes' bfloat16 / float8 (numpy kind 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[tuple[int | None, ...], np.dtype]]:
    """Shape (None for dynamic dims) and numpy dtype of each real graph input."""
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None
                     for d in t.shape.dim)
        specs[vi.name] = (dims, np_dtype(t.elem_type))
    return specs


CPU = "CPUExecutionProvider"
_PROVIDER: ContextVar[str] = ContextVar("onnxslim_fr_provider", default=CPU)


def provider_name(text: str) -> str | None:
    """The installed execution provider `text` names, case-insensitively, in full
    ("CUDAExecutionProvider") or short ("cuda"); None when onnxruntime lists none."""
    for name in ort.get_available_providers():
        if text.lower() in (name.lower(), name.lower().removesuffix("executionprovider")):
            return name
    return None


def current_provider() -> str:
    return _PROVIDER.get()


@contextmanager
def use_provider(name: str | None) -> Iterator[None]:
    """Sessions built inside run on `name` (None: CPU); the previous one is restored after,
    on errors too. Nested and concurrent calls (threads, asyncio) each see their own."""
    token = _PROVIDER.set((provider_name(name) or name) if name else CPU)
    try:
        yield
    finally:
        _PROVIDER.reset(token)


def on_provider(fn: Callable) -> Callable:
    """Decorator: `fn` runs inside use_provider(its `provider=` keyword)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with use_provider(kwargs.get("provider")):
            return fn(*args, **kwargs)
    return wrapper


def session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """A session on the current provider (CPU takes the nodes it cannot run); `threads`
    fixes the intra-op thread count (None: onnxruntime's choice)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # idle onnxruntime threads would otherwise spin and starve numpy's BLAS between runs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
    name = _PROVIDER.get()
    providers = [name] if name == CPU else [name, CPU]
    release()
    declare_weight_inputs(model)  # a weight listed as input declares its sliced shape
    try:
        return _built(model, opts, providers)
    except Exception as exc:  # onnxruntime's layout passes can fuse away an output we ask
        if "Failed to find node output" not in str(exc):  # for (a Conv read by an Add)
            raise
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        return _built(model, opts, providers)


def _built(model: onnx.ModelProto, opts: ort.SessionOptions, providers: list[str]
           ) -> ort.InferenceSession:
    # on CPU alone a failed build is retried on CPU, after a banner printed to stdout
    fallback = int(providers != [CPU])
    if not any(weights.stored(t) for t in model.graph.initializer) and \
            model_io.weight_bytes(model) <= SPILL_BYTES and model_io.fits(model):
        return ort.InferenceSession(model_io.serialized(model), opts, providers=providers,
                                    enable_fallback=fallback)
    with model_io.spilled(model) as path:
        return ort.InferenceSession(str(path), opts, providers=providers,
                                    enable_fallback=fallback)


def release() -> None:
    """Give the heap's free memory back to the system (glibc keeps what a dropped session
    or model freed, so the next one would start from the last one's peak)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def check_runnable(model: onnx.ModelProto) -> None:
    """Refuse, naming the node, a model onnxruntime cannot load: nothing could be
    validated, and the user must learn which op is the problem (a custom domain, mostly).
    Nodes are named uniquely for the check (onnxruntime refuses repeated names), then get
    their own names back, so the message names the user's node."""
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
    nodes = [n for g in model_io.graphs(model.graph) for n in g.node]

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


def run(model: onnx.ModelProto | ort.InferenceSession,
        feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    try:
        return _run(sess, feeds)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise BadDataError(f"onnxruntime rejected the inputs: {first_line(exc)}") from None


def run_error(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> str | None:
    """None when `sess` runs on `feeds`, else the first line of onnxruntime's complaint
    (nothing is logged: trying inputs that may not fit is expected to fail quietly)."""
    return try_run(sess, feeds)[1]


def try_run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]
            ) -> tuple[list[np.ndarray] | None, str | None]:
    """(outputs, None), or (None, the first line of onnxruntime's complaint)."""
    try:
        return _run(sess, feeds), None
    except Exception as exc:  # onnxruntime raises several unrelated types
        return None, first_line(exc)


def runner(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]
           ) -> Callable[[], list[np.ndarray]]:
    """A call that runs `sess` on `feeds`, the inputs converted once (for timing loops).

    bfloat16 / float8 tensors (ml_dtypes arrays, which onnxruntime's numpy bridge does not
    know) pass as raw OrtValues both ways; everything else goes through sess.run."""
    quiet = _quiet()
    if not any(o.type in _RAW_TYPES for o in sess.get_outputs()) and \
            not any(np.asarray(v).dtype.kind == "V" for v in feeds.values()):
        plain = dict(feeds)
        return lambda: sess.run(None, plain, quiet)
    values = {k: _ort_value(np.asarray(v)) for k, v in feeds.items()}
    names = [o.name for o in sess.get_outputs()]
    return lambda: [_from_ort(o) for o in sess.run_with_ort_values(names, values, quiet)]


def _run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return runner(sess, feeds)()


_RAW = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2
_RAW_TYPES = {f"tensor({onnx.TensorProto.DataType.Name(t).lower()})": t for t in _RAW}
_RAW_BY_NUMPY = {np_dtype(t).name: t for t in _RAW}


def _ort_value(value: np.ndarray) -> ort.OrtValue:
    if value.dtype.kind != "V":
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    elem = _RAW_BY_NUMPY[value.dtype.name]
    raw = np.ascontiguousarray(value).view(f"u{value.dtype.itemsize}")
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem)


def _from_ort(value: ort.OrtValue):
    """numpy array of an output; bfloat16 / float8 are copied out byte for byte."""
    if not value.is_tensor() or value.data_type() not in _RAW_TYPES:
        return value.numpy()
    dtype = np_dtype(_RAW_TYPES[value.data_type()])
    raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return np.frombuffer(raw, dtype=dtype).reshape(value.shape()).copy()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _quiet() -> ort.RunOptions:
    """Run options that keep onnxruntime's own error log off stderr: the error is raised
    (and turned into one line) anyway."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options
