"""Honest latency: alternating runs, median and spread, fixed threads, a chosen batch; the
execution provider from one place (`--provider`), refused when not installed."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from builders import Net, cnn_input

from onnxslim_fr import latency, latency_table, runtime, slim
from onnxslim_fr.channels import build_groups
from onnxslim_fr.cli import main
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.lumping.budget import CostModel, allocate
from onnxslim_fr.report import Figures, Report

FAST = latency.Timing(runs=5, min_seconds=0.0)


def _cnn(batch: int | None = None):
    """x [N, 3, 8, 8] ─ conv 8 ─ relu ─ conv 4; channel 5 of the first conv doubles channel 1,
    so exact lumping removes one channel."""
    b = Net(cnn_input(c=3) if batch is None else (batch, 3, 8, 8))
    h = b.conv(b.x, 8)
    b.scale_filter(h, src=1, dst=5, factor=2.0)
    return b.build(b.conv(b.relu(h), 4))


def test_runs_alternate_between_the_two_models_and_both_get_the_same_count():
    order: list[str] = []
    a, b = latency._alternate(lambda: order.append("a"), lambda: order.append("b"),
                              latency.Timing(runs=4, min_seconds=0.0))
    assert len(a) == len(b) == 4
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # neither always goes first


def test_the_time_floor_stops_at_the_run_cap_for_a_tiny_model():
    timing = latency.Timing(runs=3, min_seconds=30.0, max_runs=40)
    cmp = latency.compare(_cnn(), _cnn(), {"x": np.ones((1, 3, 8, 8), np.float32)}, timing)
    assert cmp.before.runs == cmp.after.runs == 40  # not 30 s of runs
    assert cmp.before.median_ms > 0 and cmp.before.spread_ms >= 0
    assert cmp.threads == latency.default_threads()


def test_dynamic_batch_is_repeated_to_the_latency_batch_and_a_fixed_one_is_kept():
    feeds = {"x": np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)}
    batched, used = latency.at_batch(_cnn(), feeds, 5)
    assert used == 5 and batched["x"].shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(batched["x"][2], feeds["x"][0])  # samples repeated
    kept, used = latency.at_batch(_cnn(batch=2), feeds, 5)
    assert used == 2 and kept["x"].shape == (2, 3, 8, 8)


def test_report_gives_median_spread_batch_and_threads(tmp_path):
    rep = slim(_cnn(), latency_runs=5, latency_batch=4, threads=1).report.to_json()
    assert rep["latency_batch"] == 4 and rep["latency_threads"] == 1
    assert rep["latency_runs"] >= 5
    for side in ("before", "after"):
        assert rep[f"latency_ms_{side}"] > 0 and rep[f"latency_spread_ms_{side}"] >= 0
    assert rep["provider"] == "CPUExecutionProvider"


def test_a_fixed_batch_is_measured_as_it_is_with_a_note():
    rep = slim(_cnn(batch=1), latency_runs=5, latency_batch=8).report
    assert rep.latency.batch == 1
    assert any("latency measured at batch 1, not 8" in n for n in rep.notes)


def test_no_latency_runs_measures_nothing():
    rep = slim(_cnn(), latency_runs=0).report
    assert rep.latency is None and rep.to_json()["latency_ms_before"] is None


def _report(before: tuple[float, float], after: tuple[float, float]) -> Report:
    figs = Figures(100, 1000, 10, 500)
    cmp = latency.Comparison(latency.Latency(*before, 30), latency.Latency(*after, 30), 1, 2)
    return Report(figs, figs, 0.0, 0.0, latency=cmp)


def test_a_change_within_the_spread_is_printed_as_noise_not_a_percentage():
    row = next(line for line in _report((0.10, 0.04), (0.136, 0.05)).render().splitlines()
               if line.startswith("latency ms"))
    assert row.split()[-1] == "noise" and "%" not in row
    row = next(line for line in _report((0.10, 0.01), (0.05, 0.01)).render().splitlines()
               if line.startswith("latency ms"))
    assert row.split()[-1] == "-50.0%"


# execution provider -----------------------------------------------------------------------
def test_cpu_provider_given_explicitly_works_and_short_names_resolve():
    assert slim(_cnn(), provider="CPUExecutionProvider", latency_runs=0).report.provider == \
        "CPUExecutionProvider"
    assert slim(_cnn(), provider="cpu", latency_runs=0).report.provider == "CPUExecutionProvider"


def test_a_provider_onnxruntime_does_not_list_exits_2_naming_the_available_ones(tmp_path,
                                                                                  capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(_cnn().SerializeToString())
    assert main([str(path), str(tmp_path / "out.onnx"), "--provider", "NoSuchEP"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NoSuchEP" in err
    assert all(p in err for p in ort.get_available_providers())
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("flag", ["--threads", "--latency-batch", "--round-to"])
def test_counts_below_one_exit_2(tmp_path, capsys, flag):
    path = tmp_path / "m.onnx"
    path.write_bytes(_cnn().SerializeToString())
    assert main([str(path), str(tmp_path / "out.onnx"), flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_every_session_of_a_calibrated_run_uses_the_provider_and_it_is_restored(monkeypatch):
    """A provider onnxruntime pretends to have: every session (calibration, probes, refit,
    validation, latency) is asked for it first, then the provider is CPU again."""
    seen: list[list[str]] = []

    class Recording(ort.InferenceSession):
        def __init__(self, model, options=None, providers=None, **kwargs):
            seen.append(list(providers))
            super().__init__(model, options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(runtime.ort, "get_available_providers",
                        lambda: ["FakeExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime.ort, "InferenceSession", Recording)
    data = {"x": np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    rep = slim(_cnn(), data=data, ratio=0.3, provider="fake", latency_runs=3).report
    assert len(seen) > 5
    assert all(p == ["FakeExecutionProvider", "CPUExecutionProvider"] for p in seen)
    assert rep.provider == "FakeExecutionProvider"
    assert runtime.current_provider() == "CPUExecutionProvider"


def test_cli_report_json_has_the_latency_keys(tmp_path):
    path, report = tmp_path / "m.onnx", tmp_path / "r.json"
    path.write_bytes(_cnn().SerializeToString())
    assert main([str(path), str(tmp_path / "out.onnx"), "--report", str(report),
                 "--latency-batch", "2", "--threads", "1"]) == 0
    rep = json.loads(report.read_text())
    assert rep["latency_batch"] == 2 and rep["latency_threads"] == 1
    assert {"latency_spread_ms_before", "latency_spread_ms_after"} <= set(rep)


# --target latency ---------------------------------------------------------------------------
def _wide_cnn(widths=(64, 64, 64), hw: int = 16):
    """x [N, 3, hw, hw] ─ conv 64 ─ conv 64 ─ conv 64 ─ GAP ─ gemm 10 (ReLU after each
    conv): the convolutions, not onnxruntime's per-run overhead, set the latency."""
    b = Net(cnn_input(c=3, hw=hw), seed=3)
    h = b.x
    for w in widths:
        h = b.relu(b.conv(h, w))
    return b.build(b.gemm(b.flatten(b.gap(h)), 10))


