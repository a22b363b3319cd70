"""Accuracy of slimmed models vs. kept FLOPs: onnxslim_fr's methods against onnxsim 0.8.

For every classifier ``models/digits_*.onnx`` (kept-FLOPs targets 0.75 / 0.5 / 0.35) and the
shipped vision transformers ``models/vit_mnist{,_p4}{,_dynamo}.onnx`` (targets 0.8 / 0.67 /
0.5; the issue's target is >= 1.5x fewer MACs, kept 0.67, within 1 point of accuracy)
(``slim(ratio=1 - kept)``; data files from ``models/manifest.json``), prints test-split
accuracy of the original model, of
``lfrns``, ``greedy`` and ``magnitude`` (each with the kept FLOPs fraction it reached), and
of ``lfrns`` without the sequential refit (``lfrns 1-shot``, an ablation), and
of onnxsim 0.8.1 (structured Wanda pruning + ``apply_pruning_finetune``, see
``tools/onnxsim_baseline.py``). onnxsim's knob is a per-layer channel fraction, not a
FLOPs budget, so its ``amount`` is swept over a grid and the setting whose kept FLOPs
fraction is nearest each target is reported (a coarser grid on the transformers, where one
onnxsim run takes ~15 s). FLOPs are ``onnxslim_fr.report.flops`` (Conv/Gemm/MatMul MACs,
the attention MatMuls between two activations included, batch 1) for every method. For
each transformer it also prints the largest reduction each method reached within 1 point.

Also prints, per model, the wall time of ``slim(..., method="lfrns", ratio=0.5)`` divided by
one onnxruntime forward pass of the original model over the calibration set (batch 64),
against the target ratio of 3: once on the shipped calibration set (359 samples, where
fixed costs such as session creation dominate) and once on it tiled 32x with small jitter
(11,488 samples, where the per-sample cost shows); the transformers are not timed here
(``tools/bench_latency.py`` and ``tools/bench_coverage.py`` time them). Writes
``tools/bench_quality.png``.

Run (from the repository root)::

    pip install -e ".[bench]" && python tools/bench_quality.py [--models transformers]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import onnx
import onnxruntime as ort

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # also works from a checkout that is not pip-installed

from onnxsim_baseline import onnxsim_prune  # noqa: E402

from onnxslim_fr import slim  # noqa: E402
from onnxslim_fr.report import flops  # noqa: E402

MODELS = REPO / "models"
PLOT = REPO / "tools" / "bench_quality.png"
KEPT_TARGETS = (0.75, 0.5, 0.35)
TRANSFORMERS = ("vit_mnist.onnx", "vit_mnist_dynamo.onnx", "vit_mnist_p4.onnx",
                "vit_mnist_p4_dynamo.onnx")
TRANSFORMER_TARGETS = (0.8, 0.67, 0.5)
TRANSFORMER_AMOUNTS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_DROP = 0.01  # the transformer target: >= 1.5x fewer MACs within 1 point of accuracy
METHODS = ("lfrns", "greedy", "magnitude")
ONE_SHOT = "lfrns 1-shot"  # ablation: lfrns without the sequential refit (--no-refit)
COLUMNS = (*METHODS, ONE_SHOT)
ONNXSIM_AMOUNTS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
ONNXSIM_FLOOR = 0.9  # onnxsim "cannot reach" the target if it never gets below this
BATCH = 64
TIMING_RATIO = 0.5
TIMING_PASSES = 5
TIMING_SLIM_CALLS = 3
TIMING_TARGET = 3.0
SCALE_COPIES = 32  # timing at scale: the calibration set tiled 32x (~11.5k samples), jittered
SCALE_JITTER = 0.02
STYLES = {  # lfrns and greedy often coincide: a wide line under a narrow one keeps both visible
    "lfrns": {"marker": "o", "markersize": 9, "linewidth": 4, "alpha": 0.5},
    "greedy": {"marker": "s", "markersize": 4, "linewidth": 1.5},
    "magnitude": {"marker": "^", "markersize": 5, "linewidth": 1.5},
}


@dataclass
class Point:
    """One slimmed model: kept FLOPs fraction and test accuracy, or why it failed."""

    kept: float = float("nan")
    accuracy: float = float("nan")
    error: str | None = None
    setting: float | None = None  # onnxsim amount

    def cell(self) -> str:
        if self.error is not None:
            return "ERR"
        return f"{self.accuracy:.3f}@{self.kept:.2f}"


@dataclass
class ModelBench:
    """All results for one model file."""

    name: str
    original_accuracy: float
    targets: tuple[float, ...] = KEPT_TARGETS
    points: dict[tuple[str, float], Point] = field(default_factory=dict)
    onnxsim_sweep: list[Point] = field(default_factory=list)
    timing: tuple[float, float] | None = None  # (slim seconds, forward-pass seconds)
    timing_at_scale: tuple[float, float] | None = None  # same, calibration tiled


def data_paths(model_path: Path) -> tuple[Path, Path]:
    """(calibration, test) .npz for a model, as models/manifest.json names them."""
    prefix = json.loads((MODELS / "manifest.json").read_text())[model_path.name]
    return MODELS / f"{prefix}_calib.npz", MODELS / f"{prefix}_test.npz"


def is_transformer(path: Path) -> bool:
    return path.name in TRANSFORMERS


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def forward(sess: ort.InferenceSession, inputs: np.ndarray) -> np.ndarray:
    """Logits over all samples, batch by batch."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: inputs[s:s + BATCH]})[0] for s in range(0, len(inputs), BATCH)]
    return np.concatenate(outs)


