"""Worker threads that overlap onnxruntime runs with numpy work in the caller."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_LEFT: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "onnxslim_fr_caller_left", default=None)


def check_cancelled() -> None:
    """Raise in a background call whose caller has left its block on an error (Ctrl-C):
    long calls check between runs, so an interrupt waits for one run, not a whole probe."""
    left = _LEFT.get()
    if left is not None and left.is_set():
        raise CancelledError("the caller stopped")


class Background:
    """Runs calls on `workers` threads while the caller goes on: sensitivity probes
    (onnxruntime, which releases the GIL) overlap the next group's forward selection (BLAS
    on one thread), and one probe's session set-up (single-threaded graph optimization)
    overlaps another's run, so a 2-core machine keeps both cores busy. Each call sees the
    caller's context (provider, weight store, quiet flag); its exception comes out of
    the thunk that `run` returns."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers

    def __enter__(self) -> Background:
        self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                        thread_name_prefix="onnxslim-fr")
        self._left = threading.Event()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:  # calls still running stop at their next check_cancelled
            self._left.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn: Callable[..., T], *args: object) -> Callable[[], T]:
        context = contextvars.copy_context()
        context.run(_LEFT.set, self._left)
        return self._pool.submit(context.run, fn, *args).result
