"""Hostile review of the speed changes: the original's outputs kept across comparisons
(validate.References), refit statistics in float32 on shifted values (refit_stats.PairedStats),
sensitivity probes on worker threads (background.py). Each must give what the slow way gave:
the same figures, the same fits, the same model bytes, the same exit codes.

    net: x[b,3,8,8] ─ Conv(8) ─ Relu ─ Conv(16) ─ Relu ─ GAP ─ Gemm(4) ─ (output)
"""

from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import Net
from onnx import helper as h

from onnxslim_fr import calibrate, probe, refit_stats, slim, validate
from onnxslim_fr.background import Background
from onnxslim_fr.channels import build_groups
from onnxslim_fr.cli import main
from onnxslim_fr.errors import InternalError
from onnxslim_fr.graph import Graph
from onnxslim_fr.lumping import redundancy
from onnxslim_fr.lumping.plan import removal_plan

MODELS = Path(__file__).resolve().parent.parent / "models"


def _net(noise: float = 0.0) -> onnx.ModelProto:
    """The small CNN; with `noise`, its output plus noise * RandomNormalLike (as VITS / Piper
    text-to-speech models draw their noise inside the graph)."""
    net = Net((None, 3, 8, 8))
    y = net.relu(net.conv("x", 8))
    y = net.gemm(net.flatten(net.gap(net.relu(net.conv(y, 16)))), 4)
    if not noise:
        return net.build(y)
    net.weights["noise_scale"] = np.float32(noise)
    net.nodes += [h.make_node("RandomNormalLike", [y], ["r"], name="noise"),
                  h.make_node("Mul", ["r", "noise_scale"], ["rs"], name="scaled"),
                  h.make_node("Add", [y, "rs"], ["out"], name="noisy")]
    net.shapes["out"] = net.shapes[y]
    return net.build("out")


def _data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


# 1. validate.References: a kept output is the output a fresh run would give ---------------
def test_a_model_that_draws_random_numbers_against_itself_has_zero_error_every_time():
    """onnxruntime seeds RandomNormalLike per session and advances it per run: comparing the
    model with itself on the same batches in the same order gives zero error. A second
    comparison on a batch the first ran at another position must too (the final check of a
    slim() runs the hold-out batches after the exact check ran the random feeds first)."""
    model = _net(noise=0.05)
    first, second = _data(4, 1), _data(4, 2)
    reference = validate.References(model)
    assert validate.compare(reference, model, [first, second]).max_rel_error == 0.0
    assert validate.compare(reference, model, [second]).max_rel_error == 0.0


def test_a_noisy_models_bound_search_gives_what_fresh_runs_of_the_original_give(monkeypatch):
    model, data = _net(noise=0.05), _data(32)
    kept = slim(model, data=data, max_error=0.2, batch_size=8, latency_runs=0)
    monkeypatch.setattr(validate.References, "known", lambda self, feeds: None)
    fresh = slim(model, data=data, max_error=0.2, batch_size=8, latency_runs=0)
    assert kept.report.max_rel_error == fresh.report.max_rel_error
    assert kept.report.after.flops == fresh.report.after.flops


def test_kept_outputs_past_the_reference_budget_give_the_figures_of_fresh_runs(monkeypatch):
    """Over REFERENCE_BYTES the batches are compared chunk by chunk and only some outputs
    are kept: every bound (with and without --holdout) reports what fresh runs report."""
    model, data, held = _net(), _data(24), _data(16, 5)
    monkeypatch.setattr(validate, "REFERENCE_BYTES", 300)  # a few batches' outputs

    def figures() -> list[tuple]:
        out = []
        for kw in ({"max_error": 0.05}, {"min_agreement": 0.9, "holdout": held}):
            r = slim(model, data=data, batch_size=8, latency_runs=0, **kw)
            out.append((r.report.max_rel_error, r.report.top1_agreement, r.report.after.flops,
                        [s["max_rel_error"] for s in r.report.search]))
        return out

    kept = figures()
    monkeypatch.setattr(validate.References, "known", lambda self, feeds: None)
    assert kept == figures()


