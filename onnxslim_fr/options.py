"""Checks of what `slim` is asked to do, run before any heavy work.

One place for the CLI and the Python API, so both refuse with the same one-line message
(flags are named as on the command line; each maps to the keyword of the same name).
"""

from __future__ import annotations

import numbers
import operator
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BadDataError, UsageError
from .lumping.redundancy import METHODS
from .model_io import Source, data_files, data_path
from .runtime import check_runnable, provider_name

TARGETS = ("flops", "params", "latency")
BUDGET_FLAGS = ("--ratio", "--max-error", "--max-accuracy-drop", "--min-agreement")


def check_arguments(*, model: object, output: str | os.PathLike[str] | None,
                    data: object, holdout: object, ratio: float | None,
                    max_error: float | None, max_accuracy_drop: float | None,
                    min_agreement: float | None, target: str,
                    method: str, threshold: float, batch_size: int, max_samples: int | None,
                    input_shapes: Mapping[str, Sequence[int]] | None,
                    tolerance: float | None, round_to: int = 1, provider: str | None = None,
                    latency_runs: int = 0, latency_batch: int = 1,
                    threads: int | None = None) -> None:
    """Every check that needs no model: values, combinations, paths."""
    check_budget(data, holdout, ratio, max_error, max_accuracy_drop, min_agreement)
    if tolerance is not None:  # None: chosen by the model's float type
        _require("--tolerance", tolerance, lambda v: 0 < v < float("inf"), "> 0 and finite")
    _require("--threshold", threshold, lambda v: 0 < v <= 1, "in (0, 1]")
    _require_int("--batch-size", batch_size)
    if max_samples is not None:
        _require_int("--max-samples", max_samples)
    _require_int("--round-to", round_to)
    _require_int("--latency-batch", latency_batch)
    _require_int("latency_runs", latency_runs, least=0)
    if threads is not None:
        _require_int("--threads", threads)
    if provider is not None:
        check_provider(provider)
    for flag, value, choices in (("--target", target, TARGETS), ("--method", method, METHODS)):
        if value not in choices:
            raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    if input_shapes is not None and not isinstance(input_shapes, Mapping):
        raise UsageError("input_shapes must be a mapping of input name -> dims, got "
                         f"{type(input_shapes).__name__}")
    for name, raw in (input_shapes or {}).items():
        dims = tuple(raw) if isinstance(raw, Sequence | np.ndarray) else ()
        if not dims or not all(isinstance(d, numbers.Integral) and d > 0 for d in dims):
            raise UsageError(f"--input-shape {name}: dims must be positive integers, "
                             f"got {raw!r}")
    check_paths(model, output, reads={"--data": data, "--holdout": holdout})


def check_budget(data: object, holdout: object, ratio: float | None, max_error: float | None,
                 max_accuracy_drop: float | None, min_agreement: float | None = None) -> None:
    """Calibrated mode needs data and exactly one budget; exact mode takes neither."""
    values = (ratio, max_error, max_accuracy_drop, min_agreement)
    given = [flag for flag, value in zip(BUDGET_FLAGS, values, strict=True) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} exclude each other: give one budget")
    if data is None and given:
        raise UsageError(f"{given[0]} needs calibration data (--data)")
    if data is None and holdout is not None:
        raise UsageError("--holdout needs calibration data (--data)")
    if data is not None and not given:
        raise UsageError("--data needs a budget: add --ratio R, --max-error E, "
                         "--max-accuracy-drop D or --min-agreement A")
    if ratio is not None:
        _require("--ratio", ratio, lambda v: 0 <= v < 1, "in [0, 1)")
    if max_error is not None:
        _require("--max-error", max_error, lambda v: 0 < v < float("inf"), "> 0 and finite")
    if max_accuracy_drop is not None:
        _require("--max-accuracy-drop", max_accuracy_drop, lambda v: 0 <= v <= 1, "in [0, 1]")
    if min_agreement is not None:
        _require("--min-agreement", min_agreement, lambda v: 0 < v <= 1, "in (0, 1]")


def check_provider(provider: object) -> str:
    """The installed execution provider `provider` names (full or short, any case)."""
    name = provider_name(provider) if isinstance(provider, str) else None
    if name is None:
        available = ", ".join(ort.get_available_providers())
        raise UsageError(f"--provider {provider!r} is not available in this onnxruntime "
                         f"{ort.__version__}; available: {available}")
    return name


def check_labels(max_accuracy_drop: float | None, labels: object,
                 model: onnx.ModelProto | None = None) -> None:
    """Labels must exist for an accuracy bound and be class ids of the first output: an id
    no class can have makes both accuracies 0, the drop 0, and any slimming "within"."""
    if max_accuracy_drop is not None and labels is None:
        raise BadDataError("--max-accuracy-drop needs labels: add a 'labels' array to the "
                           "hold-out data (--holdout, or --data without it)")
    classes = _classes(model) if model is not None else None
    if labels is None or classes is None or not np.size(labels):
        return
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0 or high >= classes:
        raise BadDataError(f"labels must be class ids in [0, {classes}) of output "
                           f"{model.graph.output[0].name}, got values in [{low}, {high}]")


def _classes(model: onnx.ModelProto) -> int | None:
    """Classes of the first output when it is declared [batch, classes] (a classifier)."""
    if not model.graph.output:
        return None
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None


