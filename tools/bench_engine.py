"""Benchmark the exact-lumping engine on a ResNet-50-sized CNN (~25M parameters).

Builds a standard ResNet-50 (BN folded into conv biases) in numpy with onnx.helper, with
He-initialized seeded random weights, and plants exact redundancy in every bottleneck:

* 1/4 of the filters of the first 1x1 conv are zero (weights and bias): dead channels;
* 1/8 of the filters of the 3x3 conv are x2.5 multiples (weights and bias) of other
  filters of the same conv: proportional channels, exact through the ReLU.

Each measurement runs in a fresh subprocess so that peak memory is clean: wall time of
``slim(path, out_path, latency_runs=0)`` (load + analysis + rewrite + validation + save) and
peak RSS (``ru_maxrss``), absolute and above the baseline right after the imports.

Run (from the repository root)::

    python tools/bench_engine.py            # full size, targets checked
    python tools/bench_engine.py --small    # widths / 4, quick check while developing
    python tools/bench_engine.py --profile  # also cProfile the child, print the hotspots
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))  # (blocks, width, stride)
EXPANSION = 4
CLASSES = 1000
IMAGE = 224
TARGET_SECONDS = 10.0
TARGET_MEMORY_RATIO = 3.0
DEAD_FRACTION = 4  # 1/4 of the first 1x1 conv's filters are zero
SCALED_FRACTION = 8  # 1/8 of the 3x3 conv's filters are x2.5 copies
SCALE = 2.5


@dataclass
class Plant:
    """Planted redundancy and the params/MACs its exact removal saves."""

    dead: int = 0
    scaled: int = 0
    params_saved: int = 0
    macs_saved: int = 0
    blocks: int = 0

    @property
    def channels(self) -> int:
        return self.dead + self.scaled


@dataclass
class Builder:
    """Collects nodes and initializers; names are unique and stable."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)

    def conv_weights(self, cout: int, cin: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        std = np.sqrt(2.0 / (cin * k * k))
        w = (self.rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        return w, b

    def conv(self, name: str, x: str, w: np.ndarray, b: np.ndarray, stride: int = 1,
             relu: bool = True) -> str:
        k = w.shape[2]
        self.inits += [numpy_helper.from_array(w, f"{name}.w"),
                       numpy_helper.from_array(b, f"{name}.b")]
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        return self.relu(f"{name}.relu", f"{name}.y") if relu else f"{name}.y"

    def relu(self, name: str, x: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}.y"], name=name))
        return f"{name}.y"

    def op(self, op_type: str, name: str, inputs: list[str], **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}.y"], name=name, **attrs))
        return f"{name}.y"


def plant_dead(w: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> int:
    """Zero 1/DEAD_FRACTION of the filters in place; returns how many."""
    k = w.shape[0] // DEAD_FRACTION
    idx = rng.choice(w.shape[0], k, replace=False)
    w[idx], b[idx] = 0.0, 0.0
    return k


def plant_scaled(w: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> int:
    """Make 1/SCALED_FRACTION of the filters x SCALE copies of distinct untouched filters."""
    k = w.shape[0] // SCALED_FRACTION
    perm = rng.permutation(w.shape[0])
    copies, sources = perm[:k], perm[k:2 * k]
    w[copies], b[copies] = w[sources] * SCALE, b[sources] * SCALE
    return k


def bottleneck(bld: Builder, name: str, x: str, cin: int, width: int, stride: int,
               hw: int, plant: Plant) -> tuple[str, int]:
    """Conv1x1-Relu, Conv3x3(stride)-Relu, Conv1x1, + shortcut, Relu. Returns (y, hw)."""
    cout, hw_out = width * EXPANSION, (hw + stride - 1) // stride
    w1, b1 = bld.conv_weights(width, cin, 1)
    w2, b2 = bld.conv_weights(width, width, 3)
    w3, b3 = bld.conv_weights(cout, width, 1)
    k1, k2 = plant_dead(w1, b1, bld.rng), plant_scaled(w2, b2, bld.rng)
    _account(plant, cin, width, cout, k1, k2, hw, hw_out)
    h = bld.conv(f"{name}.conv1", x, w1, b1)
    h = bld.conv(f"{name}.conv2", h, w2, b2, stride)
    h = bld.conv(f"{name}.conv3", h, w3, b3, relu=False)
    short = x
    if stride != 1 or cin != cout:
        ws, bs = bld.conv_weights(cout, cin, 1)
        short = bld.conv(f"{name}.proj", x, ws, bs, stride, relu=False)
    y = bld.op("Add", f"{name}.add", [h, short])
    return bld.relu(f"{name}.out", y), hw_out


def _account(plant: Plant, cin: int, w: int, cout: int, k1: int, k2: int, hw: int,
             hw_out: int) -> None:
    """Params and MACs that removing k1 conv1 outputs and k2 conv2 outputs saves."""
    before = (w * cin + w) + (w * w * 9 + w) + cout * w
    after = ((w - k1) * cin + w - k1) + ((w - k2) * (w - k1) * 9 + w - k2) + cout * (w - k2)
    macs_before = hw * hw * w * cin + hw_out * hw_out * (w * w * 9 + cout * w)
    macs_after = (hw * hw * (w - k1) * cin
                  + hw_out * hw_out * ((w - k2) * (w - k1) * 9 + cout * (w - k2)))
    plant.dead, plant.scaled, plant.blocks = plant.dead + k1, plant.scaled + k2, plant.blocks + 1
    plant.params_saved += before - after
    plant.macs_saved += macs_before - macs_after


def build_resnet50(div: int = 1, seed: int = 0) -> tuple[onnx.ModelProto, Plant]:
    """ResNet-50 with all widths divided by `div`, and the redundancy it carries."""
    bld, plant = Builder(np.random.default_rng(seed)), Plant()
    stem = 64 // div
    x = bld.conv("stem", "input", *bld.conv_weights(stem, 3, 7), stride=2)
    x = bld.op("MaxPool", "pool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin, hw = stem, IMAGE // 4
    for s, (blocks, width, stride) in enumerate(STAGES, 1):
        for i in range(blocks):
            x, hw = bottleneck(bld, f"layer{s}.{i}", x, cin, width // div,
                               stride if i == 0 else 1, hw, plant)
            cin = width // div * EXPANSION
    x = bld.op("GlobalAveragePool", "gap", [x])
    x = bld.op("Flatten", "flatten", [x], axis=1)
    return _finish(bld, x, cin), plant


def _finish(bld: Builder, x: str, cin: int) -> onnx.ModelProto:
    std = np.sqrt(2.0 / cin)
    w = (bld.rng.standard_normal((CLASSES, cin)) * std).astype(np.float32)
    b = (bld.rng.standard_normal(CLASSES) * 0.01).astype(np.float32)
    bld.inits += [numpy_helper.from_array(w, "fc.w"), numpy_helper.from_array(b, "fc.b")]
    bld.nodes.append(helper.make_node("Gemm", [x, "fc.w", "fc.b"], ["logits"], name="fc",
                                      transB=1))
    graph = helper.make_graph(
        bld.nodes, "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        bld.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="bench_engine")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- child side


def _rss_kib() -> int:
    """Peak RSS in KiB (Linux). Note: execve keeps the parent's peak, so the parent must stay
    small (it never builds the model itself); `_status_kib` cross-checks."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _status_kib(key: str) -> int:
    """VmRSS / VmHWM of this process's own address space, from /proc (0 where absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(src: str, dst: str, profile: str | None) -> None:
    """Runs in a fresh interpreter: one timed `slim`, result as JSON on the last line."""
    import time

    from onnxslim_fr import slim

    baseline, baseline_now = _rss_kib(), _status_kib("VmRSS")
    start = time.perf_counter()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(slim, src, dst, latency_runs=0)
        prof.dump_stats(profile)
    else:
        result = slim(src, dst, latency_runs=0)
    wall = time.perf_counter() - start
    rep = result.report
    removed = sum(g["size"] - g["kept"] for g in rep.groups)
    print(json.dumps({
        "wall_s": wall, "baseline_kib": baseline, "peak_kib": _rss_kib(),
        "baseline_vmrss_kib": baseline_now, "peak_vmhwm_kib": _status_kib("VmHWM"),
        "params": [rep.before.params, rep.after.params],
        "macs": [rep.before.flops, rep.after.flops],
        "channels": [rep.before.channels, rep.after.channels],
        "removed": removed, "max_rel_error": rep.max_rel_error, "rounds": rep.rounds,
        "out_bytes": os.path.getsize(dst)}))


# --------------------------------------------------------------------------- parent side


def build_child(div: int, seed: int, dst: str) -> None:
    """Runs in its own interpreter so the parent's peak RSS (inherited by the measured child
    across execve) stays small."""
    model, plant = build_resnet50(div, seed)
    onnx.save(model, dst)
    print(json.dumps(asdict(plant)))


def _run_self(*args: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode:
        sys.exit(f"child {args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(src: Path, dst: Path, profile: Path | None) -> dict:
    extra = ["--profile-out", str(profile)] if profile else []
    return _run_self("--child", str(src), str(dst), *extra)


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def _row(label: str, *cells: object) -> str:
    return f"{label:<34}" + "".join(f"{c!s:>18}" for c in cells)


def _pct(before: int, after: int) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else ""


def render(runs: list[dict], plant: Plant, file_bytes: int, div: int) -> str:
    r = runs[-1]
    wall = statistics.median(x["wall_s"] for x in runs)
    delta = statistics.median(x["peak_kib"] - x["baseline_kib"] for x in runs)
    peak = statistics.median(x["peak_kib"] for x in runs)
    hwm = statistics.median(x["peak_vmhwm_kib"] - x["baseline_vmrss_kib"] for x in runs)
    ratio = delta * 1024 / file_bytes
    exp_params = r["params"][0] - plant.params_saved
    exp_macs = r["macs"][0] - plant.macs_saved
    size = f" (widths / {div})" if div > 1 else ""
    lines = [
        f"ResNet-50{size}: {plant.blocks} bottlenecks, "
        f"{len(runs)} run(s) in fresh subprocesses, {os.cpu_count()} CPU(s)",
        _row("", "before", "after", "change"),
        _row("params", f"{r['params'][0]:,}", f"{r['params'][1]:,}",
             _pct(*r["params"])),
        _row("MACs (batch 1)", f"{r['macs'][0]:,}", f"{r['macs'][1]:,}", _pct(*r["macs"])),
        _row("channels (Conv/Gemm outputs)", f"{r['channels'][0]:,}", f"{r['channels'][1]:,}",
             _pct(*r["channels"])),
        _row("file bytes", f"{file_bytes:,}", f"{r['out_bytes']:,}",
             _pct(file_bytes, r["out_bytes"])),
        "",
        _row("", "planted", "removed", "match"),
        _row("channels (dead + x2.5)", f"{plant.dead} + {plant.scaled}", r["removed"],
             "yes" if r["removed"] == plant.channels else "NO"),
        _row("params after (expected)", f"{exp_params:,}", f"{r['params'][1]:,}",
             "yes" if exp_params == r["params"][1] else "NO"),
        _row("MACs after (expected)", f"{exp_macs:,}", f"{r['macs'][1]:,}",
             "yes" if exp_macs == r["macs"][1] else "NO"),
        _row("max relative error", f"{r['max_rel_error']:.3g}", "", f"rounds {r['rounds']}"),
        "",
        _row("", "measured", "target", "met"),
        _row("wall time slim()" + (" (median)" if len(runs) > 1 else ""), f"{wall:.2f} s",
             f"<= {TARGET_SECONDS:g} s", "yes" if wall <= TARGET_SECONDS else "NO"),
        _row("peak RSS above imports", _mib(delta), f"<= {_mib(3 * file_bytes / 1024)}",
             "yes" if ratio <= TARGET_MEMORY_RATIO else "NO"),
        _row("  as multiple of model size", f"{ratio:.2f}x", f"<= {TARGET_MEMORY_RATIO:g}x", ""),
        _row("peak RSS absolute", _mib(peak), "", ""),
        _row("baseline RSS after imports", _mib(r["baseline_kib"]), "", ""),
        _row("cross-check /proc VmHWM - VmRSS", _mib(hwm), "", ""),
    ]
    return "\n".join(lines)


def print_profile(path: Path, top: int) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    stats.strip_dirs()
    for key in ("cumulative", "tottime"):
        print(f"\n--- cProfile of slim(), top {top} by {key} ---")
        stats.sort_stats(key).print_stats(top)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="widths / 4, for a quick run")
    p.add_argument("--runs", type=int, default=1, help="fresh subprocesses to measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="extra cProfiled run, print hotspots")
    p.add_argument("--top", type=int, default=25, help="rows of the profile to print")
    p.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument("--build", nargs=3, metavar=("DIV", "SEED", "DST"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.build:
        build_child(int(args.build[0]), int(args.build[1]), args.build[2])
        return
    if args.child:
        child(*args.child, args.profile_out)
        return
    div = 4 if args.small else 1
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        src, dst = Path(tmp, "resnet50.onnx"), Path(tmp, "resnet50.slim.onnx")
        plant = Plant(**_run_self("--build", str(div), str(args.seed), str(src)))
        file_bytes = src.stat().st_size
        runs = [measure(src, dst, None) for _ in range(args.runs)]
        print(render(runs, plant, file_bytes, div))
        if args.profile:
            prof = Path(tmp, "slim.prof")
            measure(src, dst, prof)
            print_profile(prof, args.top)


if __name__ == "__main__":
    main()
