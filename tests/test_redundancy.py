"""Functional redundancy with calibration data: budgets, merging, data checks, memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from builders import Net, cnn_input

from onnxslim_fr import calibrate, slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.cli import main
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.lumping.plan import removal_plan
from onnxslim_fr.lumping.redundancy import forward_order, group_models, lfrns_tiers, merge_rows
from onnxslim_fr.probe import OutputErrorProbe, region
from onnxslim_fr.refit import refit
from onnxslim_fr.testing import assert_same_function
from onnxslim_fr.validate import output_error_probe

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN, MLP = MODELS / "digits_cnn.onnx", MODELS / "digits_mlp.onnx"
IMG = {"data": MODELS / "digits_img_calib.npz", "holdout": MODELS / "digits_img_test.npz"}
FLAT = {"data": MODELS / "digits_flat_calib.npz", "holdout": MODELS / "digits_flat_test.npz"}


def _slim(path, data, **kw):
    return slim(path, latency_runs=0, **data, **kw).report


def test_half_the_flops_of_the_cnn_loses_at_most_one_point_and_beats_magnitude():
    lfrns = _slim(CNN, IMG, ratio=0.5)
    magnitude = _slim(CNN, IMG, ratio=0.5, method="magnitude")
    assert lfrns.after.flops <= 0.52 * lfrns.before.flops
    assert lfrns.accuracy_after >= lfrns.accuracy_before - 0.01
    assert lfrns.accuracy_after > magnitude.accuracy_after + 0.2


def test_sequential_refit_beats_the_one_shot_merge():
    refit = _slim(CNN, IMG, ratio=0.65, method="greedy")
    one_shot = _slim(CNN, IMG, ratio=0.65, method="greedy", sequential_refit=False)
    assert refit.after.flops == one_shot.after.flops
    assert refit.max_rel_error < 0.7 * one_shot.max_rel_error
    assert refit.accuracy_after > one_shot.accuracy_after


def test_refitting_a_model_with_nothing_removed_keeps_its_function():
    b = Net(cnn_input(c=2))
    stem = b.relu(b.conv(b.x, 6))
    left, right = b.relu(b.conv(stem, 4)), b.relu(b.conv(stem, 5))
    joined = b.add(stem, b.conv(b.concat([left, right]), 6))
    y = b.gemm(b.flatten(b.relu(joined)), 3)
    model = normalize(b.build(y))
    graph = Graph(model)
    groups = build_groups(graph)
    feeds = {"x": np.random.default_rng(1).standard_normal((128, 2, 8, 8)).astype(np.float32)}
    data = calibrate.load_data(feeds, model)
    active = [g.id for g in groups.active()]
    assert len(active) >= 3
    refit_model, plans = refit(model, graph, groups, {}, data, active)
    assert set(plans) == set(active)
    assert_same_function(model, refit_model, feeds=feeds, rtol=1e-3, atol=1e-3)


def test_refit_through_concat_and_residual_lowers_the_error():
    b = Net(cnn_input(c=2), seed=3)
    stem = b.relu(b.conv(b.x, 12))
    left, right = b.relu(b.conv(stem, 10)), b.relu(b.conv(stem, 10))
    joined = b.relu(b.add(stem, b.conv(b.concat([left, right]), 12)))
    y = b.gemm(b.flatten(b.relu(b.conv(joined, 8))), 5)
    model = b.build(y)
    data = {"x": np.random.default_rng(0).standard_normal((256, 2, 8, 8)).astype(np.float32)}
    refit_rep = slim(model, data=data, ratio=0.5, round_to=1, latency_runs=0).report
    one_shot = slim(model, data=data, ratio=0.5, sequential_refit=False, round_to=1,
                    latency_runs=0).report
    assert refit_rep.after.flops == one_shot.after.flops < 0.55 * one_shot.before.flops
    assert refit_rep.max_rel_error < one_shot.max_rel_error


def test_least_squares_merge_beats_dropping_the_same_channels():
    merged = _slim(MLP, FLAT, ratio=0.6, method="greedy")
    dropped = _slim(MLP, FLAT, ratio=0.6, method="greedy", compensate=False)
    assert merged.max_rel_error < dropped.max_rel_error


def test_params_target_and_max_error_bound():
    rep = _slim(MLP, FLAT, ratio=0.5, target="params")
    assert rep.after.params <= 0.52 * rep.before.params
    bounded = _slim(MLP, FLAT, max_error=0.05)
    assert bounded.max_rel_error <= 0.05 and bounded.after.flops < bounded.before.flops


def test_exact_part_stays_exact_when_calibration_data_is_given():
    b = Net(cnn_input(c=1))
    c1 = b.conv(b.x, 8)
    y = b.gemm(b.flatten(b.relu(c1)), 4)
    b.scale_filter(c1, src=1, dst=6, factor=2.0)
    model = b.build(y)
    data = {"x": np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)}
    rep = slim(model, data=data, ratio=0.01, latency_runs=0).report
    assert rep.exact_max_rel_error <= 1e-5
    assert any(g["kept"] <= 7 for g in rep.groups)


def test_data_readers_and_feed_iterables_are_accepted():
    stacked = dict(np.load(IMG["data"]))
    feeds = [{"input": stacked["input"][i:i + 32]} for i in range(0, 128, 32)]

    class Reader:
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    a = slim(CNN, data=feeds, ratio=0.3, latency_runs=0).report
    b = slim(CNN, data=Reader(), ratio=0.3, latency_runs=0).report
    assert a.after.flops == b.after.flops < a.before.flops


@pytest.mark.parametrize("bad, message", [
    ({"wrong_name": np.zeros((4, 1, 8, 8), np.float32), "other": np.zeros(4)}, "do not match"),
    ({"input": np.zeros((4, 1, 7, 8), np.float32)}, "shape"),
    ({"input": np.zeros((4, 1, 8, 8), np.int64)}, "dtype"),
    ({"input": np.full((4, 1, 8, 8), np.nan, np.float32)}, "NaN"),
])
def test_bad_calibration_data_exits_2_with_one_line(tmp_path, capsys, bad, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    out = tmp_path / "out.onnx"
    assert main([str(CNN), str(out), "--data", str(path), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_ratio_without_data_is_refused(tmp_path, capsys):
    assert main([str(CNN), str(tmp_path / "o.onnx"), "--ratio", "0.5"]) == 2


def test_statistics_memory_does_not_grow_with_samples():
    model = normalize(onnx.load(CNN))
    groups = build_groups(Graph(model))
    base = np.load(IMG["data"])["input"][:64]

    def peak(repeats: int) -> tuple[int, int]:
        data = calibrate.load_data({"input": np.concatenate([base] * repeats)}, model,
                                   batch_size=32)
        tracemalloc.start()
        stats = calibrate.collect(model, groups, data)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert stats.samples == 64 * repeats
        return top, sum(p.gram.nbytes + p.total.nbytes for p in stats.points.values())

    (peak1, size1), (peak8, size8) = peak(1), peak(8)
    assert size8 == size1
    assert peak8 <= peak1 * 1.1 + 64 * 1024


def test_forward_selection_curve_is_the_least_squares_error_of_each_prefix():
    rng = np.random.default_rng(0)
    c = 12
    x = rng.standard_normal((500, c)) @ rng.standard_normal((c, c)) + rng.standard_normal((500, c))
    sigma = np.cov(x.T)
    b = rng.standard_normal((c, 5))
    q = b @ b.T
    gm = SimpleNamespace(group=SimpleNamespace(size=c), points={"t": (q, sigma, x.mean(0))})
    order, curve = forward_order(gm, [np.arange(c)])
    assert sorted(order) == list(range(c))
    for k in range(1, c + 1):
        s = order[:k]
        explained = sigma[:, s] @ np.linalg.solve(sigma[np.ix_(s, s)], sigma[s, :])
        assert curve[k] == pytest.approx(np.trace(q @ (sigma - explained)), rel=1e-6, abs=1e-8)
    single = [np.trace(q @ np.outer(sigma[:, j], sigma[:, j])) / sigma[j, j] for j in range(c)]
    assert order[0] == int(np.argmax(single))


def _plain_greedy(q: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Reference: one channel at a time, the whole conditional covariance updated."""
    a, curve = sigma.copy(), [float(np.trace(q @ sigma))]
    left = list(range(len(sigma)))
    while left:
        d = np.maximum(np.diag(a)[left], 1e-300)
        gains = np.einsum("ij,ij->j", a[:, left], q @ a[:, left]) / d
        j = left.pop(int(np.argmax(gains)))
        curve.append(curve[-1] - float(gains.max()))
        a = a - np.outer(a[:, j], a[:, j]) / a[j, j]
    return np.asarray(curve)