def check_paths(model: object, output: str | os.PathLike[str] | None,
                report: str | os.PathLike[str] | None = None, *,
                plot: str | os.PathLike[str] | None = None,
                reads: Mapping[str, object] | None = None) -> None:
    """Refuse, before the run, a file we would write (output, its weight file, report,
    plot) that is a file we read (the model, its weights, `reads`: flag -> data path) or
    another file we write, or that cannot be written."""
    source = Path(model) if isinstance(model, str | os.PathLike) else None
    for what, path in (("output", output), ("--report", report), ("--plot", plot)):
        if path is not None and not isinstance(path, str | os.PathLike):
            raise UsageError(f"{what} must be a str or os.PathLike path, not "
                             f"{type(path).__name__}")
        if path is not None and os.fspath(path).endswith(("/", os.sep)):
            raise UsageError(f"{what} {os.fspath(path)} ends with a path separator: give a "
                             "file path, not a directory")
    read = [(Path(v), f"the {flag} file") for flag, v in (reads or {}).items()
            if isinstance(v, str | os.PathLike)]
    out = Path(output) if output is not None else None
    if out is not None:
        _check_writable(out, "output")
        check_not_overwriting([source] if source else [], out)
        _check_distinct("output", out, read)
        for other, what in read:
            if _same(data_path(out), other):
                raise UsageError(f"output {out} would write its weights to {other}, {what}: "
                                 "choose another output path")
    taken = [(source, "the input model"), (out, "the output model"),
             (out and data_path(out), "the output's weight file"), *read]
    for flag, path in (("--report", report), ("--plot", plot)):
        if path is None:
            continue
        target = Path(path)
        # an existing file might be one of the input's weight files (read only then)
        weights = data_files(source) if source and os.path.isfile(source) and \
            os.path.exists(target) else []
        _check_distinct(flag, target, [*taken, *((d, "a weight file of the input model")
                                                 for d in weights)])
        _check_writable(target, flag)
        taken.append((target, f"the {flag} file"))


def _check_distinct(flag: str, target: Path, others: Sequence[tuple[Path | None, str]]) -> None:
    """`target` is none of `others` (path, what it is), through links and `..`."""
    noun = flag.lstrip("-")
    for other, what in others:
        if other is not None and _same(target, other):
            raise UsageError(f"{flag} {target} is {what}: choose another {noun} path")


def check_not_overwriting(sources: Sequence[Path], output: Path) -> None:
    """The output, and the weight file it may get beside it, must not be an input file."""
    for source in sources:
        if _same(output, source):
            raise UsageError(f"output {output} is the input file {source}: choose another "
                             "output path (the input is never modified)")
        if _same(data_path(output), source):
            raise UsageError(f"output {output} would write its weights to {source}, an input "
                             "file: choose another output path")


def check_source(source: Source, output: str | os.PathLike[str] | None,
                 input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Checks that need the loaded model, before analysis: the output must not overwrite
    an input file (external data included), `--input-shape` must fit, onnxruntime must
    load the original."""
    if output is not None:
        check_not_overwriting(source.files, Path(output))
    check_input_shapes(input_shapes, source.model)
    check_runnable(source.model)


def check_input_shapes(shapes: Mapping[str, Sequence[int]] | None,
                       model: onnx.ModelProto) -> None:
    """`--input-shape` must name a real input and fit its rank and fixed dims."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
    for name, dims in (shapes or {}).items():
        if name not in inputs:
            raise UsageError(f"--input-shape names {name!r}, which is not an input of the "
                             f"model; its inputs are: {', '.join(inputs) or '(none)'}")
        tensor = inputs[name].type.tensor_type
        if not tensor.HasField("shape"):
            continue
        want = [d.dim_value if d.HasField("dim_value") else None
                for d in tensor.shape.dim]
        if len(want) != len(dims) or any(w not in (None, d)
                                         for w, d in zip(want, dims, strict=False)):
            raise UsageError(f"--input-shape {name}:{_dims(dims)} does not fit input {name} "
                             f"of shape {_dims(want)}")


def _check_writable(path: Path, what: str) -> None:
    """os.path tests, not Path methods: those raise on a directory we may not search."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory: give a file path")
    if os.path.exists(path) and not os.path.isfile(path):  # written by rename: would replace it
        raise UsageError(f"{what} {path} is not a regular file (a device, pipe or socket): "
                         "give a file path")
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path} cannot be created: {parent} is not a directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path} is read-only")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} cannot be written: no write permission in {parent}")
    _try_create(parent, path, what)


def _try_create(parent: Path, path: Path, what: str) -> None:
    """Create and remove a file in `parent`: permission bits lie to root (and on read-only
    or special filesystems such as /sys), so only a real creation tells. Unnamed when the
    filesystem allows it, so no name ever appears beside the user's files."""
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except (AttributeError, OSError):  # no O_TMPFILE here: a named file, removed at once
        try:
            fd, name = tempfile.mkstemp(prefix=".onnxslim-fr-", suffix=".check", dir=parent)
        except OSError as exc:
            raise UsageError(f"{what} {path} cannot be written: {exc.strerror or exc} in "
                             f"{parent}") from None
        os.unlink(name)
    os.close(fd)


def _same(a: Path, b: Path) -> bool:
    """The same file: one path through symlinks or `..`, or hard links to one inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _require(flag: str, value: object, ok, wanted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
        raise UsageError(f"{flag} must be {wanted}, got {value!r}")


def _require_int(flag: str, value: object, least: int = 1) -> None:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < least:
        raise UsageError(f"{flag} must be a whole number >= {least}, got {value!r}")


def _dims(dims: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)
