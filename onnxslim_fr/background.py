"""Worker threads that overlap onnxruntime runs with numpy work in the caller."""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
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
        self._streams: list[threading.Event] = []  # each stream's "stop making items"
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:  # calls still running stop at their next check_cancelled
            self._left.set()
        for gone in self._streams:  # a stream nobody reads any more (never started, too)
            gone.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn: Callable[..., T], *args: object) -> Callable[[], T]:
        context = contextvars.copy_context()
        context.run(_LEFT.set, self._left)
        return self._pool.submit(context.run, fn, *args).result

    def stream(self, produce: Callable[[], Iterable[T]], ahead: int = 0) -> Iterator[T]:
        """The items of `produce()`, computed on a worker and handed out in order as each is
        ready: the caller's numpy work on one item overlaps onnxruntime's on the next. At
        most `ahead` finished items wait in the queue and one more on the worker (0: any
        number), so large items do not pile up when the caller is the slower. An exception
        in `produce` comes out here, after the items made before it. The worker stops once
        the caller drops the stream or leaves the block."""
        ready: queue.Queue = queue.Queue(maxsize=ahead)
        gone = threading.Event()  # nobody reads the stream any more: stop making items
        self._streams.append(gone)

        def hand(entry: tuple[bool, object]) -> None:
            while not gone.is_set():
                try:
                    ready.put(entry, timeout=0.1)
                    return
                except queue.Full:
                    check_cancelled()

        def work() -> None:
            try:
                for item in produce():
                    hand((True, item))
                    check_cancelled()
                    if gone.is_set():
                        return
            except BaseException as exc:  # handed to the caller, raised there
                hand((False, exc))
            else:
                hand((False, None))

        return _drain(ready, self.run(work), gone)  # submitted now: before later calls run


def _drain(ready: queue.Queue, finished: Callable[[], None], gone: threading.Event
           ) -> Iterator:
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                finished()
                if item is not None:
                    raise item
                return
            yield item
    finally:
        gone.set()
