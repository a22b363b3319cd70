"""Forward selection's cost: the skinny per-round products run on one BLAS thread (their
spin-waits cost 7x the CPU time on a shared 2-core machine), and the limit is lifted after.
So do the planner's small solves and the refit's float64 products (ResNet-50, 32 images, on
a busy 2-core machine: the refit's products took 44 CPU s on two threads)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from builders import Net, cnn_input
from threadpoolctl import threadpool_info

from onnxslim_fr import refit, slim
from onnxslim_fr.lumping import redundancy, selection


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


def test_planning_and_refit_run_on_one_blas_thread(monkeypatch):
    seen: dict[str, list[int]] = {}

    def spy(module, name):
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen[name] = _blas_threads()
            return inner(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)

    spy(redundancy, "group_models")  # inside redundancy.plan
    spy(refit, "_stages")  # inside refit.refit
    before = _blas_threads()
    b = Net(cnn_input(c=3), seed=2)
    model = b.build(b.gemm(b.flatten(b.gap(b.relu(b.conv(b.relu(b.conv(b.x, 12)), 16)))), 4))
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    slim(model, data=feeds, ratio=0.3, latency_runs=0)
    assert set(seen) == {"group_models", "_stages"}
    assert all(n == 1 for threads in seen.values() for n in threads)
    assert _blas_threads() == before