# 2. refit_stats.PairedStats: float32 on shifted values fits as float64 did -----------------------
@dataclass
class _Float64Stats:
    """The statistics as 29427a9 kept them: every product in float64, nothing shifted."""

    o: list
    s: list

    def solve(self, prior: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        o, s = np.concatenate(self.o).astype(np.float64), np.concatenate(self.s).astype(np.float64)
        n, mo, ms = len(o), o.mean(0), s.mean(0)
        cov_ss = s.T @ s / n - np.outer(ms, ms)
        cov_os = o.T @ s / n - np.outer(mo, ms)
        lam = ridge * max(float(np.trace(cov_ss)) / max(len(ms), 1), 1e-12)
        mix = np.linalg.solve(cov_ss + lam * np.eye(len(ms)), (cov_os + lam * prior).T).T
        return mix, mo - mix @ ms


@pytest.mark.parametrize("mean, spread", [(0.0, 1.0), (1e3, 0.1), (-50.0, 1e-3), (1e4, 1.0)])
@pytest.mark.parametrize("kept", [[0, 2, 3, 5], [], [0, 1, 2, 3, 4, 5]])
def test_float32_refit_statistics_fit_as_float64_ones(mean, spread, kept):
    """Large-mean / tiny-spread channels, nothing kept, nothing removed, batches of one row
    (an empty half), pooled by `merged` as tied read points are: the same map as float64."""
    rng = np.random.default_rng(7)
    keep = np.asarray(kept, dtype=np.int64)
    mapping = rng.standard_normal((6, len(keep)))
    stats = [refit_stats.PairedStats.empty(6, len(keep), keep) for _ in range(2)]
    reference = _Float64Stats([], [])
    for i, rows in enumerate((1, 40, 7, 60)):
        s = (mean + spread * rng.standard_normal((rows, len(keep)))).astype(np.float32)
        o = mean + (s - mean) @ mapping.T + 0.1 * spread * rng.standard_normal((rows, 6))
        o[:, keep] = s
        o = o.astype(np.float32)
        stats[i % 2].add(o, s)
        reference.o.append(o), reference.s.append(s)
    prior = np.zeros((6, len(keep)))
    prior[keep, np.arange(len(keep))] = 1.0
    mix, offset = stats[0].merged(stats[1]).solve(prior, 1e-3)
    want_mix, want_offset = reference.solve(prior, 1e-3)
    scale = max(1.0, np.abs(want_mix).max(initial=0))
    np.testing.assert_allclose(mix, want_mix, rtol=1e-3, atol=1e-3 * scale)
    fitted = np.concatenate(reference.s) @ mix.T + offset
    wanted = np.concatenate(reference.s) @ want_mix.T + want_offset
    assert np.abs(fitted - wanted).max(initial=0) <= 2e-2 * spread
    np.testing.assert_allclose(mix[keep], np.eye(len(keep)), atol=1e-9)  # kept: themselves


# 3. probes on worker threads: same bytes, same errors ------------------------------------
class _Inline:
    """Background's interface, running each call at once in the caller (the old order)."""

    def __init__(self, workers: int = 2) -> None:
        pass

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, fn, *args):
        value = fn(*args)
        return lambda: value



def _wider_net() -> onnx.ModelProto:
    net = Net((None, 3, 8, 8), seed=4)
    y = net.relu(net.conv(net.relu(net.conv("x", 12)), 16))
    y = net.relu(net.conv(net.add(y, net.relu(net.conv(y, 16))), 24))
    return net.build(net.gemm(net.relu(net.gemm(net.flatten(net.gap(y)), 20)), 5))


def test_probes_on_worker_threads_give_the_bytes_probes_in_turn_give(monkeypatch):
    model, data = _wider_net(), _data(64)

    def digest() -> tuple[str, float]:
        r = slim(model, data=data, ratio=0.4, batch_size=16, latency_runs=0)
        return hashlib.sha256(r.model.SerializeToString()).hexdigest(), r.report.max_rel_error

    threaded = digest()
    assert digest() == threaded  # run to run
    monkeypatch.setattr(redundancy, "Background", _Inline)
    assert digest() == threaded