def test_forward_selection_in_rounds_matches_plain_greedy_on_a_large_group():
    """300 channels > POOL: rounds of pooled picks. The curve is still the exact
    least-squares error of each prefix, and on average within 2% of plain greedy's."""
    rng = np.random.default_rng(1)
    c = 300
    x = rng.standard_normal((2000, 60)) @ rng.standard_normal((60, c)) \
        + 0.3 * rng.standard_normal((2000, c))
    sigma = np.cov(x.T)
    b = rng.standard_normal((c, 80))  # a reducing consumer: Q of rank 80
    q = b @ b.T
    gm = SimpleNamespace(group=SimpleNamespace(size=c), points={"t": (q, sigma, x.mean(0))})
    order, curve = forward_order(gm, [np.arange(c)])
    assert sorted(order) == list(range(c))
    for k in (1, 50, 129, 200):
        s = order[:k]
        explained = sigma[:, s] @ np.linalg.solve(sigma[np.ix_(s, s)], sigma[s, :])
        assert curve[k] == pytest.approx(np.trace(q @ (sigma - explained)), rel=1e-6)
    ratio = curve[10:250] / _plain_greedy(q, sigma)[10:250]  # either may lead at the knee
    assert np.exp(np.mean(np.log(ratio))) < 1.02 and ratio.max() < 1.15


