"""Compare the slimmed model with the original by running both in onnxruntime.

This is the gate behind "exit 0 = correct", so nothing may slip through it: each output is
measured on its own scale (a 5% error on a small output must not hide behind a large one),
a NaN or Inf where the original has a finite value is an infinite error (`max(0, nan)` is
0), integer and boolean outputs must match exactly, and a shape or count mismatch fails.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from . import progress
from .graph import check
from .runtime import first_line, is_float, run, session, try_run

#: default relative tolerance of exact mode by the least precise float type in the model
TOLERANCES = {onnx.TensorProto.FLOAT16: 2e-3, onnx.TensorProto.BFLOAT16: 2e-2}
DEFAULT_TOLERANCE = 1e-4
SCALE_FLOOR = 1e-12  # an output whose largest magnitude is below this counts as all-zero
#: An output is measured on its own scale, but never on one below this share of the largest
#: output's: an output that is (nearly) all zeros would otherwise turn float rounding noise
#: into a huge relative error, while a 5% error on a small output is still seen.
RELATIVE_FLOOR = 1e-3


@dataclass
class OutputError:
    """Error of one graph output; for integer / boolean outputs, the share that differs."""

    name: str
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    scale: float = field(default=0.0, repr=False)
    mismatches: int = field(default=0, repr=False)
    problem: str = field(default="", repr=False)  # why the error is infinite

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in _ROW}

    def broken(self, problem: str, elements: int = 1) -> None:
        """The output is not comparable at all: a NaN/Inf, a shape change, no value."""
        self.max_abs_error = self.max_rel_error = math.inf
        self.mismatches += elements
        self.problem = self.problem or problem


_ROW = ("name", "max_abs_error", "max_rel_error")


@dataclass
class Comparison:
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    outputs: list[OutputError] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        """Elements of integer / boolean outputs that differ (exact mode requires none)."""
        return sum(o.mismatches for o in self.outputs)

    def within(self, tolerance: float) -> bool:
        """Every float output within `tolerance` relative error, every other output equal."""
        return self.max_rel_error <= tolerance and not self.mismatches

    def failure(self, tolerance: float) -> str:
        """One line naming the worst output, for ValidationError."""
        worst = max(self.outputs, key=lambda o: (o.mismatches > 0, o.max_rel_error),
                    default=OutputError("?", self.max_abs_error, self.max_rel_error))
        what = worst.problem or ("values differ" if worst.mismatches else
                                 f"relative error {worst.max_rel_error:.3g} > {tolerance:g}")
        return f"slimmed model differs from the original on output {worst.name!r}: {what}; " \
               f"nothing written"

    def output_rows(self) -> list[dict]:
        """`{name, max_abs_error, max_rel_error}` per output, for the report."""
        return [o.row() for o in self.outputs]


def default_tolerance(model: onnx.ModelProto) -> float:
    """Exact mode's tolerance for `model`: float16 arithmetic rounds at ~5e-4 and bfloat16 at
    ~4e-3 per operation, so 1e-4 would refuse every correct slimming of such models."""
    g = model.graph
    types = {vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    types |= {t.data_type for t in g.initializer}
    return max([DEFAULT_TOLERANCE, *(TOLERANCES[t] for t in types if t in TOLERANCES)])


@progress.phase("validation run")
def compare(original: onnx.ModelProto | References, slimmed: onnx.ModelProto,
            batches: Iterable[Mapping[str, np.ndarray]],
            labels: np.ndarray | None = None) -> Comparison:
    """Run both models on every feed dict of `batches` (random, calibration, hold-out: any
    list). Errors are per output, relative to that output's largest magnitude; top-1 and
    accuracy use the first output when it looks like float class scores (batch, classes).

    The original runs first and its outputs are kept (up to REFERENCE_BYTES at a time),
    then its session is released before the slimmed model's is built: two sessions alive
    at once would hold the weights twice more. Given `References`, the original runs only
    on batches it has not run on before."""
    check(slimmed, "slimmed model fails the checker")
    names: list[str] | None = None
    errors: list[OutputError] = []
    preds_a, preds_b = [], []
    problem = ""
    for chunk, reference, have in _references(original, batches):
        if names is None:
            names = have
            errors = [OutputError(n) for n in names]
        sess_b, problem = _session_like(slimmed, names)
        for feeds, outs_a in zip(chunk, reference, strict=True):
            outs_b, failed = (None, None) if problem else try_run(sess_b, feeds)
            problem = problem or (failed and f"the slimmed model fails to run: {failed}")
            if problem:
                break
            for err, a, b in zip(errors, outs_a, outs_b, strict=True):
                _accumulate(err, a, b)
            if _looks_like_scores(outs_a[0]) and np.shape(outs_b[0]) == np.shape(outs_a[0]):
                preds_a.append(np.asarray(outs_a[0]).argmax(1))
                preds_b.append(np.asarray(outs_b[0]).argmax(1))
        del sess_b
        if problem:
            break
    return _result(errors, problem, preds_a, preds_b, labels)


#: Reference outputs kept at a time; past it the sessions take turns per chunk of batches.
REFERENCE_BYTES = 256 * 1024**2


class References:
    """The original model and its outputs on the batches it ran on, kept (up to
    REFERENCE_BYTES) across comparisons: the exact check, the final check and every
    candidate of a bound's search compare with the same original on the same batches (a
    bisection ran it eight times; on 256 ResNet-50 images one run is a third of a minute).
    A batch is known by identity: the same feed dict object, held here."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.names: list[str] | None = None
        self._kept: dict[int, tuple[Mapping[str, np.ndarray], list]] = {}
        self._size = 0
        # onnxruntime seeds random ops per session and advances them per run: only a fresh
        # session fed the same batches in the same order draws what the slimmed model draws
        self._fresh = draws_random_numbers(model)

    def known(self, feeds: Mapping[str, np.ndarray]) -> list | None:
        hit = self._kept.get(id(feeds))
        return hit[1] if hit is not None and hit[0] is feeds else None

    def keep(self, feeds: Mapping[str, np.ndarray], outputs: list) -> None:
        size = sum(o.nbytes for o in outputs if isinstance(o, np.ndarray))
        if not self._fresh and self._size + size <= REFERENCE_BYTES:
            self._kept[id(feeds)] = (feeds, outputs)
            self._size += size


RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                        "RandomUniformLike", "Multinomial", "Bernoulli"})


def draws_random_numbers(model: onnx.ModelProto) -> bool:
    """Whether a node (in a subgraph or a local function too) draws random numbers: a
    random op, or Dropout given a training-mode input."""
    def nodes(graph: onnx.GraphProto):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                yield from (n for sub in [*([attr.g] if attr.HasField("g") else []),
                                          *attr.graphs] for n in nodes(sub))

    return any(n.op_type in RANDOM_OPS or (n.op_type == "Dropout" and len(n.input) > 2
                                           and n.input[2])
               for n in [*nodes(model.graph), *(n for f in model.functions for n in f.node)])


def _references(original: onnx.ModelProto | References,
                batches: Iterable[Mapping[str, np.ndarray]]):
    """(batches, the original's outputs on them, its output names), chunk by chunk; the
    original's session is gone before each chunk is handed out, and is built only for
    batches `original` (References) does not know. The first chunk comes even when there
    are no batches (the output names are still compared)."""
    refs = original if isinstance(original, References) else References(original)
    pending, first = iter(batches), True
    while True:
        sess_a = None
        chunk, outputs, size = [], [], 0
        for feeds in pending:
            known = refs.known(feeds)
            if known is None:
                sess_a = sess_a or session(refs.model)
                refs.names = [o.name for o in sess_a.get_outputs()]
                known = run(sess_a, feeds)  # the original refusing data: the data's fault
                refs.keep(feeds, known)
            outputs.append(known)
            chunk.append(feeds)
            size += sum(o.nbytes for o in known if isinstance(o, np.ndarray))
            if size > REFERENCE_BYTES:
                break
        if refs.names is None:  # no batches at all: the names alone
            sess_a = session(refs.model)
            refs.names = [o.name for o in sess_a.get_outputs()]
        del sess_a
        if chunk or first:
            yield chunk, outputs, refs.names
        if size <= REFERENCE_BYTES:  # every batch was taken
            return
        first = False


