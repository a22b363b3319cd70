"""Probes run on worker threads beside forward selection (background.py): what they see
and what they raise must be what they would have in the caller."""

from __future__ import annotations

import threading

import pytest

from onnxslim_fr.background import Background
from onnxslim_fr.errors import InternalError
from onnxslim_fr.runtime import current_provider, use_provider


def test_a_background_call_sees_the_callers_provider_and_runs_on_another_thread():
    with use_provider("CUDA"), Background() as background:  # never built: a name only
        seen = background.run(lambda: (current_provider(), threading.get_ident()))()
        assert seen[0] == current_provider() != "CPUExecutionProvider"
    assert seen[1] != threading.get_ident()


def test_a_background_calls_error_comes_out_where_its_result_is_asked():
    def fails() -> None:
        raise InternalError("the trial model does not load")

    with Background() as background:
        later = background.run(fails)
        with pytest.raises(InternalError, match="does not load"):
            later()


def test_background_calls_overlap_the_caller():
    """The caller goes on while the call waits: an event only the caller sets."""
    go = threading.Event()
    with Background() as background:
        later = background.run(lambda: go.wait(5))
        go.set()
        assert later() is True


def test_a_stream_hands_out_items_in_order_while_the_caller_works_on_each():
    """Item n+1 is made while the caller holds item n: it waits for an event only the
    caller sets after taking item n."""
    taken = [threading.Event() for _ in range(3)]

    def produce():
        for i in range(len(taken)):
            if i:
                assert taken[i - 1].wait(5)  # made while the caller has the item before
            yield i

    with Background(workers=1) as background:
        got = []
        for item in background.stream(produce):
            got.append(item)
            taken[item].set()
    assert got == [0, 1, 2]


def test_a_streams_error_comes_out_after_the_items_made_before_it():
    def produce():
        yield "first"
        raise InternalError("the slimmed stage does not run")

    with Background(workers=1) as background:
        items = background.stream(produce)
        assert next(items) == "first"
        with pytest.raises(InternalError, match="does not run"):
            next(items)


def test_a_stream_is_queued_when_asked_for_not_when_first_read():
    """Calls queued after a stream run after it on one worker."""
    order = []
    with Background(workers=1) as background:
        items = background.stream(lambda: iter([order.append("stream") or 1]))
        later = background.run(lambda: order.append("run"))
        later()
        assert list(items) == [1]
    assert order == ["stream", "run"]


def test_a_stream_the_caller_drops_stops_its_worker():
    """Endless items, at most one waiting: once the caller stops reading, the worker must
    stop too, or leaving the block would wait for it forever."""
    with Background(workers=1) as background:
        items = background.stream(_endless, ahead=1)
        assert [next(items), next(items)] == [1, 2]
        items.close()
        assert background.run(lambda: "the worker is free again")() == "the worker is free again"


@pytest.mark.parametrize("drop", ["close", "hold"])
def test_a_stream_never_read_does_not_keep_its_block_from_ending(drop):
    """A generator never started runs no cleanup of its own: leaving the block must still
    stop the worker (it waits on a full queue), or the block would never end."""
    def block() -> None:
        with Background(workers=1) as background:
            items = background.stream(_endless, ahead=1)
            if drop == "close":
                items.close()

    runner = threading.Thread(target=block, daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive()


def _endless():
    n = 0
    while True:
        n += 1
        yield n
