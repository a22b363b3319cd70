"""Calibrated slimming at ResNet-50 scale: where the time goes, against one forward pass.

Builds the ResNet-50 of ``tools/bench_engine.py`` (seeded He-initialized weights, exact
redundancy planted), feeds it 32 seeded Gaussian 224x224 images as calibration data (speed
only: random weights and inputs say nothing about accuracy) and times
``slim(ratio=0.3, method=lfrns)`` against one onnxruntime pass over the same images, with
the time per phase from cProfile and the peak RSS.

Run (from the repository root)::

    python tools/bench_calibrated.py            # full size (about 2 minutes)
    python tools/bench_calibrated.py --small    # widths / 4
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
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

SAMPLES, BATCH, RATIO = 32, 8, 0.3
PHASES = {  # label: function whose cumulative time is reported
    "channel statistics (collect)": "calibrate.py:collect",
    "forward selection": "redundancy.py:forward_order",
    "sensitivity probes": "redundancy.py:_sensitivity",
    "sequential refit": "refit.py:refit",
    "validation (on the calibration set here)": "validate.py:compare",
    "exact lumping rounds": "api.py:_exact",
}


def forward_seconds(model, feeds: np.ndarray, name: str) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {name: feeds[:BATCH]})
    start = time.perf_counter()
    for i in range(0, len(feeds), BATCH):
        sess.run(None, {name: feeds[i:i + BATCH]})
    return time.perf_counter() - start


def phase_seconds(stats: pstats.Stats) -> dict[str, float]:
    out = {}
    for label, key in PHASES.items():
        file, func = key.split(":")
        out[label] = sum(v[3] for (path, _, fn), v in stats.stats.items()
                         if path.endswith(file) and fn == func)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="widths / 4")
    args = parser.parse_args()
    model, _ = build_resnet50(4 if args.small else 1)
    name = model.graph.input[0].name
    images = np.random.default_rng(0).standard_normal((SAMPLES, 3, 224, 224)).astype(np.float32)
    one_pass = forward_seconds(model, images, name)
    prof = cProfile.Profile()
    start = time.perf_counter()
    result = prof.runcall(slim, model, data={name: images}, ratio=RATIO, batch_size=BATCH,
                          latency_runs=0)
    wall = time.perf_counter() - start
    rep = result.report
    print(f"ResNet-50{' / 4' if args.small else ''}: {rep.before.params:,} params, "
          f"{SAMPLES} calibration images, ratio {RATIO}, lfrns")
    print(f"  kept FLOPs {rep.after.flops / rep.before.flops:.3f}   relative output error "
          f"{rep.max_rel_error:.3g} (calibration set)   top-1 agreement {rep.top1_agreement:.3f}")
    print(f"  {'one onnxruntime pass over the calibration set':<46} {one_pass:8.2f} s")
    print(f"  {'slim() wall time':<46} {wall:8.2f} s   ratio {wall / one_pass:.1f} "
          f"(target <= 3)")
    for label, seconds in phase_seconds(pstats.Stats(prof)).items():
        print(f"    {label:<44} {seconds:8.2f} s   {seconds / one_pass:6.1f} passes")
    print(f"  {'peak RSS':<46} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f}"
          " MiB")


if __name__ == "__main__":
    main()
