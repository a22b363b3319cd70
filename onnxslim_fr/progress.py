"""What a long run shows while it works: progress bars on stderr and phase timings in the log.

Bars appear only on a terminal (stderr a TTY) and not under `quiet()` (the CLI's -q), so
pipes, logs and tests stay clean. A search (bisection, a list of ratios) runs the whole
pipeline many times: it shows one `overall` bar and the per-pass bars (calibrating,
refitting) stay hidden inside it, instead of one bar per pass scrolling by. `phase` logs
each step's wall time at INFO, which the CLI shows with -v.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

_QUIET: ContextVar[bool] = ContextVar("onnxslim_fr_quiet", default=False)
_OVERALL: ContextVar[bool] = ContextVar("onnxslim_fr_overall", default=False)
F = TypeVar("F", bound=Callable)


def shown() -> bool:
    """Whether a per-pass bar may show: a terminal, not quiet, no overall bar running."""
    return not _QUIET.get() and not _OVERALL.get() and sys.stderr.isatty()


@contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """No bars inside (the CLI's -q)."""
    token = _QUIET.set(on or _QUIET.get())
    try:
        yield
    finally:
        _QUIET.reset(token)


@contextmanager
def overall(total: int, desc: str) -> Iterator[Callable[[], None]]:
    """One bar of `total` steps for a whole search; yields the call that advances it. An
    overall bar inside another one only advances nothing (the outer one counts)."""
    if _OVERALL.get():
        yield lambda: None
        return
    bar = tqdm(total=total, desc=desc, unit="step", leave=False,
               disable=_QUIET.get() or not sys.stderr.isatty())
    token = _OVERALL.set(True)
    try:
        yield lambda: bar.update(1)
    finally:
        _OVERALL.reset(token)
        bar.close()


def phase(label: str) -> Callable[[F], F]:
    """Decorator: log `label` and the wall and process CPU time of each call at INFO
    (shown with -v; CPU counts onnxruntime's and BLAS's threads too)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                log.info("%s: %.2f s (cpu %.2f s)", label, time.perf_counter() - start,
                         time.process_time() - cpu)
        return timed  # type: ignore[return-value]
    return wrap
