"""The command line: exit codes, one-line errors, untouched input, atomic output."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import Net, cnn_input

from onnxslim_fr import progress
from onnxslim_fr.cli import main

MODELS = Path(__file__).resolve().parents[1] / "models"
MASKED = MODELS / "digits_cnn_masked.onnx"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("content", [b"", b"this is not a model at all", None])
def test_bad_model_files_exit_2_with_one_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.onnx"
    if content is None:
        bad.write_bytes(MASKED.read_bytes()[:5000])  # truncated
    else:
        bad.write_bytes(content)
    assert main([str(bad), str(tmp_path / "out.onnx")]) == 2
    assert "error" in _one_line_error(capsys)
    assert not (tmp_path / "out.onnx").exists()


def test_missing_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.onnx"), str(tmp_path / "out.onnx")]) == 2
    assert "not found" in _one_line_error(capsys)


def test_masked_cnn_is_slimmed_input_untouched_report_written(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    shutil.copy(MASKED, src)
    before = src.read_bytes()
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main([str(src), str(out), "--report", str(rep)]) == 0
    assert src.read_bytes() == before
    report = json.loads(rep.read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after",
                "channels_before", "channels_after", "max_abs_error", "max_rel_error"):
        assert key in report
    assert report["params_after"] < report["params_before"]
    assert {"id", "size", "kept", "frozen"} <= set(report["groups"][0])
    assert out.stat().st_size < src.stat().st_size
    assert "MACs" in capsys.readouterr().out


def test_failed_validation_writes_nothing_and_exits_1(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main([str(MASKED), str(out), "--tolerance", "1e-12"]) == 1
    assert "nothing written" in _one_line_error(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_lists_groups_and_writes_nothing(tmp_path, capsys):
    assert main([str(MASKED), "--inspect"]) == 0
    assert "reaches graph output logits" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_same_input_and_output_is_refused(capsys):
    assert main([str(MASKED), str(MASKED)]) == 2
    _one_line_error(capsys)


def test_calibrated_run_reports_accuracy_and_no_refit_is_the_weaker_ablation(tmp_path):
    cnn, data = MODELS / "digits_cnn.onnx", ["--data", str(MODELS / "digits_img_calib.npz"),
                                              "--holdout", str(MODELS / "digits_img_test.npz")]
    reports = {}
    for flag in ([], ["--no-refit"]):
        out, rep = tmp_path / f"out{len(flag)}.onnx", tmp_path / f"rep{len(flag)}.json"
        assert main([str(cnn), str(out), "--ratio", "0.5", "--report", str(rep),
                     *data, *flag]) == 0
        reports[bool(flag)] = json.loads(rep.read_text())
    refit, one_shot = reports[False], reports[True]
    assert refit["flops_after"] <= 0.52 * refit["flops_before"]
    assert refit["accuracy_after"] >= refit["accuracy_before"] - 0.01
    assert 0.9 < refit["top1_agreement"] <= 1.0
    assert refit["max_rel_error"] < one_shot["max_rel_error"]


# --ratio lists, --plot, progress and phase logs ---------------------------------------------
def _tiny(tmp_path: Path) -> tuple[str, list[str]]:
    """x [N, 3, 8, 8] ─ conv 16 ─ relu ─ conv 16 ─ relu ─ GAP ─ gemm 10, saved with 48
    calibration samples: the smallest calibrated CLI run."""
    b = Net(cnn_input(c=3), seed=1)
    h = b.relu(b.conv(b.relu(b.conv(b.x, 16)), 16))
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b.build(b.gemm(b.flatten(b.gap(h)), 10)).SerializeToString())
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    return str(path), ["--data", str(data), "--round-to", "1", "--no-refit",
                       "--threads", "1"]


def test_a_ratio_list_writes_one_model_and_report_per_ratio_and_one_plot(tmp_path, capsys):
    model, calib = _tiny(tmp_path)
    out, rep, fig = tmp_path / "small.onnx", tmp_path / "r.json", tmp_path / "tradeoff.png"
    assert main([model, str(out), *calib, "--ratio", "0.3,0.6", "--report", str(rep),
                 "--plot", str(fig)]) == 0
    assert not out.exists() and fig.read_bytes()[:4] == b"\x89PNG"
    for ratio in (0.3, 0.6):
        report = json.loads((tmp_path / f"r_r{ratio}.json").read_text())
        assert report["flops_after"] <= (1 - ratio) * report["flops_before"]
        assert report["flops_after"] >= (1 - ratio - 0.1) * report["flops_before"]
        onnx.checker.check_model(onnx.load(tmp_path / f"small_r{ratio}.onnx"), full_check=True)
    assert "--ratio 0.6: " in capsys.readouterr().out


def test_a_bound_search_records_its_candidates_and_plots_them(tmp_path):
    model, calib = _tiny(tmp_path)
    rep, fig = tmp_path / "r.json", tmp_path / "search.svg"
    assert main([model, str(tmp_path / "o.onnx"), *calib, "--max-error", "0.05",
                 "--report", str(rep), "--plot", str(fig)]) == 0
    search = json.loads(rep.read_text())["search"]
    assert len(search) == 8 and {"flops_kept", "max_rel_error", "within"} <= set(search[0])
    assert all(p["max_rel_error"] <= 0.05 for p in search if p["within"])
    assert fig.read_text().lstrip().startswith("<?xml")


def test_plot_without_matplotlib_or_with_an_unknown_format_exits_2_writing_nothing(
        tmp_path, capsys, monkeypatch):
    model, calib = _tiny(tmp_path)
    out = tmp_path / "o.onnx"
    assert main([model, str(out), *calib, "--ratio", "0.5", "--plot", "p.xyz"]) == 2
    assert "unknown image format 'xyz'" in _one_line_error(capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main([model, str(out), *calib, "--ratio", "0.5", "--plot", "p.png"]) == 2
    assert 'pip install "onnxslim-fr[plot]"' in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("text", ["0.3,abc", "0.3,0.3", "0.3,1.5"])
def test_bad_ratio_lists_exit_2(tmp_path, capsys, text):
    model, calib = _tiny(tmp_path)
    assert main([model, str(tmp_path / "o.onnx"), *calib, "--ratio", text]) == 2
    assert "--ratio" in _one_line_error(capsys)
    assert not list(tmp_path.glob("o*.onnx"))  # no ratio of the list is written


def test_verbose_logs_each_phase_with_its_time(tmp_path, caplog):
    model, calib = _tiny(tmp_path)
    with caplog.at_level(logging.INFO):
        assert main([model, str(tmp_path / "o.onnx"), *calib, "--ratio", "0.5", "-v"]) == 0
    for phase in ("exact lumping", "channel statistics", "redundancy planning",
                  "validation run", "latency measurement"):
        assert re.search(rf"{phase}[^:]*: \d+\.\d\d s", caplog.text), phase


def test_progress_bars_only_on_a_terminal_not_quiet_and_one_per_search(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress.shown()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.shown()
    with progress.quiet():
        assert not progress.shown()
    with progress.overall(3, "search") as step:
        assert not progress.shown()  # the passes inside a search keep their bars hidden
        step()
    assert progress.shown()