def accuracy(model: onnx.ModelProto, test: dict[str, np.ndarray]) -> float:
    logits = forward(make_session(model), test["input"])
    return float(np.mean(logits.argmax(axis=1) == test["labels"]))


def run_slim(path: Path, column: str, kept: float, base_flops: int,
             test: dict[str, np.ndarray]) -> Point:
    calib_path, test_path = data_paths(path)
    method = "lfrns" if column == ONE_SHOT else column
    try:
        res = slim(str(path), data=str(calib_path), holdout=str(test_path), ratio=1 - kept,
                   method=method, sequential_refit=column != ONE_SHOT, latency_runs=0)
    except Exception as exc:  # report, do not hide: the table shows ERR, the text below
        return Point(error=f"{type(exc).__name__}: {exc}")
    return Point(kept=flops(res.model) / base_flops, accuracy=accuracy(res.model, test))


def onnxsim_sweep(model: onnx.ModelProto, calib: dict[str, np.ndarray], base_flops: int,
                  test: dict[str, np.ndarray], amounts: tuple[float, ...]) -> list[Point]:
    points = []
    for amount in amounts:
        try:
            pruned = onnxsim_prune(model, {"input": calib["input"]}, amount)
            points.append(Point(kept=flops(pruned) / base_flops,
                                accuracy=accuracy(pruned, test), setting=amount))
        except Exception as exc:
            points.append(Point(error=f"{type(exc).__name__}: {exc}", setting=amount))
    return points


def nearest(sweep: list[Point], kept: float) -> Point | None:
    ok = [p for p in sweep if p.error is None]
    return min(ok, key=lambda p: (abs(p.kept - kept), p.kept)) if ok else None


def onnxsim_cell(sweep: list[Point], kept: float) -> str:
    best = nearest(sweep, kept)
    if best is None:
        return "ERR (all amounts)"
    floor = min(p.kept for p in sweep if p.error is None)
    if floor > ONNXSIM_FLOOR:
        return f"n/a (min kept {floor:.2f})"
    return f"{best.cell()} (a={best.setting:.2f})"


