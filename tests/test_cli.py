"""The command line: exit codes, one-line errors, untouched input, atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