def test_a_probe_failing_on_a_worker_thread_is_exit_3_with_its_message(tmp_path, monkeypatch,
                                                                      capsys):
    model = tmp_path / "net.onnx"
    onnx.save(_wider_net(), model)
    np.savez(tmp_path / "calib.npz", x=_data(64)["x"])
    calls = []
    real = probe.OutputErrorProbe._measure

    def third_fails(self, plans):
        calls.append(plans)
        if len(calls) == 3:
            raise InternalError("sensitivity probe: planted failure")
        return real(self, plans)

    monkeypatch.setattr(probe.OutputErrorProbe, "_measure", third_fails)
    out = tmp_path / "out.onnx"
    assert main([str(model), str(out), "--data", str(tmp_path / "calib.npz"),
                 "--ratio", "0.4", "-q"]) == 3
    assert "planted failure" in capsys.readouterr().err
    assert not out.exists()


def test_an_interrupted_caller_waits_for_one_probe_run_not_a_whole_probe(monkeypatch):
    """Ctrl-C while probes run beside forward selection: the probes stop at their next batch
    (one onnxruntime run, as when they ran in the caller), so exit 130 comes promptly and a
    second Ctrl-C does not land in the interpreter's join of the worker threads."""
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    graph = Graph(model)
    groups = build_groups(graph)
    data = calibrate.load_data(str(MODELS / "digits_img_calib.npz"), model, batch_size=4)
    group = groups.active()[0]
    keep = np.arange(group.size // 2)
    plan = {group.id: removal_plan(group.size, keep, group.read_points, {
        t: (np.zeros((group.size - len(keep), len(keep))), 0.0) for t in group.read_points},
        "lfrns")}
    measure = probe.OutputErrorProbe(model, graph, groups, data.batches[:20])
    real = probe.trial_run
    monkeypatch.setattr(probe, "trial_run",  # 20 batches of 0.15 s: a 3 s probe
                        lambda *a: time.sleep(0.15) or real(*a))
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), Background() as background:
        background.run(measure, plan)
        time.sleep(0.3)
        raise KeyboardInterrupt
    assert time.perf_counter() - start < 1.5


def test_calibration_statistics_are_the_same_whether_batches_run_ahead_or_in_turn(monkeypatch):
    """Read points computed on a worker one batch ahead (calibrate.AHEAD_BYTES) must give
    the sums batches in turn give, bit for bit, down to a last batch of one sample."""
    model = _wider_net()
    graph = Graph(model)
    groups = build_groups(graph)
    data = calibrate.load_data(_data(37), model, batch_size=8)

    def sums() -> dict:
        stats = calibrate.collect(model, groups, data)
        assert stats.samples == 37
        return {k: (p.count, p.total.tobytes(), p.gram.tobytes())
                for k, p in stats.points.items()}

    ahead = sums()
    monkeypatch.setattr(calibrate, "AHEAD_BYTES", 0)
    assert sums() == ahead


def test_batches_over_the_run_ahead_size_run_one_at_a_time(monkeypatch):
    """Past calibrate.AHEAD_BYTES (or with batches of other shapes than the first) a batch's
    read points are gone before the next batch runs: the bound that keeps a ResNet-50 at
    batch 64 (2 GB of read points a batch) from holding three."""
    model = _wider_net()
    groups = build_groups(Graph(model))
    alive: list[weakref.ref] = []
    left_over: list[int] = []
    real = calibrate.session

    class Counted:
        def __init__(self, sess) -> None:
            self.sess = sess

        def run(self, names, feeds):
            left_over.append(sum(r() is not None for r in alive))  # earlier batches' outputs
            outs = self.sess.run(names, feeds)
            alive.extend(weakref.ref(o) for o in outs)
            return outs

    monkeypatch.setattr(calibrate, "session", lambda m, *a, **k: Counted(real(m, *a, **k)))
    for ahead_bytes, sizes in ((0, [8] * 5), (10**9, [1, 8, 8, 8])):
        monkeypatch.setattr(calibrate, "AHEAD_BYTES", ahead_bytes)
        left_over.clear()
        data = calibrate.load_data([_data(n, seed=n) for n in sizes], model)
        calibrate.collect(model, groups, data)
        assert len(left_over) == len(sizes) and max(left_over) == 0