def forward_seconds(model: onnx.ModelProto, calib: dict[str, np.ndarray]) -> float:
    """Median of TIMING_PASSES forward passes over the calibration set (after one warm-up)."""
    sess = make_session(model)
    forward(sess, calib["input"])
    times = []
    for _ in range(TIMING_PASSES):
        start = time.perf_counter()
        forward(sess, calib["input"])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def slim_seconds(path: Path, calib: dict[str, np.ndarray]) -> float:
    """Median wall time of the whole slim() call (lfrns, ratio 0.5, no latency runs)."""
    test_path = data_paths(path)[1]
    times = []
    for _ in range(TIMING_SLIM_CALLS):
        start = time.perf_counter()
        slim(str(path), data={"input": calib["input"]}, holdout=str(test_path),
             ratio=TIMING_RATIO, method="lfrns", latency_runs=0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(path: Path) -> ModelBench:
    model = onnx.load(str(path))
    calib_path, test_path = data_paths(path)
    calib, test = load_npz(calib_path), load_npz(test_path)
    base = flops(model)
    vit = is_transformer(path)
    bench = ModelBench(path.stem, accuracy(model, test),
                       TRANSFORMER_TARGETS if vit else KEPT_TARGETS)
    for kept in bench.targets:
        for column in COLUMNS:
            bench.points[column, kept] = run_slim(path, column, kept, base, test)
            print(f"  {path.stem} {column} kept {kept}: {bench.points[column, kept].cell()}",
                  file=sys.stderr, flush=True)
    bench.onnxsim_sweep = onnxsim_sweep(model, calib, base, test,
                                        TRANSFORMER_AMOUNTS if vit else ONNXSIM_AMOUNTS)
    return bench


def add_timing(bench: ModelBench, path: Path) -> None:
    model = onnx.load(str(path))
    calib = load_npz(data_paths(path)[0])
    bench.timing = (slim_seconds(path, calib), forward_seconds(model, calib))
    rng = np.random.default_rng(0)
    tiled = np.concatenate([calib["input"] + SCALE_JITTER * rng.standard_normal(
        calib["input"].shape).astype(np.float32) for _ in range(SCALE_COPIES)])
    big = {"input": tiled}
    bench.timing_at_scale = (slim_seconds(path, big), forward_seconds(model, big))


def render_table(benches: list[ModelBench]) -> str:
    header = ["model", "kept", "original", *COLUMNS, "onnxsim 0.8 (nearest)"]
    rows = [header]
    for b in benches:
        for kept in b.targets:
            rows.append([b.name, f"{kept:.2f}", f"{b.original_accuracy:.3f}",
                         *(b.points[m, kept].cell() for m in COLUMNS),
                         onnxsim_cell(b.onnxsim_sweep, kept)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def render_errors(benches: list[ModelBench]) -> str:
    lines = []
    for b in benches:
        for (method, kept), p in b.points.items():
            if p.error:
                lines.append(f"  {b.name} {method} kept={kept:.2f}: {p.error}")
        for p in b.onnxsim_sweep:
            if p.error:
                lines.append(f"  {b.name} onnxsim amount={p.setting:.2f}: {p.error}")
    return "\n".join(["errors:", *lines]) if lines else "errors: none"


def render_timing(benches: list[ModelBench]) -> str:
    lines = [f"slim wall time (lfrns, ratio {TIMING_RATIO}, median of {TIMING_SLIM_CALLS}) / "
             f"one onnxruntime pass over the calibration set (batch {BATCH}, median of "
             f"{TIMING_PASSES}); target <= {TIMING_TARGET:g}",
             f"  shipped calibration set (359 samples) | tiled {SCALE_COPIES}x with jitter "
             f"{SCALE_JITTER} (11,488 samples)"]
    timed = [b for b in benches if b.timing is not None]
    if not timed:
        return "timing: not measured (transformers only)"
    width = max(len(b.name) for b in timed)
    for b in timed:
        cells = []
        for timing in (b.timing, b.timing_at_scale):
            assert timing is not None
            slim_s, pass_s = timing
            ratio = slim_s / pass_s
            verdict = "met" if ratio <= TIMING_TARGET else "NOT met"
            cells.append(f"slim {slim_s * 1e3:7.0f} ms  pass {pass_s * 1e3:6.1f} ms  "
                         f"ratio {ratio:6.1f} {verdict:>7}")
        lines.append(f"  {b.name:<{width}}  " + "  |  ".join(cells))
    return "\n".join(lines)


def plot(benches: list[ModelBench], out: Path) -> None:
    cols = 3
    rows = -(-len(benches) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False,
                             sharey=True)
    for ax, b in zip(axes.flat, benches, strict=False):
        for method in METHODS:
            pts = [p for k in b.targets if (p := b.points[method, k]).error is None]
            ax.plot([1.0] + [p.kept for p in pts], [b.original_accuracy] +
                    [p.accuracy for p in pts], label=method, **STYLES[method])
        sweep = sorted((p for p in b.onnxsim_sweep if p.error is None), key=lambda p: -p.kept)
        ax.plot([1.0] + [p.kept for p in sweep], [b.original_accuracy] +
                [p.accuracy for p in sweep], marker=".", linestyle="--", label="onnxsim 0.8")
        ax.axhline(b.original_accuracy, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(b.name + (" (transformer)" if b.name + ".onnx" in TRANSFORMERS else ""))
        ax.set_xlim(1.02, 0.0)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("kept FLOPs fraction")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(benches):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def render_targets(benches: list[ModelBench]) -> str:
    """Per transformer and method: the fewest kept FLOPs reached within MAX_DROP accuracy."""
    lines = [f"transformers: fewest kept FLOPs within {MAX_DROP * 100:g} point of the original "
             "(target: kept <= 0.67, i.e. >= 1.5x fewer MACs)"]
    for b in benches:
        if b.name + ".onnx" not in TRANSFORMERS:
            continue
        cells = []
        for method in COLUMNS:
            ok = [p for k in b.targets if (p := b.points[method, k]).error is None
                  and p.accuracy >= b.original_accuracy - MAX_DROP - 1e-9]
            best = min(ok, key=lambda p: p.kept, default=None)
            cells.append(f"{method} " + ("none" if best is None else
                                         f"{best.kept:.2f} ({1 / best.kept:.2f}x)"))
        sim = [p for p in b.onnxsim_sweep if p.error is None
               and p.accuracy >= b.original_accuracy - MAX_DROP - 1e-9]
        best_sim = min(sim, key=lambda p: p.kept, default=None)
        cells.append("onnxsim " + ("none" if best_sim is None else
                                   f"{best_sim.kept:.2f} ({1 / best_sim.kept:.2f}x)"))
        lines.append(f"  {b.name}: " + ", ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("all", "digits", "transformers"), default="all")
    args = parser.parse_args(argv)
    paths = [] if args.models == "transformers" else sorted(MODELS.glob("digits_*.onnx"))
    if args.models != "digits":
        paths += [MODELS / name for name in TRANSFORMERS if (MODELS / name).exists()]
    start = time.perf_counter()
    benches = [bench_model(p) for p in paths]
    for b, p in zip(benches, paths, strict=True):
        if not is_transformer(p):
            add_timing(b, p)
    print("test accuracy @ kept FLOPs fraction reached (a = onnxsim amount)")
    print(render_table(benches))
    print()
    print(render_targets(benches))
    print()
    print(render_errors(benches))
    print()
    print(render_timing(benches))
    out = PLOT if args.models == "all" else PLOT.with_name(f"bench_quality_{args.models}.png")
    plot(benches, out)  # a partial run does not overwrite the full figure
    print()
    print(f"plot: {out.relative_to(REPO)}   total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
