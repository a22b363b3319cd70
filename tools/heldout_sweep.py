"""Held-out sweep: real exporters' models, run through the CLI as a new user would.

Regenerates the models (``tools/heldout_export.py`` in each framework's own environment,
skipped when a file is already there) into a scratch directory outside the repository,
then for every ``*.onnx`` there runs, through ``python -m onnxslim_fr``:

* exact mode (``IN OUT --report``): exit code, producer channels removed, and the max
  relative output error measured HERE, independently of the tool's report, on the test
  inputs (a wrong model at exit 0 is flagged ``WRONG``);
* ``--inspect``: exit code;
* calibrated ``--ratio 0.3`` (``--data`` / ``--holdout`` from ``skimage.data`` crops for
  image models, random ids / signals otherwise): exit code, kept FLOPs, top-1 agreement;

and, through ``onnxslim_fr.analyze``, the share of producer channels in unfrozen groups and
the top freeze reasons (the measures of ``tools/bench_coverage.py``)::

    python tools/heldout_sweep.py [--dir /tmp/heldout] [--models NAME ...] [--no-export]
        [--no-calibrated] [--paddle-python /tmp/venv-exp/bin/python]
        [--tf-python /tmp/venv-exp-tf/bin/python] [--second --skl-python PY]

``--second`` (with ``--dir /tmp/heldout2``) builds and sweeps the second set
(``tools/heldout_export2.py``: scikit-learn MLPs, more Keras / Paddle / torch patterns).

The Paddle and TensorFlow environments (kept out of the project's dependencies)::

    python3.11 -m venv /tmp/venv-exp && /tmp/venv-exp/bin/pip install paddlepaddle \
        paddle2onnx packaging onnxruntime
    python3.11 -m venv /tmp/venv-exp-tf && /tmp/venv-exp-tf/bin/pip install tensorflow-cpu \
        tf2onnx onnxruntime

A "before" table of another checkout: ``PYTHONPATH=/path/to/checkout python
tools/heldout_sweep.py --no-export`` (the CLI runs outside the repository for that reason).
Each row is also written to stderr as soon as its model is done.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_coverage import Result, coverage

HERE = Path(__file__).resolve().parent
TIMEOUT = 900
N_CALIB, N_TEST = 24, 8


# ------------------------------------------------------------------------------- data


def _images(n: int, side: int, seed: int) -> np.ndarray:
    """Random crops of scikit-image's colour photographs, NCHW float32 in about [-2, 2]."""
    from skimage import data, transform

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
              data.immunohistochemistry()]
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        img = photos[i % len(photos)]
        size = int(rng.integers(side, min(img.shape[:2])))
        y, x = (int(rng.integers(0, d - size + 1)) for d in img.shape[:2])
        crop = transform.resize(img[y:y + size, x:x + size], (side, side), anti_aliasing=True)
        out.append(crop.transpose(2, 0, 1))
    arr = np.asarray(out, np.float32)
    return (arr - 0.45) / 0.25


def _digits(n: int, seed: int) -> np.ndarray:
    """Rows of scikit-learn's 8x8 digits (what the skl2onnx models were trained on)."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    return x[np.random.default_rng(seed).permutation(len(x))[:n]]


def make_feeds(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs for the model's single input: images, token ids, digits or signals."""
    inp = model.graph.input[0]
    tt = inp.type.tensor_type
    dims = [d.dim_value or 1 for d in tt.shape.dim][1:]
    rng = np.random.default_rng(seed)
    if model.producer_name.startswith("skl2onnx") and dims == [64]:
        return {inp.name: _digits(n, seed)}
    if tt.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
        dtype = np.int32 if tt.elem_type == onnx.TensorProto.INT32 else np.int64
        return {inp.name: rng.integers(0, 200, (n, *dims)).astype(dtype)}
    if len(dims) == 3 and 3 in (dims[0], dims[-1]):
        imgs = _images(n, dims[1], seed)
        return {inp.name: imgs if dims[0] == 3 else imgs.transpose(0, 2, 3, 1).copy()}
    x = rng.standard_normal((n, *dims)).cumsum(axis=1) / 4  # smooth random signals
    return {inp.name: x.astype(np.float32)}


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output as an array: a ZipMap's list of {class: probability} becomes a matrix."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    return [np.array([[d[k] for k in sorted(d)] for d in o]) if isinstance(o, list) else o
            for o in outs]


def top1(out: np.ndarray) -> np.ndarray:
    """Predicted class per sample: a label output as it is, scores by their argmax."""
    if out.dtype.kind in "iu" and out.ndim == 1:
        return out
    return out.reshape(len(out), -1).argmax(1)


def rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest output difference, each output on its own scale (as the tool measures)."""
    errs = []
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        x, y = x.astype(np.float64), y.astype(np.float64)
        errs.append(float(np.abs(x - y).max() / max(float(np.abs(x).max()), 1e-12)))
    return max(errs, default=0.0)


def plant(src: Path, dst: Path) -> None:
    """A copy whose Conv / Gemm / MatMul producers each have one dead output channel
    (zero weights and bias), so exact mode must really remove and fold channels in the
    exporter's own graph (random weights alone leave nothing to remove)."""
    from onnx import numpy_helper

    model = onnx.load(str(src))
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    for node in model.graph.node:
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type not in ("Conv", "Gemm", "MatMul") or groups != 1 or \
                len(node.input) < 2 or node.input[1] not in tensors:
            continue
        w = numpy_helper.to_array(tensors[node.input[1]]).copy()
        if w.ndim < 2 or w.dtype.kind != "f":
            continue
        axis = 0 if node.op_type == "Conv" else w.ndim - 1
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            axis = 0
        if w.shape[axis] < 4:
            continue
        np.moveaxis(w, axis, 0)[1] = 0
        tensors[node.input[1]].CopyFrom(numpy_helper.from_array(w, tensors[node.input[1]].name))
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in tensors:
            b = numpy_helper.to_array(tensors[node.input[2]]).copy()
            b[1] = 0
            tensors[node.input[2]].CopyFrom(numpy_helper.from_array(b, tensors[node.input[2]].name))
    onnx.save(model, str(dst))


# -------------------------------------------------------------------------------- runs


def cli(args: list[str]) -> tuple[int, str, float]:
    """Exit code, last stderr line and seconds of one ``python -m onnxslim_fr`` run."""
    start = time.time()
    try:
        # run outside the repository: `python -m` puts the working directory first on
        # sys.path, which would hide a PYTHONPATH checkout (the "before" table)
        proc = subprocess.run([sys.executable, "-m", "onnxslim_fr", *args, "-q"],
                              capture_output=True, text=True, timeout=TIMEOUT,
                              cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return -1, f"timeout {TIMEOUT}s", time.time() - start
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "onnxruntime:" not in ln]
    return proc.returncode, (lines[-1] if lines else ""), time.time() - start


def exact_row(path: Path, tmp: Path, test: dict, result: Result) -> str:
    out, rep = tmp / "exact.onnx", tmp / "exact.json"
    code, err, secs = cli([str(path), str(out), "--report", str(rep)])
    if code != 0:
        _count(result, code, f"exact exit {code}: {err}")
        return f"exit {code} ({secs:.0f}s)"
    report = json.loads(rep.read_text())
    mine = rel_error(run(path, test), run(out, test))
    flag = " WRONG" if not mine <= 1e-3 else ""
    if flag:
        result.crashes += 1
        result.details.append(f"exact WRONG at exit 0: measured rel err {mine:.2e}")
    ch = report["channels_after"] - report["channels_before"]
    return f"0 {ch:+d}ch err {mine:.0e}{flag} ({secs:.0f}s)"


def calibrated_row(path: Path, tmp: Path, calib: dict, test: dict, result: Result) -> str:
    out, rep = tmp / "cal.onnx", tmp / "cal.json"
    np.savez(tmp / "calib.npz", **calib)
    np.savez(tmp / "test.npz", **test)
    code, err, secs = cli([str(path), str(out), "--data", str(tmp / "calib.npz"), "--holdout",
                           str(tmp / "test.npz"), "--ratio", "0.3", "--report", str(rep)])
    if code != 0:
        _count(result, code, f"calibrated exit {code}: {err}")
        return f"exit {code} ({secs:.0f}s)"
    r = json.loads(rep.read_text())
    kept = r["flops_after"] / r["flops_before"] if r["flops_before"] else float("nan")
    before, after = run(path, test), run(out, test)
    agree = float(np.mean(top1(before[0]) == top1(after[0])))
    mine = rel_error(before, after)
    if mine > 2 * max(r["max_rel_error"], 1e-6):  # the report must not understate the error
        result.crashes += 1
        result.details.append(f"calibrated error {mine:.2e} on the hold-out, report says "
                              f"{r['max_rel_error']:.2e}")
    return f"0 kept {kept:.2f} agree {agree:.0%} err {mine:.0e} ({secs:.0f}s)"


def _count(result: Result, code: int, line: str) -> None:
    """Exit 3 / a traceback / a timeout is a crash; 1 and 2 are refusals."""
    if code in (1, 2):
        result.refusals += 1
    else:
        result.crashes += 1
    result.details.append(line[:300])


Feeds = Callable[[onnx.ModelProto, int, int], dict[str, np.ndarray]]  # (model, n, seed)


