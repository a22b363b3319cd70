"""Forward selection's cost: the skinny per-round products run on one BLAS thread (their
spin-waits cost 7x the CPU time on a shared 2-core machine), and the limit is lifted after."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from threadpoolctl import threadpool_info

from onnxslim_fr.lumping import selection


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_forward_selection_runs_on_one_blas_thread(monkeypatch):
    seen: list[list[int]] = []
    inner = selection._forward_order

    def spy(gm, candidates):
        seen.append(_blas_threads())
        return inner(gm, candidates)

    monkeypatch.setattr(selection, "_forward_order", spy)
    before = _blas_threads()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    sigma = np.cov(x.T)
    gm = SimpleNamespace(group=SimpleNamespace(size=8), points={"t": (np.eye(8), sigma, 0)})
    order, curve = selection.forward_order(gm, [np.arange(8)])
    assert sorted(order) == list(range(8)) and curve[-1] < 1e-9 * curve[0]
    assert seen and all(n == 1 for n in seen[0])
    assert _blas_threads() == before
