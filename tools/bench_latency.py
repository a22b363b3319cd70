"""Is the slimmed model faster? MACs against measured latency, with and without rounding.

For the shipped models (calibration data from ``tools/fixtures.py``) and a ResNet-50-sized
CNN built with onnx.helper (He-initialized random weights, nothing planted, 32 Gaussian
224x224 calibration images), calibrated slimming removes ``--ratio`` of the MACs twice:
with ``round_to=1`` (any channel count) and with the default rounding. Each slimmed model
is then timed against the original at batch 1 and 32 with the library's own
``latency.compare`` (3 warm-up runs, then >= 30 alternating runs of each model and >= 1 s,
median and IQR) on 2 intra-op threads. Columns: MACs before / after and their ratio,
median latency before / after (IQR), speed-up, and speed-up / MACs reduction (1.0: latency
falls as fast as MACs; the target with rounding on is >= 0.8); ``noise`` when the change is
within the spread. Models under ~0.2 ms are bound by onnxruntime's per-run overhead, so
their ratio says little.

Slimmed models are cached (``--cache``, default ~/.cache/onnxslim-fr/bench_latency) under
the model's hash and the options, so reruns only time; ``--fresh`` slims again (do so after
changing the planner: the key does not follow the library's source).

Run (from the repository root)::

    python tools/bench_latency.py                       # everything (~20 min on 2 cores)
    python tools/bench_latency.py --small               # ResNet-50 widths / 4
    python tools/bench_latency.py --models digits_cnn,resnet50 --cpu-time
    python tools/bench_latency.py --models resnet50 --per-layer 32   # profiler, per kernel
    python tools/bench_latency.py --target latency      # allocate by measured layer ms
    python tools/bench_latency.py --sweep --cpu-time    # the measurement behind round_to 8

``--cpu-time`` times CPU seconds of one thread instead of wall time: on a machine shared
with other jobs it measures what the kernels cost rather than whose turn it was.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_engine import EXPANSION, IMAGE, STAGES, Builder  # noqa: E402
from fixtures import MODELS, fixture_for, load_split  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxslim_fr import latency, report, slim  # noqa: E402
from onnxslim_fr.lumping.budget import DEFAULT_ROUND_TO  # noqa: E402

SHIPPED = ("digits_cnn", "digits_cnn_bn", "digits_mlp", "keras_cnn", "yolo_c2f",
           "semobile_hswish", "paddle_lcnet", "audio_conv1d", "ocr_crnn", "dbnet_fpn")
BATCHES = (1, 32)
RESNET_SAMPLES, RESNET_BATCH = 32, 8
CACHE = Path.home() / ".cache" / "onnxslim-fr" / "bench_latency"


@dataclass
class Row:
    model: str
    round_to: int
    batch: int
    macs: tuple[int, int]
    timing: latency.Comparison

    @property
    def macs_reduction(self) -> float:
        return self.macs[0] / max(self.macs[1], 1)

    @property
    def speedup(self) -> float:
        return self.timing.before.median_ms / self.timing.after.median_ms


def build_resnet50(div: int = 1, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 (v1.5: stride on the 3x3 conv, BN folded into biases), widths / `div`,
    random weights and nothing planted: all redundancy is what calibration finds."""
    bld = Builder(np.random.default_rng(seed))
    stem = 64 // div
    x = bld.conv("stem", "input", *bld.conv_weights(stem, 3, 7), stride=2)
    x = bld.op("MaxPool", "pool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = stem
    for s, (blocks, width, stride) in enumerate(STAGES, 1):
        for i in range(blocks):
            x = _bottleneck(bld, f"layer{s}.{i}", x, cin, width // div, stride if i == 0 else 1)
            cin = width // div * EXPANSION
    x = bld.op("Flatten", "flatten", [bld.op("GlobalAveragePool", "gap", [x])], axis=1)
    w = (bld.rng.standard_normal((1000, cin)) * np.sqrt(2.0 / cin)).astype(np.float32)
    bld.inits += [numpy_helper.from_array(w, "fc.w"),
                  numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")]
    bld.nodes.append(helper.make_node("Gemm", [x, "fc.w", "fc.b"], ["logits"], name="fc",
                                      transB=1))
    graph = helper.make_graph(
        bld.nodes, "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], bld.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _bottleneck(bld: Builder, name: str, x: str, cin: int, width: int, stride: int) -> str:
    cout = width * EXPANSION
    h = bld.conv(f"{name}.conv1", x, *bld.conv_weights(width, cin, 1))
    h = bld.conv(f"{name}.conv2", h, *bld.conv_weights(width, width, 3), stride)
    h = bld.conv(f"{name}.conv3", h, *bld.conv_weights(cout, width, 1), relu=False)
    short = x
    if stride != 1 or cin != cout:
        short = bld.conv(f"{name}.proj", x, *bld.conv_weights(cout, cin, 1), stride,
                         relu=False)
    return bld.relu(f"{name}.out", bld.op("Add", f"{name}.add", [h, short]))


def jobs(names: list[str], small: bool) -> list[tuple[str, onnx.ModelProto, dict]]:
    """(label, model, calibration feeds) for each requested model that has data."""
    out = []
    for name in names:
        if name == "resnet50":
            model = build_resnet50(4 if small else 1)
            images = np.random.default_rng(0).standard_normal(
                (RESNET_SAMPLES, 3, IMAGE, IMAGE)).astype(np.float32)
            out.append(("resnet50" + ("/4" if small else ""), model, {"input": images}))
            continue
        fx = fixture_for(f"{name}.onnx")
        if fx is None or not (MODELS / f"{name}.onnx").exists():
            print(f"skipped {name}: no model or no calibration data in models/")
            continue
        model = onnx.load(MODELS / f"{name}.onnx")
        out.append((name, model, load_split(fx.data_path("calib"), model)[0]))
    return out


def bench(label: str, model: onnx.ModelProto, calib: dict, args: argparse.Namespace
          ) -> list[Row]:
    rows = []
    feeds = {k: v[:1] for k, v in calib.items()}
    partly = _uncounted(model, feeds)
    for round_to in (1, DEFAULT_ROUND_TO):
        slimmed, macs = _slimmed(label, model, calib, round_to, args)
        for batch in BATCHES:
            timing = latency.Timing(runs=args.runs, batch=batch, threads=args.threads,
                                    clock=time.process_time if args.cpu_time else
                                    time.perf_counter)
            cmp = latency.compare(model, slimmed, feeds, timing)
            rows.append(Row(label + ("*" if partly else ""), round_to, cmp.batch, macs, cmp))
            print("  " + render_row(rows[-1]), flush=True)
        if args.per_layer:
            per_layer(model, slimmed, feeds, args.per_layer, args.threads)
    return rows


def per_layer(model: onnx.ModelProto, slimmed: onnx.ModelProto, feeds: dict, batch: int,
              threads: int | None, top: int = 12) -> None:
    """Where the time goes, from onnxruntime's profiler: the slowest kernels of the original
    and of the slimmed model (median ms of 10 runs after warm-up, input -> output channels
    as the kernel saw them: a blocked NCHWc convolution pads channels to its block), and
    the time outside Conv/Gemm/MatMul, which does not shrink with the MACs."""
    feeds = latency.at_batch(model, feeds, batch)[0]
    for title, m in (("original", model), ("slimmed", slimmed)):
        times = _profile(m, feeds, threads)
        heavy = sum(ms for op, _, ms in times.values() if op in COSTED)
        rest = sum(ms for op, _, ms in times.values() if op not in COSTED)
        print(f"    {title} at batch {batch}: {heavy:.2f} ms in Conv/Gemm/MatMul kernels, "
              f"{rest:.2f} ms elsewhere; slowest kernels:")
        for name, (op, chans, ms) in sorted(times.items(), key=lambda kv: -kv[1][2])[:top]:
            print(f"      {name[-40:]:<42}{op:<14}{chans:<14}{ms:>8.3f}")


COSTED = ("Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _profile(model: onnx.ModelProto, feeds: dict, threads: int | None, runs: int = 10
             ) -> dict[str, tuple[str, str, float]]:
    """Median ms over `runs` (after 3 warm-ups) of every node onnxruntime ran:
    name -> (kernel op, 'in->out' channels, ms)."""
    import json
    import tempfile

    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    warmup = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        for _ in range(runs + warmup):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    seen: dict[str, tuple[str, str, list[float]]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            args = e["args"]
            shapes = [next(iter(d.values())) for d in
                      [*args.get("input_type_shape", [])[:1], *args.get("output_type_shape", [])]]
            chans = "->".join(str(s[1]) if len(s) > 1 else "-" for s in shapes)
            seen.setdefault(name, (args.get("op_name", "?"), chans, []))[2].append(e["dur"] / 1e3)
    return {k: (op, ch, float(np.median(d[warmup:] or d))) for k, (op, ch, d) in seen.items()}


def _slimmed(label: str, model: onnx.ModelProto, calib: dict, round_to: int,
             args: argparse.Namespace) -> tuple[onnx.ModelProto, tuple[int, int]]:
    """The slimmed model and MACs before / after, from --cache when it holds them (the
    calibrated ResNet-50 takes minutes: time it once, measure it as often as needed)."""
    path = _cache_path(label, model, round_to, args) if args.cache else None
    if path is not None and path.exists() and not args.fresh:
        slimmed = onnx.load(path)
        macs = tuple(int(v) for v in path.with_suffix(".macs").read_text().split())
        return slimmed, macs  # type: ignore[return-value]
    start = time.perf_counter()
    result = slim(model, data=calib, ratio=args.ratio, round_to=round_to, method=args.method,
                  target=args.target, batch_size=RESNET_BATCH, latency_runs=0,
                  latency_batch=args.latency_batch, threads=args.threads)
    rep = result.report
    print(f"  {label}: round_to {round_to}: slimmed in {time.perf_counter() - start:.1f} s, "
          f"kept {[g['kept'] for g in rep.groups if not g['frozen']][:12]}", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(result.model, path)
        path.with_suffix(".macs").write_text(f"{rep.before.flops} {rep.after.flops}")
    return result.model, (rep.before.flops, rep.after.flops)


def _cache_path(label: str, model: onnx.ModelProto, round_to: int, args: argparse.Namespace
                ) -> Path:
    """Cache file keyed by the model's bytes and the options (after a change to the planner,
    pass --fresh: the key does not follow the library's source, which others edit)."""
    digest = hashlib.sha256(model.SerializeToString())
    digest.update(f"{round_to} {args.ratio} {args.method} {args.target}".encode())
    if args.target == "latency":
        digest.update(f" {args.latency_batch} {args.threads}".encode())
    name = f"{label.replace('/', '_')}-r{round_to}-{digest.hexdigest()[:16]}.onnx"
    return Path(args.cache) / name


def _uncounted(model: onnx.ModelProto, feeds: dict) -> int:
    """Conv/Gemm/MatMul/RNN nodes of the original whose MACs are not counted (weights in
    Constant nodes, shapes that do not infer): its MACs, and the --ratio budget taken from
    them, are then too low."""
    ops = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
    costs = report.node_costs(model, feeds)  # per-channel carriers count (0 MACs, params)
    return sum(n.op_type in ops and i not in costs for i, n in enumerate(model.graph.node))


HEADER = (f"{'model':<16}{'round':>6}{'batch':>6}{'MMACs before':>14}{'after':>10}"
          f"{'reduction':>10}{'ms before (IQR)':>22}{'ms after (IQR)':>22}{'speed-up':>9}"
          f"{'speed-up/MACs':>15}")


def render_row(r: Row) -> str:
    b, a = r.timing.before, r.timing.after
    return (f"{r.model:<16}{r.round_to:>6}{r.batch:>6}{r.macs[0] / 1e6:>14.2f}"
            f"{r.macs[1] / 1e6:>10.2f}{r.macs_reduction:>9.2f}x"
            f"{f'{b.median_ms:.3f} ({b.spread_ms:.3f})':>22}"
            f"{f'{a.median_ms:.3f} ({a.spread_ms:.3f})':>22}{r.speedup:>8.2f}x"
            f"{r.speedup / r.macs_reduction:>15.2f}"
            f"{'  noise' if latency.is_noise(b, a) else ''}")


def _chain(op: str, width: int, depth: int, features: int) -> onnx.ModelProto:
    """`depth` 3x3 convs of `width` channels (op Conv), or MatMul features -> width ->
    features (op MatMul), ReLU between: the layer shapes whose speed the sweep compares."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    shapes = [(width, width, 3, 3)] * depth if op == "Conv" else [(features, width),
                                                                   (width, features)]
    for i, shape in enumerate(shapes):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.05).astype(np.float32), f"w{i}"))
        attrs = {"kernel_shape": [3, 3], "pads": [1] * 4} if op == "Conv" else {}
        nodes += [helper.make_node(op, [x, f"w{i}"], [f"y{i}"], **attrs),
                  helper.make_node("Relu", [f"y{i}"], [f"r{i}"])]
        x = f"r{i}"
    dims = ["N", width, 14, 14] if op == "Conv" else ["N", features]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, dims)], [helper.make_tensor_value_info(x, TensorProto.FLOAT,
                                                                        None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def sweep(args: argparse.Namespace) -> None:
    """Milliseconds per width (the lowest of 5 interleaved medians) and MACs per ms
    relative to the widest: how much a channel count that is not a multiple of 8 costs."""
    from onnxslim_fr.runtime import runner, session
    clock = time.process_time if args.cpu_time else time.perf_counter
    cases = [("4 x Conv 3x3 14x14", "Conv", list(range(48, 65)), 64, 4),
             ("MatMul 512-w-512", "MatMul", [240, 241, 244, 246, 248, 250, 252, 254, 256,
                                            257, 260, 264], 32, 2)]
    for title, op, widths, batch, runs in cases:
        go = {}
        for w in widths:
            shape = (batch, w, 14, 14) if op == "Conv" else (batch, 512)
            feeds = {"x": np.random.default_rng(0).random(shape, np.float32)}
            go[w] = runner(session(_chain(op, w, 4, 512), args.threads), feeds)
            go[w]()
        best = dict.fromkeys(widths, float("inf"))
        for _ in range(5):
            for w in widths:
                times = []
                for _ in range(runs):
                    tick = clock()
                    go[w]()
                    times.append((clock() - tick) * 1e3)
                best[w] = min(best[w], float(np.median(times)))
        macs = {w: (w * w if op == "Conv" else w) / best[w] for w in widths}
        print(f"{title}, batch {batch}: width, ms, MACs per ms relative to {widths[-1]}")
        for w in widths:
            print(f"  {w:>4} {best[w]:9.3f} {macs[w] / macs[widths[-1]]:6.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join((*SHIPPED, "resnet50")),
                   help="comma-separated model names (resnet50: the built ResNet-50)")
    p.add_argument("--small", action="store_true", help="ResNet-50 widths / 4")
    p.add_argument("--ratio", type=float, default=0.5, help="share of MACs to remove")
    p.add_argument("--method", default="lfrns", help="lfrns (default), greedy or magnitude")
    p.add_argument("--target", default="flops", help="flops (default) or latency")
    p.add_argument("--latency-batch", type=int, default=1,
                   help="--target latency: batch the layer tables are timed at (default 1)")
    p.add_argument("--runs", type=int, default=30, help="at least this many runs per model")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time CPU seconds of one thread instead of wall time")
    p.add_argument("--cache", metavar="DIR", default=str(CACHE),
                   help=f"keep slimmed models here and reuse them (default {CACHE}; '' off)")
    p.add_argument("--per-layer", type=int, metavar="BATCH", default=0,
                   help="also profile each layer at this batch (onnxruntime's profiler)")
    p.add_argument("--fresh", action="store_true", help="slim again, replacing cached models")
    p.add_argument("--sweep", action="store_true", help="only the width sweep behind the "
                   "default round_to: 4 3x3 convs at 14x14 (48..64 channels), MatMul widths")
    args = p.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sweep:
        sweep(args)
        return
    threads = args.threads or latency.default_threads()
    print(f"ratio {args.ratio}, method {args.method}, {threads} thread(s), "
          f"{'CPU' if args.cpu_time else 'wall'} time, default round_to {DEFAULT_ROUND_TO}")
    rows = []
    for label, model, calib in jobs(args.models.split(","), args.small):
        rows.extend(bench(label, model, calib, args))
    print()
    print(HEADER)
    for r in rows:
        print(render_row(r))
    if any(r.model.endswith("*") for r in rows):
        print("* MACs of the original only partly counted (weights in Constant nodes, or "
              "shapes after a computed Slice that do not infer): the MACs reduction shown "
              "is not the real one")


if __name__ == "__main__":
    main()
