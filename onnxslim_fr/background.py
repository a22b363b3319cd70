"""One worker thread that overlaps onnxruntime runs with numpy work in the caller."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


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
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn: Callable[..., T], *args: object) -> Callable[[], T]:
        future = self._pool.submit(contextvars.copy_context().run, fn, *args)
        return future.result