def _flat_curves(cost: CostModel) -> dict[int, np.ndarray]:
    """The same error curve for every unfrozen group: only the costs can tell them apart."""
    return {g: np.linspace(1.0, 0.0, size + 1) for g, size in cost.sizes.items() if size != 10}


def test_latency_cost_model_allocates_by_measured_ms_not_macs():
    """conv 1 (3 -> 64) writes group A, conv 2 (64 -> 64) group B, read by the gemm; same
    error curves, and by MACs a channel of A costs about what one of B does (A is cut
    first). Measured, the gemm takes as long as conv 2: B is now dearer and goes first."""
    model = normalize(_wide_cnn(widths=(64, 64)))
    graph = Graph(model)
    groups = build_groups(graph)
    feeds = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    flops = CostModel(graph, groups, "flops", feeds)
    conv1, conv2, gemm = (i for i, n in enumerate(graph.nodes) if n.op_type in ("Conv", "Gemm"))
    measured = {conv1: lambda fi, fo: 0.1 * fi * fo, conv2: lambda fi, fo: 1.0 * fi * fo,
                gemm: lambda fi, fo: 1.0 * fi * fo}
    slow = CostModel(graph, groups, "latency", feeds, measured)
    assert slow.total() == pytest.approx(2.1)
    assert slow.total({g: s // 2 for g, s in slow.sizes.items()}) == pytest.approx(
        0.1 / 2 + 1.0 / 4 + 1.0 / 4)
    by_macs = allocate(_flat_curves(flops), flops, 0.6 * flops.total())
    by_ms = allocate(_flat_curves(slow), slow, 0.6 * slow.total())
    a, b = (groups.layouts[graph.nodes[i].output[0]].segments[0].group for i in (conv1, conv2))
    assert by_macs[a] < by_macs[b] == 64
    assert by_ms[b] < by_ms[a] == 64  # the dear channels go first
    assert slow.total(by_ms) <= 0.6 * slow.total()


def test_tables_are_cached_on_disk_and_interpolate_between_measured_widths(tmp_path):
    layer = latency_table.Layer("Conv", (("kernel_shape", [3, 3]), ("pads", [1, 1, 1, 1])),
                                32, 32, (8, 8), (3, 3))
    table = latency_table.Table(batch=1, threads=1, cache_dir=tmp_path, runs=3, min_seconds=0)
    at = latency_table.Curve(table, layer, [8, 32], [8, 32])
    assert table.measured == 4 and at.floor == table.ms(layer, 8, 8)
    # costs count the time above the floor, never cheaper when wider whatever the noise
    assert 0 == at(0.25, 0.25) <= at(0.625, 0.625) <= at(1.0, 1.0) == at.full - at.floor
    assert at.full == max(table.entries.values())
    table.save()
    again = latency_table.Table(batch=1, threads=1, cache_dir=tmp_path, runs=3, min_seconds=0)
    assert again.ms(layer, 8, 32) == table.ms(layer, 8, 32) and again.measured == 0
    other = latency_table.Table(batch=4, threads=1, cache_dir=tmp_path)  # another batch
    assert other.entries == {} and other.path != table.path


def test_target_latency_times_layers_once_and_the_slimmed_model_is_faster(tmp_path,
                                                                          monkeypatch):
    """Layer tables are timed on the first run and read from the cache on the next, which
    allocates the same; the report's own measurement shows the gain (a loose bound: test
    machines are shared, so only 'faster' is asserted, not the 0.5 asked)."""
    monkeypatch.setenv("ONNXSLIM_FR_CACHE", str(tmp_path))
    data = {"x": np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)}
    options = dict(data=data, ratio=0.5, target="latency", threads=1, sequential_refit=False)
    rep = slim(_wide_cnn(), latency_runs=30, **options).report
    note = next(n for n in rep.notes if n.startswith("target latency"))
    assert "0 from the cache" in note and list((tmp_path / "latency").glob("*.json"))
    assert rep.latency.after.median_ms < rep.latency.before.median_ms
    assert rep.after.flops < 0.8 * rep.before.flops
    again = slim(_wide_cnn(), latency_runs=0, **options).report
    assert any(n.startswith("target latency") and "(0 widths timed" in n for n in again.notes)
    assert [g["kept"] for g in again.groups] == [g["kept"] for g in rep.groups]


def test_target_latency_on_an_overhead_bound_model_does_not_remove_every_channel(
        tmp_path, monkeypatch):
    """At 8x8 and 16 channels a layer's time is mostly per-node overhead that no width
    removes. Charged in full, half the latency would be out of reach and the allocation
    would keep almost nothing; the ratio applies to the time that shrinks with width."""
    monkeypatch.setenv("ONNXSLIM_FR_CACHE", str(tmp_path))
    data = {"x": np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    rep = slim(_wide_cnn(widths=(16, 16, 16), hw=8), data=data, ratio=0.5, target="latency",
               threads=1, sequential_refit=False, latency_runs=0).report
    assert 0.25 * rep.before.flops < rep.after.flops < 0.9 * rep.before.flops
    assert any("does not shrink with width" in n for n in rep.notes)