def _result(errors: list[OutputError], problem: str, preds_a: list, preds_b: list,
            labels: np.ndarray | None) -> Comparison:
    floor = max(SCALE_FLOOR, RELATIVE_FLOOR * max((e.scale for e in errors), default=0.0))
    for err in errors:
        if problem:
            err.broken(problem)
        elif err.mismatches == 0 and math.isfinite(err.max_rel_error):
            err.max_rel_error = err.max_abs_error / max(err.scale, floor)
    result = Comparison(max((e.max_abs_error for e in errors), default=0.0),
                        max((e.max_rel_error for e in errors), default=0.0), None,
                        outputs=errors)
    if preds_a:
        pa, pb = np.concatenate(preds_a), np.concatenate(preds_b)
        result.top1_agreement = float((pa == pb).mean())
        if labels is not None and len(pa) == len(labels):
            result.accuracy_before = float((pa == labels).mean())
            result.accuracy_after = float((pb == labels).mean())
    return result


def _session_like(slimmed: onnx.ModelProto, names: list[str]):
    """A session of the slimmed model and "", or None and why it cannot stand in for the
    original (onnxruntime refuses it, or its outputs are not the same list)."""
    try:
        sess = session(slimmed)
    except Exception as exc:  # onnxruntime raises several unrelated types
        return None, f"onnxruntime cannot load the slimmed model: {first_line(exc)}"
    have = [o.name for o in sess.get_outputs()]
    return sess, "" if have == names else f"the slimmed model's outputs are {have}, not {names}"


def _looks_like_scores(value) -> bool:
    return isinstance(value, np.ndarray) and is_float(value.dtype) and value.ndim == 2 \
        and value.shape[1] > 1


def _accumulate(err: OutputError, a, b) -> None:
    """Fold one batch of one output into its running error."""
    a, b = _as_table(a), _as_table(b)
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        same = _nested_equal(a, b)  # sequence / map outputs: equal or not
        err.mismatches += 0 if same else 1
        err.max_abs_error = err.max_rel_error = max(err.max_rel_error, 0.0 if same else 1.0)
        return
    if a.shape != b.shape or a.dtype != b.dtype:
        err.broken(f"{a.dtype}{list(a.shape)} became {b.dtype}{list(b.shape)}", max(a.size, 1))
        return
    if not is_float(a.dtype):
        differ = int(np.count_nonzero(a != b))
        err.mismatches += differ
        share = differ / max(a.size, 1)
        err.max_abs_error = err.max_rel_error = max(err.max_rel_error, share)
        return
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64)
    same_nonfinite = ~finite & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    if not np.all((finite & np.isfinite(b64)) | same_nonfinite):
        err.broken("NaN/Inf where the original has other values")
        return
    diff = np.subtract(a64, b64, out=np.zeros_like(a64), where=finite & np.isfinite(b64))
    err.max_abs_error = max(err.max_abs_error, float(np.max(np.abs(diff), initial=0.0)))
    err.scale = max(err.scale, float(np.max(np.abs(a64), where=finite, initial=0.0)))


def _as_table(value):
    """A ZipMap's sequence of {label: probability} maps (scikit-learn classifiers) as a
    (samples, labels) float array, so it is compared within the tolerance like the tensor
    it was made from; anything else as it is."""
    if not isinstance(value, list) or not value or not all(isinstance(d, dict) for d in value):
        return value
    keys = sorted(value[0])
    if any(sorted(d) != keys for d in value) or \
            not all(isinstance(v, float | int) for d in value for v in d.values()):
        return value
    return np.array([[d[k] for k in keys] for d in value], dtype=np.float64)


def _nested_equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and \
            a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=is_float(a.dtype)))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    return a == b


@progress.phase("sensitivity probe set-up")
def output_error_probe(model: onnx.ModelProto, graph, groups, batches: Sequence[Mapping]):
    """A function plans -> relative squared output error of `model` slimmed by them."""
    from .probe import trial_run, trial_session  # probe.py imports the rewrite
    from .rewrite import apply

    reference = [run(model, feeds) for feeds in batches]
    energy = sum(float(np.sum(np.square(o, dtype=np.float64))) for outs in reference
                 for o in outs) or 1.0

    def probe(plans) -> float:
        sess = trial_session(apply(model, graph, groups, plans, finalize=False), plans)
        err = 0.0
        for feeds, ref in zip(batches, reference, strict=True):
            for a, b in zip(ref, trial_run(sess, feeds, plans), strict=True):
                err += float(np.sum(np.square(a.astype(np.float64) - b)))
        return err / energy

    return probe
