"""Error curves the allocator can trust: few observations, zero predictions, measured errors.

A read point behind a global pool (the input of a squeeze-and-excitation block) sees one
observation per sample; with fewer samples than channels its covariance is singular, and
the prediction of the error of removing channels falls to zero long before the group is
empty. The allocator would then take those channels for free.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnxslim_fr import calibrate, probe, refit_stats, rewrite
from onnxslim_fr.channels import build_groups
from onnxslim_fr.cli import main
from onnxslim_fr.errors import InternalError
from onnxslim_fr.graph import Graph
from onnxslim_fr.lumping.budget import allocate
from onnxslim_fr.lumping.plan import removal_plan
from onnxslim_fr.lumping.redundancy import (
    GroupModel,
    calibrated_curve,
    forward_order,
    group_models,
    measured_curve,
    merge_rows,
    shrunk,
)
from onnxslim_fr.validate import output_error_probe

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN = MODELS / "digits_cnn.onnx"
IMG = MODELS / "digits_img_calib.npz"


def _pooled_channels(rng: np.random.Generator, n: int, c: int = 60) -> np.ndarray:
    """n observations of c channels driven by 12 factors plus channel noise."""
    mixing = rng.standard_normal((12, c))
    return rng.standard_normal((n, 12)) @ mixing + 0.5 * rng.standard_normal((n, c))


def _model(x: np.ndarray, q: np.ndarray, count: int | None = None) -> GroupModel:
    cov = np.cov(x.T, bias=True)
    if count is not None:
        cov = shrunk(cov, count)
    group = SimpleNamespace(id=0, size=x.shape[1], read_points=["t"])
    return GroupModel(group, {"t": (q, cov, x.mean(0))})


def _held_out_error(gm: GroupModel, keep: np.ndarray, x: np.ndarray, q: np.ndarray) -> float:
    mix, offset = merge_rows(gm, keep, True)["t"]
    removed = np.setdiff1d(np.arange(x.shape[1]), keep)
    rebuilt = x.copy()
    rebuilt[:, removed] = x[:, keep] @ mix.T + offset
    diff = rebuilt - x
    return float(np.einsum("ni,ij,nj->", diff, q, diff)) / len(x)


def test_fewer_observations_than_channels_never_predict_a_free_removal():
    """40 samples of 60 channels: the raw covariance has rank 39, so any 39 channels
    "explain" the rest and forward selection predicts zero error from there on; the
    shrunk covariance predicts an error for every removal, and its merge generalises
    better to samples it has not seen."""
    rng = np.random.default_rng(0)
    x, fresh = _pooled_channels(rng, 40), _pooled_channels(np.random.default_rng(1), 4000)
    b = rng.standard_normal((60, 8))
    q = b @ b.T
    raw, honest = _model(x, q), _model(x, q, count=len(x))
    _, raw_curve = forward_order(raw, [np.arange(60)])
    order, curve = forward_order(honest, [np.arange(60)])
    assert raw_curve[45] <= 1e-6 * raw_curve[0]  # the bug this guards against
    assert np.all(curve[:60] > 1e-4 * curve[0]) and curve[60] == pytest.approx(0, abs=1e-9)
    keep = np.sort(np.asarray(order[:45]))
    assert _held_out_error(honest, keep, fresh, q) < 0.7 * _held_out_error(raw, keep, fresh, q)


def test_shrinkage_vanishes_with_many_observations():
    rng = np.random.default_rng(2)
    x = _pooled_channels(rng, 20000)
    cov = np.cov(x.T, bias=True)
    assert np.allclose(shrunk(cov, len(x)), cov, rtol=2e-3, atol=1e-9)
    assert np.array_equal(np.diag(shrunk(cov, 40)), np.diag(cov))


def test_a_zero_prediction_is_charged_the_measured_error():
    """Group 13 of PaddleOCR v4's recogniser: prediction 0 at half its channels, measured
    0.094. The curve must equal the measurement there and charge every removal."""
    rng = np.random.default_rng(3)
    x = _pooled_channels(rng, 200)
    gm = _model(x, np.eye(60))
    order = list(range(60))
    predicted = np.linspace(1.0, 0.0, 61) ** 8
    predicted[20:] = 0.0
    curve = measured_curve(gm, order, predicted, lambda plans: 0.094, "lfrns")
    assert curve[30] == pytest.approx(0.094)
    assert np.all(np.diff(curve) <= 0) and np.all(curve[:60] > 0) and curve[60] == 0
    scaled = measured_curve(gm, order, np.linspace(1.0, 0.0, 61), lambda plans: 0.25, "lfrns")
    assert np.allclose(scaled, 0.5 * np.linspace(1.0, 0.0, 61))  # the general case: rescaled


def test_a_curve_passes_through_every_measured_point():
    """Measured / predicted changes along a curve: a second measurement (at the count the
    first allocation chose) bends the curve through it, monotone and 0 when all is kept."""
    gm = _model(_pooled_channels(np.random.default_rng(5), 200), np.eye(60))
    predicted = np.linspace(1.0, 0.0, 61) ** 2
    curve = calibrated_curve(gm, list(range(60)), predicted, {30: 0.5, 54: 0.003})
    assert curve[30] == pytest.approx(0.5) and curve[54] == pytest.approx(0.003)
    assert np.all(np.diff(curve) <= 0) and curve[60] == 0
    assert curve[10] == pytest.approx(predicted[10] * 0.5 / predicted[30])  # held before


def test_allocation_spares_a_group_whose_measured_error_the_prediction_missed():
    """Two equal groups, equal costs. The allocator must remove channels from the group
    whose measured error is low, not from the one whose prediction said zero."""
    x = _pooled_channels(np.random.default_rng(4), 200)
    gm = _model(x, np.eye(60))
    zero = np.zeros(61)
    zero[:10] = np.linspace(1.0, 0.1, 10)
    cheap = np.linspace(0.01, 0.0, 61)
    curves = {0: measured_curve(gm, list(range(60)), zero, lambda plans: 0.094, "lfrns"),
              1: cheap}
    kept = allocate(curves, _LinearCost({0: 60, 1: 60}), budget=90.0)
    assert kept[0] > kept[1]


class _LinearCost:
    """Cost = kept channels (the allocator's CostModel interface)."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes, self.units = sizes, {}

    def total(self, kept: dict[int, int] | None = None) -> float:
        return float(sum((kept or {}).get(g, s) for g, s in self.sizes.items()))


def _broken(apply):
    """rewrite.apply, then a Conv weight cut to the wrong shape: a trial model that
    onnxruntime refuses (a bug in our rewrite, as far as the user can tell)."""
    def wrapped(model, *args, **kwargs):
        out = apply(model, *args, **kwargs)
        weight = next(t for t in out.graph.initializer if len(t.dims) == 4)
        arr = onnx.numpy_helper.to_array(weight)[:, :, :1, :1]
        weight.CopyFrom(onnx.numpy_helper.from_array(arr.copy(), weight.name))
        return out
    return wrapped


def _probe_setup():
    model = onnx.load(str(CNN))
    graph = Graph(model)
    groups = build_groups(graph)
    data = calibrate.load_data(str(IMG), model, batch_size=16)
    stats = calibrate.collect(model, groups, data)
    gm = group_models(graph, groups, stats)[0]
    keep = np.arange(gm.group.size // 2)
    plan = {gm.group.id: removal_plan(gm.group.size, keep, gm.group.read_points,
                                      merge_rows(gm, keep, True), "lfrns")}
    return model, graph, groups, data, plan


def test_onnxruntime_refusing_a_probe_trial_is_an_internal_error(monkeypatch):
    model, graph, groups, data, plan = _probe_setup()
    monkeypatch.setattr(rewrite, "apply", _broken(rewrite.apply))
    whole = output_error_probe(model, graph, groups, data.batches[:1])
    with pytest.raises(InternalError, match="sensitivity probe"):
        whole(plan)


def test_a_failing_probe_exits_3_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "rewrite", SimpleNamespace(apply=_broken(rewrite.apply)))
    out = tmp_path / "out.onnx"
    assert main([str(CNN), str(out), "--data", str(IMG), "--ratio", "0.3"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sensitivity probe" in err
    assert not out.exists()


def test_a_refit_with_fewer_rows_than_channels_does_not_interpolate_them():
    """A pooled read point (an SE input) gives the refit one row per sample: 32 rows for 64
    kept channels. The channels are the kept ones plus noise no regressor predicts; the
    refit must stay near its prior (identity) on new rows, not fit the 32 rows' noise."""
    rng = np.random.default_rng(0)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        s = rng.standard_normal((n, 64))
        return s + 0.3 * rng.standard_normal((n, 64)), s

    (o, s), (o_new, s_new) = rows(32), rows(2000)
    paired = refit_stats.PairedStats.empty(64, 64)
    paired.add(o, s)
    mix, offset = paired.solve(np.eye(64))
    error = np.mean((o_new - s_new @ mix.T - offset) ** 2)
    assert error < 1.25 * np.mean((o_new - s_new) ** 2)  # ridge 1e-4 alone: 1.9x
    assert refit_stats.ridge_for(64, 32) == 2.0
    assert refit_stats.ridge_for(8, 10**6) == refit_stats.RIDGE


def _replanned(trial, keep: np.ndarray, shift: float = 0.0) -> dict:
    """A new plan object for `trial`'s group keeping `keep`: `trial`'s merge rows when it
    keeps the same channels (else none), offsets moved by `shift`."""
    removed = np.setdiff1d(np.arange(trial.size), keep)
    same = np.array_equal(keep, trial.keep)
    rows = {t: (mix[removed] if same else np.zeros((len(removed), len(keep))),
                (offset[removed] if same else 0.0) + shift)
            for t, (mix, offset) in trial.mix.items()}
    return removal_plan(trial.size, keep, list(trial.mix), rows, trial.method)


def test_a_probe_measures_each_plan_once(monkeypatch):
    """A search plans again at every step and probes every group at half its channels each
    time: the same plan is measured once; a different keep set or merge is measured anew."""
    model, graph, groups, data, plan = _probe_setup()
    built, real = [], probe.session
    monkeypatch.setattr(probe, "session", lambda m, *a, **k: built.append(m) or real(m, *a, **k))
    measure = probe.OutputErrorProbe(model, graph, groups, data.batches[:1])
    built.clear()
    (gid, trial), = plan.items()
    first = measure(plan)
    assert measure({gid: _replanned(trial, trial.keep)}) == first and len(built) == 1
    assert measure({gid: _replanned(trial, trial.keep[1:])}) != first and len(built) == 2
    assert measure({gid: _replanned(trial, trial.keep, 1.0)}) != first and len(built) == 3


def test_the_refit_ridge_is_the_one_that_predicts_the_other_half():
    """The refit fits on half the rows and checks on the other half. Noise no
    channel predicts takes a large ridge (the prior stays); a real map a small one."""
    rng = np.random.default_rng(1)
    mapping = np.eye(16) + 0.5 * rng.standard_normal((16, 16))

    def folds(signal: bool, rows: int) -> refit_stats.Folds:
        out = refit_stats.Folds.empty(16, 16)
        s = rng.standard_normal((rows, 16))
        out.add(s @ mapping.T if signal else s + 0.5 * rng.standard_normal((rows, 16)), s)
        return out

    mix, _ = folds(True, 400).solve(np.eye(16))
    np.testing.assert_allclose(mix, mapping, atol=1e-3)
    mix, _ = folds(False, 24).solve(np.eye(16))
    assert np.abs(mix - np.eye(16)).max() < 0.1  # ridge 1e-4 fits the noise: ~1


def test_refit_statistics_in_float32_keep_an_undrifted_channel_exactly_itself():
    """Products run in float32 on values shifted by their first batch's means: channels that
    did not drift (an unslimmed group) still fit themselves exactly, and a removed channel
    is fitted as well as in float64, also on values far from zero."""
    rng = np.random.default_rng(3)
    s = (100 + 0.01 * rng.standard_normal((600, 12))).astype(np.float32)
    removed = 2 * s[:, :4] - 150 + 1e-4 * rng.standard_normal((600, 4)).astype(np.float32)
    o = np.concatenate([s, removed], axis=1)
    prior = np.vstack([np.eye(12), np.zeros((4, 12))])
    folds = refit_stats.Folds.empty(16, 12, np.arange(12))
    for i in range(0, 600, 100):
        folds.add(o[i:i + 100], s[i:i + 100])
    mix, offset = folds.solve(prior)
    np.testing.assert_allclose(mix[:12], np.eye(12), atol=1e-12)  # o.T @ s in float32: 1e-3
    np.testing.assert_allclose(offset[:12], 0, atol=1e-9)
    fitted = s.astype(np.float64) @ mix[12:].T + offset[12:]
    assert np.abs(fitted - removed).max() < 2e-3  # spread 0.02: a float32 Gram gets ~1
