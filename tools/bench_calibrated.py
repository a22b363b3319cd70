"""Calibrated slimming at ResNet-50 scale: where the time goes, against one forward pass.

Builds the ResNet-50 of ``tools/bench_engine.py`` (seeded He-initialized weights, exact
redundancy planted), feeds it seeded Gaussian 224x224 images as calibration data (speed
only: random weights and inputs say nothing about accuracy) and times
``slim(ratio=0.3, method=lfrns)`` against one onnxruntime pass over the same images, with
the wall and process CPU seconds of each phase as onnxslim_fr logs them (progress.phase;
CPU includes onnxruntime's and BLAS's threads, and the probes' worker thread), the probes
measured and onnxruntime sessions built, and the peak RSS. One row per calibration set
size: the fixed costs (probe set-up, forward selection, probes, allocation) show at 32
images, the per-sample ones (statistics, refit, validation) at 256. Targets (issue 10):
slim <= 5 passes at 256 images; fixed costs under 20 s at 32. On a shared machine the CPU
seconds are the steadier figure; wall seconds are what a user waits.

Run (from the repository root)::

    python tools/bench_calibrated.py                  # 32 and 256 images (about 5 minutes)
    python tools/bench_calibrated.py --samples 32     # one row
    python tools/bench_calibrated.py --small          # widths / 4
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import re
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_engine import build_resnet50  # noqa: E402

from onnxslim_fr import slim  # noqa: E402
from onnxslim_fr.probe import OutputErrorProbe  # noqa: E402
from onnxslim_fr.report import params  # noqa: E402

SAMPLES, BATCH, RATIO = (32, 256), 8, 0.3
PASSES_TARGET, FIXED_TARGET = 5.0, 20.0
PHASES = {  # table label: the label onnxslim_fr logs (progress.phase), summed over calls
    "exact lumping rounds": "exact lumping",
    "channel statistics (collect)": "channel statistics",
    "probe set-up (one run of the original)": "sensitivity probe set-up",
    "planning: forward selection, probes, allocation": "redundancy planning (orders, probes, "
                                                       "allocation)",
    "sequential refit": "sequential refit",
    "validation (on the calibration set here)": "validation run",
}
FIXED = ("probe set-up (one run of the original)",
         "planning: forward selection, probes, allocation")


COUNTS: Counter = Counter()


class PhaseTimes(logging.Handler):
    """Sums the wall and CPU seconds progress.phase logs per phase label. Probes run on a
    worker thread beside forward selection (background.py), so the phases are timed by
    what the process spent in them, not by a profile of the main thread."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.fullmatch(r"(.*): ([0-9.]+) s \(cpu ([0-9.]+) s\)", record.getMessage())
        if found:
            label = found.group(1)
            self.wall[label] = self.wall.get(label, 0.0) + float(found.group(2))
            self.cpu[label] = self.cpu.get(label, 0.0) + float(found.group(3))


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


def counted(owner: object, name: str, counts: Counter) -> None:
    """Count the calls of `owner.name` on every thread (cProfile sees the main one only)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        counts[name] += 1
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)


def bench(model, samples: int, dump: str | None) -> None:
    name = model.graph.input[0].name
    images = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
    one = forward_pass(model, images, name)
    COUNTS.clear()
    times = PhaseTimes()
    logger = logging.getLogger("onnxslim_fr.progress")
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    prof = cProfile.Profile(time.process_time) if dump else None
    with Clock() as clock:
        run = prof.runcall if prof else (lambda fn, *a, **k: fn(*a, **k))
        result = run(slim, model, data={name: images}, ratio=RATIO, batch_size=BATCH,
                     latency_runs=0)
    logger.removeHandler(times)
    if prof:
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
    for label, logged in PHASES.items():
        wall, cpu = times.wall.get(logged, 0.0), times.cpu.get(logged, 0.0)
        print(f"    {label:<48} wall {wall:7.2f} s  cpu {cpu:7.2f} s  {cpu / one.cpu:5.1f} "
              f"passes")
    wall, cpu = (sum(d.get(PHASES[k], 0.0) for k in FIXED) for d in (times.wall, times.cpu))
    print(f"    {'fixed costs (probe set-up + planning)':<48} wall {wall:7.2f} s  cpu {cpu:7.2f}"
          f" s  (target < {FIXED_TARGET:g} s at 32)")
    print(f"  {COUNTS['_measure']} probes measured ({COUNTS['__call__']} asked), "
          f"{COUNTS['__init__']} onnxruntime sessions built")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="widths / 4")
    parser.add_argument("--samples", type=int, action="append",
                        help=f"calibration images (repeatable; default {SAMPLES})")
    parser.add_argument("--profile", help="dump cProfile stats (main thread; slows the run) "
                        "to PROFILE.<samples>")
    args = parser.parse_args()
    for owner, name in ((OutputErrorProbe, "_measure"), (OutputErrorProbe, "__call__"),
                        (ort.InferenceSession, "__init__")):
        counted(owner, name, COUNTS)
    model, _ = build_resnet50(4 if args.small else 1)
    print(f"ResNet-50{' / 4' if args.small else ''}: {params(model):,} params, ratio {RATIO}, "
          f"lfrns, batch {BATCH}")
    for samples in args.samples or SAMPLES:
        bench(model, samples, args.profile)
    print(f"  {'peak RSS':<46} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f}"
          " MiB")


if __name__ == "__main__":
    main()