def test_sensitivity_probe_on_the_region_after_a_group_equals_the_whole_model_probe():
    """A residual model; the probe runs only from the group's first member on, fed with
    the original's values, and measures the same output error as the whole model."""
    b = Net(cnn_input(c=2), seed=4)
    stem = b.relu(b.conv(b.x, 8))
    mid = b.relu(b.conv(stem, 6))
    joined = b.relu(b.add(stem, b.conv(mid, 8)))
    y = b.gemm(b.flatten(b.relu(b.conv(joined, 5))), 3)
    model = normalize(b.build(y))
    graph = Graph(model)
    groups = build_groups(graph)
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 2, 8, 8)).astype(np.float32)}
    data = calibrate.load_data(feeds, model, batch_size=16)
    stats = calibrate.collect(model, groups, data)
    sliced = OutputErrorProbe(model, graph, groups, data.batches[:2])
    whole = output_error_probe(model, graph, groups, data.batches[:2])
    checked = 0
    for gm in group_models(graph, groups, stats):
        order, _ = forward_order(gm, lfrns_tiers(gm, 0.05))
        keep = np.sort(np.asarray(order[:gm.group.size // 2]))
        plan = {gm.group.id: removal_plan(gm.group.size, keep, gm.group.read_points,
                                          merge_rows(gm, keep, True), "lfrns")}
        expected = whole(plan)
        assert expected > 0
        assert sliced(plan) == pytest.approx(expected, rel=1e-4)
        checked += 1
    assert checked >= 2
    late = next(g for g in groups.active() if g.size == 6)  # the branch's inner group
    assert "x" not in region(graph, late).reads  # starts inside the model, not at the input


def test_statistics_of_a_large_activation_use_a_bounded_sample_of_positions():
    """Positions beyond ROWS_PER_CHANNEL per channel are subsampled: the count is capped
    and the covariance stays close to the one from every position."""
    b = Net((None, 4, 64, 64), seed=2)
    y = b.conv(b.relu(b.conv(b.x, 8)), 3)
    model = normalize(b.build(y))
    groups = build_groups(Graph(model))
    x = np.random.default_rng(0).standard_normal((16, 4, 64, 64)).astype(np.float32)
    data = calibrate.load_data({"x": x}, model, batch_size=8)
    full_rows = 16 * 64 * 64
    stats = calibrate.collect(model, groups, data)
    (point,) = stats.points.values()
    assert point.count <= 2 * calibrate.ROWS_PER_CHANNEL * 8 < full_rows
    old = calibrate.ROWS_PER_CHANNEL
    try:
        calibrate.ROWS_PER_CHANNEL = full_rows
        (every,) = calibrate.collect(model, groups, data).points.values()
    finally:
        calibrate.ROWS_PER_CHANNEL = old
    assert every.count == full_rows
    scale = np.abs(every.cov).max()
    assert np.abs(point.cov - every.cov).max() < 0.1 * scale