def sweep_one(path: Path, calibrated: bool = True, feeds: Feeds | None = None,
              sizes: tuple[int, int] = (N_CALIB, N_TEST)) -> tuple[Result, str, str, str]:
    """One model's row: coverage, --inspect, exact and calibrated runs of the CLI, on
    `sizes` calibration / test samples from `feeds` (default make_feeds)."""
    feeds = feeds or make_feeds
    result, start = Result(path.stem), time.time()
    model = onnx.load(str(path))
    try:
        coverage(model, result)
    except Exception as exc:  # a sweep shows every failure, it never stops on one
        result.crashes += 1
        result.details.append(f"analyze CRASH {type(exc).__name__}: {exc}"[:300])
    calib, test = feeds(model, sizes[0], 0), feeds(model, sizes[1], 1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        code, err, _ = cli([str(path), "--inspect"])
        inspect = "0" if code == 0 else f"exit {code}"
        if code != 0:
            _count(result, code, f"inspect exit {code}: {err}")
        ex = exact_row(path, tmp, test, result)
        cal = calibrated_row(path, tmp, calib, test, result) if calibrated else "not run"
    result.seconds = time.time() - start
    return result, inspect, ex, cal


# ------------------------------------------------------------------------------ driver


def render(rows: list[tuple[Result, str, str, str]]) -> str:
    head = (f"{'model':<32} {'prod ch':>7} {'unfrozen':>8} {'insp':<5} "
            f"{'exact (exit, ch, err)':<30} "
            f"{'calibrated 0.3 (exit, kept FLOPs, top-1 agree, err)':<46} top freeze reasons")
    lines = [head, "-" * len(head)]
    for r, insp, ex, cal in rows:
        share = f"{r.unfrozen / r.producer_channels:.0%}" if r.producer_channels else "-"
        reasons = "; ".join(f"{k} ({v})" for k, v in r.reasons.most_common(3))
        lines.append(f"{r.name:<32} {r.producer_channels:>7} {share:>8} {insp:<5} {ex:<30} "
                     f"{cal:<46} {reasons}")
    results = [row[0] for row in rows]
    total, unfrozen = sum(r.producer_channels for r in results), sum(r.unfrozen for r in results)
    shares = [r.unfrozen / r.producer_channels for r in results if r.producer_channels]
    lines += ["", f"models {len(rows)}; producer channels {total}, unfrozen "
              f"{unfrozen / max(total, 1):.1%} overall, median per model "
              f"{float(np.median(shares)) if shares else 0:.1%}; crashes/wrong "
              f"{sum(r.crashes for r in results)}, refusals {sum(r.refusals for r in results)}"]
    reasons = sum((r.reasons for r in results), Counter())
    lines += ["", "freeze reasons over all models (channels):"]
    lines += [f"  {v:>6}  {k}" for k, v in reasons.most_common()]
    lines += ["", "details:"]
    for r in results:
        lines += [f"  {r.name} ({r.seconds:.0f} s)"] + [f"    {d}" for d in r.details]
    return "\n".join(lines)


def export(out: Path, pythons: dict[str, str], script: str) -> None:
    """Run each framework's exporter in its own interpreter; a missing one is skipped."""
    for framework, python in pythons.items():
        if not python or not Path(python).exists():
            print(f"no interpreter for {framework}: its models are skipped", file=sys.stderr)
            continue
        subprocess.run([python, str(HERE / script), framework, "--out", str(out)],
                       check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/heldout"))
    parser.add_argument("--models", nargs="*", help="only files whose name contains one of these")
    parser.add_argument("--no-export", action="store_true", help="sweep what is there")
    parser.add_argument("--no-calibrated", action="store_true", help="skip the --ratio runs")
    parser.add_argument("--plant", action="store_true",
                        help="sweep copies with one dead channel per producer (DIR/planted)")
    parser.add_argument("--paddle-python", default="/tmp/venv-exp/bin/python")
    parser.add_argument("--tf-python", default="/tmp/venv-exp-tf/bin/python")
    parser.add_argument("--skl-python", default="/tmp/venv-skl/bin/python")
    parser.add_argument("--second", action="store_true",
                        help="the second set (tools/heldout_export2.py, scikit-learn too)")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if not args.no_export:
        pythons = {"torch": sys.executable, "paddle": args.paddle_python,
                   "keras": args.tf_python}
        if args.second:
            pythons["sklearn"] = args.skl_python
        export(args.dir, pythons, "heldout_export2.py" if args.second else "heldout_export.py")
    paths = sorted(args.dir.glob("*.onnx"))
    if args.plant:
        (args.dir / "planted").mkdir(exist_ok=True)
        for path in paths:
            plant(path, args.dir / "planted" / path.name)
        paths = sorted((args.dir / "planted").glob("*.onnx"))
    rows = []
    for path in paths:
        if args.models and not any(m in path.name for m in args.models):
            continue
        rows.append(sweep_one(path, not args.no_calibrated))
        print(render(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)  # its row
    print(render(rows))


if __name__ == "__main__":
    main()
