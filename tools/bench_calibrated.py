"""Calibrated slimming at ResNet-50 scale: where the time goes, against one forward pass.

Builds the ResNet-50 of ``tools/bench_engine.py`` (seeded He-initialized weights, exact
redundancy planted), feeds it seeded Gaussian 224x224 images as calibration data (speed
only: random weights and inputs say nothing about accuracy) and times
``slim(ratio=0.3, method=lfrns)`` against one onnxruntime pass over the same images, with
the time per phase from cProfile, the probes measured and onnxruntime sessions built,
and the peak RSS. One row per calibration set size: the
fixed costs (forward selection, sensitivity probes) show at 32 images, the per-sample
ones (statistics, refit, validation) at 256. Targets (issue 10): slim <= 5 passes at 256
images; forward selection + probes under 20 s at 32. Wall and CPU seconds are both shown:
on a shared machine the CPU seconds are the steadier figure, so the phases are profiled in
process CPU seconds (onnxruntime's and BLAS's threads included) and compared with the CPU
seconds of one pass.

Run (from the repository root)::

    python tools/bench_calibrated.py                  # 32 and 256 images (about 5 minutes)
    python tools/bench_calibrated.py --samples 32     # one row
    python tools/bench_calibrated.py --small          # widths / 4
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_engine import build_resnet50  # noqa: E402

from onnxslim_fr import slim  # noqa: E402
from onnxslim_fr.report import params  # noqa: E402

SAMPLES, BATCH, RATIO = (32, 256), 8, 0.3
PASSES_TARGET, FIXED_TARGET = 5.0, 20.0
PHASES = {  # label: functions (file:name|name, space-separated) whose cumulative time adds up
    "channel statistics (collect)": "calibrate.py:collect",
    "forward selection": "selection.py:forward_order",
    "sensitivity probes": "redundancy.py:_sensitivity|sensitivities|trial_error "
                          "probe.py:__init__",
    "sequential refit": "refit.py:refit",
    "validation (on the calibration set here)": "validate.py:compare",
    "exact lumping rounds": "api.py:_exact",
}
FIXED = ("forward selection", "sensitivity probes")
#: wall seconds of the phases onnxslim_fr logs (progress.phase); planning holds the fixed
#: costs (selection, probes) and the allocation
WALL_FIXED = ("redundancy planning (orders, probes, allocation)", "sensitivity probe set-up")


class PhaseWall(logging.Handler):
    """Sums the wall seconds progress.phase logs per phase label."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.fullmatch(r"(.*): ([0-9.]+) s", record.getMessage())
        if found:
            label = found.group(1)
            self.seconds[label] = self.seconds.get(label, 0.0) + float(found.group(2))


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def forward_pass(model, feeds: np.ndarray, name: str) -> Clock:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {name: feeds[:BATCH]})
    with Clock() as clock:
        for i in range(0, len(feeds), BATCH):
            sess.run(None, {name: feeds[i:i + BATCH]})
    return clock


def phase_seconds(stats: pstats.Stats) -> dict[str, float]:
    out = {}
    for label, keys in PHASES.items():
        out[label] = 0.0
        for key in keys.split():
            file, funcs = key.split(":")
            out[label] += sum(v[3] for (path, _, fn), v in stats.stats.items()
                              if path.endswith(file) and fn in funcs.split("|"))
    return out


def calls(stats: pstats.Stats, file: str, name: str) -> int:
    """How often `file:name` ran (primitive calls)."""
    return sum(v[0] for (path, _, fn), v in stats.stats.items()
               if path.endswith(file) and fn == name)


def bench(model, samples: int, dump: str | None) -> None:
    name = model.graph.input[0].name
    images = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
    one = forward_pass(model, images, name)
    prof = cProfile.Profile(time.process_time)  # CPU seconds: steadier on a shared machine
    walls = PhaseWall()
    logger = logging.getLogger("onnxslim_fr.progress")
    logger.addHandler(walls)
    logger.setLevel(logging.INFO)
    with Clock() as clock:
        result = prof.runcall(slim, model, data={name: images}, ratio=RATIO, batch_size=BATCH,
                              latency_runs=0)
    logger.removeHandler(walls)
    if dump:
        prof.dump_stats(f"{dump}.{samples}")
    rep = result.report
    print(f"{samples} calibration images: kept FLOPs {rep.after.flops / rep.before.flops:.3f}"
          f"   relative output error {rep.max_rel_error:.3g} (calibration set)   top-1 "
          f"agreement {rep.top1_agreement:.3f}")
    print(f"  {'one onnxruntime pass over the calibration set':<46} {one.wall:8.2f} s   "
          f"cpu {one.cpu:8.2f} s")
    print(f"  {'slim() wall time':<46} {clock.wall:8.2f} s   cpu {clock.cpu:8.2f} s   "
          f"passes {clock.wall / one.wall:.1f} (cpu {clock.cpu / one.cpu:.1f}; target <= "
          f"{PASSES_TARGET:g} at 256)")
    stats = pstats.Stats(prof)
    phases = phase_seconds(stats)
    for label, seconds in phases.items():
        print(f"    {label:<44} cpu {seconds:8.2f} s   {seconds / one.cpu:6.1f} passes")
    fixed = sum(phases[k] for k in FIXED)
    print(f"    {'fixed costs (selection + probes)':<44} cpu {fixed:8.2f} s   (target < "
          f"{FIXED_TARGET:g} s at 32)")
    wall = sum(walls.seconds.get(k, 0.0) for k in WALL_FIXED)
    print(f"    {'  wall: planning + probe set-up':<44} wall {wall:7.2f} s   (the fixed costs "
          f"and the allocation)")
    print("  wall seconds per phase: " + " | ".join(
        f"{k.split(' (')[0]} {v:.1f}" for k, v in walls.seconds.items()))
    print(f"  {calls(stats, 'probe.py', '_measure')} probes measured "
          f"({calls(stats, 'probe.py', '__call__')} asked), "
          f"{calls(stats, 'runtime.py', 'session')} onnxruntime sessions built")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="widths / 4")
    parser.add_argument("--samples", type=int, action="append",
                        help=f"calibration images (repeatable; default {SAMPLES})")
    parser.add_argument("--profile", help="dump cProfile stats to PROFILE.<samples>")
    args = parser.parse_args()
    model, _ = build_resnet50(4 if args.small else 1)
    print(f"ResNet-50{' / 4' if args.small else ''}: {params(model):,} params, ratio {RATIO}, "
          f"lfrns, batch {BATCH}")
    for samples in args.samples or SAMPLES:
        bench(model, samples, args.profile)
    print(f"  {'peak RSS':<46} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f}"
          " MiB")


if __name__ == "__main__":
    main()
