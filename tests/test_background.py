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
