"""Latency of the original and the slimmed model, measured side by side.

A latency figure is honest only when both models meet the same machine. So: warm-up runs
first (allocation, kernel selection); then the two sessions alternate (A B, B A, A B, ...)
so drift in clock speed or background load hits both; each model runs at least
`Timing.runs` times and the whole measurement lasts at least `Timing.min_seconds`, but
never more than `Timing.max_runs` pairs (a tiny model would otherwise run 10^5 times). The
figure is the median, its spread the interquartile range. Threads are fixed
(`intra_op_num_threads`), so the figure does not depend on onnxruntime's guess of the core
count, and inputs are the cost feeds repeated along a dynamic first axis to `Timing.batch`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from . import progress
from .runtime import input_specs, runner, session


@dataclass(frozen=True)
class Timing:
    """How to measure: `runs` 0 measures nothing."""

    runs: int = 30
    batch: int = 1
    threads: int | None = None  # None: every CPU this process may run on
    min_seconds: float = 1.0
    max_runs: int = 1000
    warmup: int = 3
    # wall time; time.process_time at 1 thread measures CPU time, which a loaded machine
    # (other jobs taking turns on the cores) disturbs far less
    clock: Callable[[], float] = time.perf_counter


@dataclass(frozen=True)
class Latency:
    median_ms: float
    spread_ms: float  # interquartile range of the single runs
    runs: int


@dataclass(frozen=True)
class Comparison:
    before: Latency
    after: Latency
    batch: int  # the batch measured (a fixed first axis keeps its own size)
    threads: int


def default_threads() -> int:
    """The CPUs this process may use (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@progress.phase("latency measurement")
def measure(before: onnx.ModelProto, after: onnx.ModelProto,
            feeds: Mapping[str, np.ndarray], timing: Timing,
            notes: list[str]) -> Comparison | None:
    """`compare`, or None when `timing.runs` is 0; a batch the model fixes is noted."""
    if not timing.runs:
        return None
    result = compare(before, after, feeds, timing)
    if result.batch != timing.batch:
        notes.append(f"latency measured at batch {result.batch}, not {timing.batch}: the "
                     f"model's first input axis is fixed")
    return result


def compare(before: onnx.ModelProto, after: onnx.ModelProto,
            feeds: Mapping[str, np.ndarray], timing: Timing) -> Comparison:
    """Both models timed in alternation on `feeds` at `timing.batch`."""
    threads = timing.threads or default_threads()
    batched, batch = at_batch(before, feeds, timing.batch)
    run_a = runner(session(before, threads), batched)
    run_b = runner(session(after, threads), batched)
    for _ in range(timing.warmup):
        run_a()
        run_b()
    times_a, times_b = _alternate(run_a, run_b, timing)
    return Comparison(_summary(times_a), _summary(times_b), batch, threads)


def at_batch(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], batch: int
             ) -> tuple[dict[str, np.ndarray], int]:
    """`feeds` with every input whose first axis is dynamic cut or repeated to `batch`
    samples, and the batch that results (a fixed first axis keeps its size)."""
    specs = input_specs(model)
    out, used = {}, None
    for name, value in feeds.items():
        value = np.asarray(value)
        dims = specs.get(name, ((),))[0]
        if dims and dims[0] is None and value.ndim and value.shape[0]:
            value = value[np.arange(batch) % value.shape[0]]
        if value.ndim and used is None:
            used = int(value.shape[0])
        out[name] = value
    return out, used or 1


def _alternate(run_a: Callable[[], object], run_b: Callable[[], object], timing: Timing
               ) -> tuple[list[float], list[float]]:
    """Alternating timed runs until both the run count and the time floor are reached
    (the floor only up to `max_runs` pairs)."""
    times_a: list[float] = []
    times_b: list[float] = []
    clock, start = timing.clock, time.perf_counter()
    while len(times_a) < timing.runs or (time.perf_counter() - start < timing.min_seconds
                                         and len(times_a) < timing.max_runs):
        pair = ((run_a, times_a), (run_b, times_b))
        for go, times in pair if len(times_a) % 2 == 0 else pair[::-1]:
            tick = clock()
            go()
            times.append((clock() - tick) * 1e3)
    return times_a, times_b


def _summary(times: list[float]) -> Latency:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return Latency(float(median), float(q3 - q1), len(times))


def is_noise(before: Latency, after: Latency) -> bool:
    """The change is within the spread: the interquartile ranges, centred on the medians,
    overlap."""
    return abs(after.median_ms - before.median_ms) <= (before.spread_ms + after.spread_ms) / 2
