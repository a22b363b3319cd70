"""Every run ends in a correct model or a clear refusal, and the input never changes.

Refusals are exit 2 with exactly one line on stderr, checked before the heavy work; exit 1
is only "validation failed"; a bug is exit 3; Ctrl-C / SIGTERM are 130 / 143 with one line;
a closed stdout is silent. Files: the input's IR version and external data are kept, the
output's mode follows the umask, and a failed or killed write leaves no file behind.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import Net
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxslim_fr import api, atomic, cli, model_io, options, slim
from onnxslim_fr.cli import main, parser
from onnxslim_fr.errors import (
    BadDataError,
    SlimError,
    UnsupportedError,
    UsageError,
    ValidationError,
)

ROOT = Path(__file__).resolve().parents[1]
MASKED = ROOT / "models" / "digits_cnn_masked.onnx"


# models and helpers ---------------------------------------------------------------------
def redundant_cnn(ir_version: int = 10) -> onnx.ModelProto:
    """x ─ conv(16) ─ relu ─ conv(8): filter 4 = 2.5 x filter 1, so exact mode removes one
    channel; both weights pass 1 KiB, so they go to external data when asked."""
    b = Net((None, 3, 8, 8))
    c1 = b.conv(b.x, 16)
    y = b.conv(b.relu(c1), 8)
    b.scale_filter(c1, src=1, dst=4, factor=2.5)
    model = b.build(y)
    model.ir_version = ir_version
    return model


def custom_op_model(name: str) -> onnx.ModelProto:
    """conv ─ relu ─ com.example::Foo (node `name`, possibly unnamed): onnxruntime has no
    kernel for Foo, though the ONNX checker accepts the custom domain."""
    b = Net((None, 3, 8, 8))
    r = b.relu(b.conv(b.x, 4))
    b.nodes.append(h.make_node("Foo", [r], ["y"], name=name, domain="com.example"))
    b.shapes["y"] = b.shapes[r]
    return b.build("y", domains=["com.example"])


def int32_model() -> onnx.ModelProto:
    """x:int32[?, 4] ─ Cast(float) ─ MatMul ─ Relu ─ MatMul."""
    w1 = nh.from_array(np.ones((4, 6), np.float32), "w1")
    w2 = nh.from_array(np.ones((6, 3), np.float32), "w2")
    nodes = [h.make_node("Cast", ["x"], ["f"], name="cast", to=T.FLOAT),
             h.make_node("MatMul", ["f", "w1"], ["m"], name="mm1"),
             h.make_node("Relu", ["m"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.INT32, [None, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [None, 3])], [w1, w2])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=10)


def save(model: onnx.ModelProto, path: Path, **external) -> Path:
    onnx.save_model(model, str(path), **external)
    return path


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def refused(capsys, argv: list[str], *words: str) -> str:
    """main(argv) exits 2 with one line naming `words`."""
    assert main([str(a) for a in argv]) == 2
    line = one_line(capsys)
    assert line.startswith("onnxslim-fr: error: ")
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def model_path(tmp_path) -> Path:
    return save(redundant_cnn(), tmp_path / "in.onnx")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model fails the test: proves a refusal came before any heavy work."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(model_io, "read", loaded)


# 1. data loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["input", "output", "output weights"])
def test_report_that_would_overwrite_a_model_is_refused(tmp_path, capsys, model_path,
                                                         no_loading, which):
    out = tmp_path / "out.onnx"
    report = {"input": model_path, "output": out, "output weights": tmp_path / "out.onnx.data"}
    before = digests(tmp_path)
    refused(capsys, [model_path, out, "--report", report[which]], "--report", "choose another")
    assert digests(tmp_path) == before


def test_report_that_would_overwrite_the_input_weight_file_is_refused(tmp_path, capsys,
                                                                     no_loading):
    src = save(redundant_cnn(), tmp_path / "in.onnx", save_as_external_data=True,
               location="weights.bin", size_threshold=0)
    before = digests(tmp_path)
    refused(capsys, [src, tmp_path / "out.onnx", "--report", tmp_path / "weights.bin"],
            "--report", "weight file of the input model")
    assert digests(tmp_path) == before


@pytest.mark.parametrize(("flags", "words"), [
    (["--report", "calib.npz"], ["--report", "the --data file"]),
    (["--report", "hold.npz"], ["--report", "the --holdout file"]),
    (["--plot", "r.png", "--report", "r.png"], ["--plot", "the --report file"]),
    (["--plot", "out.png"], ["--plot", "the output model"]),
])
def test_report_or_plot_that_would_overwrite_data_or_each_other_is_refused(
        tmp_path, capsys, model_path, no_loading, flags, words):
    """Seen: `--report calib.npz` replaced the calibration data with JSON at exit 0, and
    `--plot r.png --report r.png` lost the report to the plot."""
    pytest.importorskip("matplotlib")
    for name in ("calib.npz", "hold.npz"):
        (tmp_path / name).write_bytes(b"data")
    before = digests(tmp_path)
    out = "out.png" if "out.png" in flags else "out.onnx"
    argv = [model_path, tmp_path / out, "--data", tmp_path / "calib.npz", "--holdout",
            tmp_path / "hold.npz", "--ratio", "0.5",
            *(tmp_path / f if i % 2 else f for i, f in enumerate(flags))]
    refused(capsys, argv, *words)
    assert digests(tmp_path) == before


@pytest.mark.parametrize("flag", ["--data", "--holdout"])
def test_output_that_would_overwrite_the_data_is_refused(tmp_path, capsys, model_path,
                                                         no_loading, flag):
    data = tmp_path / "calib.npz"
    data.write_bytes(b"data")
    argv = [model_path, data, "--data", data, "--ratio", "0.5"]
    if flag == "--holdout":
        argv = [model_path, data, "--data", model_path, "--holdout", data, "--ratio", "0.5"]
    refused(capsys, argv, "output", f"the {flag} file")
    with pytest.raises(UsageError, match=f"the {flag} file"):
        slim(str(model_path), data, **({"data": str(data)} if flag == "--data" else
                                      {"data": {"x": np.zeros((1, 3, 8, 8), np.float32)},
                                       "holdout": str(data)}), ratio=0.5)
    assert data.read_bytes() == b"data"


@pytest.mark.parametrize("flag", ["output", "--report"])
@pytest.mark.parametrize("kind", ["fifo", "link to a fifo"])
def test_a_target_that_is_not_a_regular_file_is_refused(tmp_path, capsys, model_path,
                                                        no_loading, flag, kind):
    """Seen as root: `--report /dev/null` renamed a regular file over /dev/null. A FIFO
    stands in for the device here; the target must stay what it was."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = fifo
    if kind == "link to a fifo":
        target = tmp_path / "link"
        target.symlink_to(fifo)
    argv = [model_path, target] if flag == "output" else \
        [model_path, tmp_path / "out.onnx", "--report", target]
    refused(capsys, argv, flag, "not a regular file")
    assert fifo.is_fifo() and (kind == "fifo" or target.is_symlink())
    assert not (tmp_path / "out.onnx").exists()


def test_slim_from_python_refuses_to_overwrite_its_input(tmp_path, model_path):
    before = model_path.read_bytes()
    (tmp_path / "link.onnx").symlink_to(model_path)
    os.link(model_path, tmp_path / "hard.onnx")
    for output in (model_path, str(model_path), tmp_path / "link.onnx", tmp_path / "hard.onnx",
                   tmp_path / "sub" / ".." / "in.onnx"):
        with pytest.raises(UsageError, match="input"):
            slim(str(model_path), output, latency_runs=0)
    assert model_path.read_bytes() == before


def test_output_whose_weight_file_is_an_input_weight_file_is_refused(tmp_path, capsys):
    """in.onnx keeps its weights in w.onnx.data; output w.onnx would write w.onnx.data."""
    src = save(redundant_cnn(), tmp_path / "in.onnx", save_as_external_data=True,
               location="w.onnx.data", size_threshold=0)
    before = digests(tmp_path)
    refused(capsys, [src, tmp_path / "w.onnx"], "w.onnx.data", "input")
    assert digests(tmp_path) == before


# 2. refusals before the heavy work ----------------------------------------------------
@pytest.mark.parametrize("flag", ["output", "--report"])
@pytest.mark.parametrize("how", ["under a file", "a directory", "no permission"])
def test_unwritable_output_or_report_is_refused_before_loading(tmp_path, capsys, model_path,
                                                                no_loading, flag, how):
    (tmp_path / "file.txt").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    bad = {"under a file": tmp_path / "file.txt" / "sub" / "x.onnx",
           "a directory": tmp_path,
           "no permission": locked / "x.onnx"}[how]
    if how == "no permission":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere: covered by 'under a file'")
        locked.chmod(0o500)
    argv = [model_path, bad] if flag == "output" else \
        [model_path, tmp_path / "out.onnx", "--report", bad]
    try:
        refused(capsys, argv, flag, str(bad))
    finally:
        locked.chmod(0o700)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("flag", ["output", "--report"])
def test_unwritable_path_is_found_by_creating_a_file_not_by_permission_bits(
        tmp_path, capsys, model_path, no_loading, monkeypatch, flag):
    """As root os.access says yes everywhere (and /sys lets nobody create files): the
    permission bits are made to say yes here, and only a real creation tells."""
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    bad = Path("/proc/self/onnxslim-fr-test.out")
    argv = [model_path, bad] if flag == "output" else \
        [model_path, tmp_path / "out.onnx", "--report", bad]
    refused(capsys, argv, flag, str(bad), "cannot be written")
    assert not (tmp_path / "out.onnx").exists()


def test_writable_check_leaves_no_file_behind(tmp_path, model_path):
    before = sorted(tmp_path.iterdir())
    options.check_paths(model_path, tmp_path / "new" / "out.onnx", tmp_path / "r.json")
    assert sorted(tmp_path.iterdir()) == before


OPTION_MISTAKES = [  # (CLI flags, slim() keywords, words the one line must hold)
    (["--data", "d.npz"], {"data": "d.npz"}, ["--ratio", "--max-error", "--max-accuracy-drop"]),
    (["--ratio", "0.5"], {"ratio": 0.5}, ["--ratio", "--data"]),
    (["--holdout", "h.npz"], {"holdout": "h.npz"}, ["--holdout", "--data"]),
    (["--batch-size", "0"], {"batch_size": 0}, ["--batch-size", ">= 1"]),
    (["--max-samples", "-3"], {"max_samples": -3}, ["--max-samples", ">= 1"]),
    (["--threshold", "0"], {"threshold": 0.0}, ["--threshold", "(0, 1]"]),
    (["--threshold", "1.5"], {"threshold": 1.5}, ["--threshold", "(0, 1]"]),
    (["--data", "d.npz", "--ratio", "1"], {"data": "d.npz", "ratio": 1.0}, ["--ratio", "[0, 1)"]),
    (["--data", "d.npz", "--ratio", "-0.1"], {"data": "d.npz", "ratio": -0.1}, ["[0, 1)"]),
    (["--data", "d.npz", "--max-error", "0"], {"data": "d.npz", "max_error": 0.0},
     ["--max-error", "> 0"]),
    (["--data", "d.npz", "--max-error", "inf"], {"data": "d.npz", "max_error": float("inf")},
     ["--max-error", "finite"]),
    (["--data", "d.npz", "--max-error", "nan"], {"data": "d.npz", "max_error": float("nan")},
     ["--max-error", "finite"]),
    (["--data", "d.npz", "--max-accuracy-drop", "-0.01"],
     {"data": "d.npz", "max_accuracy_drop": -0.01}, ["--max-accuracy-drop", "[0, 1]"]),
    (["--data", "d.npz", "--max-accuracy-drop", "2"], {"data": "d.npz", "max_accuracy_drop": 2.0},
     ["--max-accuracy-drop", "[0, 1]"]),
    (["--tolerance", "0"], {"tolerance": 0.0}, ["--tolerance", "> 0"]),
    (["--tolerance", "nan"], {"tolerance": float("nan")}, ["--tolerance", "> 0"]),
    (["--tolerance", "inf"], {"tolerance": float("inf")}, ["--tolerance", "finite"]),
    (["--input-shape", "x:1x0x8x8"], {"input_shapes": {"x": (1, 0, 8, 8)}},
     ["--input-shape", "positive"]),
]


def test_plot_into_a_folder_to_be_created_is_written_like_the_model(tmp_path, capsys,
                                                                    model_path):
    """Seen: `--plot new/p.png` passed the checks (the model and report create their
    folders), then failed with exit 2 after the model was written."""
    pytest.importorskip("matplotlib")
    fig = tmp_path / "new" / "p.png"
    assert main([str(model_path), str(tmp_path / "o.onnx"), "--plot", str(fig)]) == 0, \
        capsys.readouterr().err
    assert fig.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("flags", "kwargs", "words"), OPTION_MISTAKES)
def test_option_mistakes_are_refused_alike_by_cli_and_python(tmp_path, capsys, model_path,
                                                             no_loading, flags, kwargs, words):
    line = refused(capsys, [model_path, tmp_path / "out.onnx", *flags], *words)
    with pytest.raises(UsageError) as caught:
        slim(str(model_path), tmp_path / "out.onnx", **kwargs)
    assert line == f"onnxslim-fr: error: {caught.value}"
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"output": b"out.onnx"}, "output must be a str or os.PathLike path, not bytes"),
    ({"output": 3}, "output must be a str or os.PathLike path, not int"),
    ({"input_shapes": [("x", (1, 3, 8, 8))]}, "input_shapes must be a mapping"),
    ({"input_shapes": {"x": "1x3x8x8"}}, "dims must be positive integers, got '1x3x8x8'"),
    ({"input_shapes": {"x": 5}}, "dims must be positive integers, got 5"),
])
def test_python_argument_of_the_wrong_type_is_a_usage_error_not_a_traceback(
        model_path, no_loading, kwargs, words):
    with pytest.raises(UsageError, match=words):
        slim(str(model_path), **kwargs)


def test_input_shape_dims_may_be_a_numpy_array(model_path):
    rep = slim(str(model_path), input_shapes={"x": np.array([2, 3, 8, 8])}, latency_runs=0)
    assert rep.report.max_rel_error < 1e-4


def test_an_input_shape_given_twice_is_refused(tmp_path, capsys, model_path, no_loading):
    refused(capsys, [model_path, tmp_path / "o.onnx", "--input-shape", "x:1x3x8x8",
                     "--input-shape", "x:2x3x8x8"], "--input-shape x", "twice")


def test_usage_mistakes_are_one_line_exit_2(tmp_path, capsys, model_path):
    refused(capsys, [model_path, tmp_path / "o.onnx", "--bogus"], "--bogus", "--help")
    refused(capsys, [model_path, tmp_path / "o.onnx", "--ratio", "abc"], "--ratio", "'abc'")
    refused(capsys, [model_path], "output path is required")
    refused(capsys, [model_path, tmp_path / "o.onnx", "--inspect"], "--inspect writes nothing")
    refused(capsys, [model_path, "--inspect", "--plot", tmp_path / "p.png"], "--plot")


def test_unknown_input_shape_name_lists_the_real_inputs(tmp_path, capsys, model_path):
    refused(capsys, [model_path, tmp_path / "o.onnx", "--input-shape", "image:1x3x8x8"],
            "'image'", "its inputs are: x")
    refused(capsys, [model_path, tmp_path / "o.onnx", "--input-shape", "x:1x3x8"],
            "does not fit input x of shape ?x3x8x8")
    with pytest.raises(UsageError, match="its inputs are: x"):
        slim(str(model_path), input_shapes={"image": (1, 3, 8, 8)})
    assert not (tmp_path / "o.onnx").exists()


# 3. an original onnxruntime cannot load -----------------------------------------------
@pytest.mark.parametrize(("name", "described"), [
    ("n3", "node 'n3' (com.example::Foo)"),
    ("", "unnamed node #2 (com.example::Foo)"),
])
def test_original_onnxruntime_cannot_load_is_refused_naming_the_node(
        tmp_path, capsys, monkeypatch, name, described):
    src = save(custom_op_model(name), tmp_path / "in.onnx")
    monkeypatch.setattr(api, "normalize", lambda *a: pytest.fail("analysis ran"))
    line = refused(capsys, [src, tmp_path / "out.onnx"],
                   f"onnxruntime cannot run {described}: ", "Foo")
    assert "not a registered" in line
    with pytest.raises(UnsupportedError, match=r"cannot run .*com\.example::Foo"):
        slim(onnx.load(src))
    assert not (tmp_path / "out.onnx").exists()


# 4. interrupts and closed pipes ---------------------------------------------------------
def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch, model_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "slim", interrupted)
    assert main([str(model_path), str(tmp_path / "out.onnx")]) == 130
    assert one_line(capsys) == "onnxslim-fr: interrupted; nothing written"


def test_sigterm_exits_143_with_one_line_and_the_handler_is_restored(tmp_path, capsys,
                                                                      monkeypatch, model_path):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        pytest.fail("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "slim", terminated)
    assert main([str(model_path), str(tmp_path / "out.onnx")]) == 143
    assert one_line(capsys) == "onnxslim-fr: interrupted; nothing written"
    assert signal.getsignal(signal.SIGTERM) == before


WAITING_RUN = """import sys, time
import onnxslim_fr.cli as cli
def slow(*args, **kwargs):
    print("running", file=sys.stderr, flush=True)
    time.sleep(60)
cli.slim = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_to_a_running_process_exits_130_cleanly(tmp_path, model_path):
    """A real SIGINT from outside (SIGTERM is sent for real in the in-process test)."""
    proc = subprocess.Popen([sys.executable, "-c", WAITING_RUN, str(model_path),
                             str(tmp_path / "out.onnx")], stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stderr.readline().strip() == "running"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert proc.stderr.read().strip() == "onnxslim-fr: interrupted; nothing written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_closed_stdout_gives_no_traceback(model_path):
    """`--inspect | head -1`: the reader is gone before the groups are printed."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxslim_fr", str(MASKED), "--inspect"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


# 5. bugs are exit 3, one line; exit 1 is only validation ---------------------------------
def test_internal_error_is_one_line_exit_3_and_traceback_only_with_v(tmp_path, capsys,
                                                                     monkeypatch, model_path):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(cli, "slim", bug)
    argv = [str(model_path), str(tmp_path / "out.onnx")]
    assert main(argv) == 3
    assert one_line(capsys) == ("onnxslim-fr: internal error: ZeroDivisionError: boom second "
                                "line (nothing written; rerun with -v for the traceback)")
    assert main([*argv, "-v"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("onnxslim-fr: internal")


def test_exit_codes_are_documented_and_only_validation_is_exit_1():
    def subclasses(cls):
        return [cls] + [s for c in cls.__subclasses__() for s in subclasses(c)]

    assert [c for c in subclasses(SlimError) if c.exit_code == 1] == [ValidationError]
    text = parser().format_help()
    for words in ("1 validation failed", "2 refused", "3 internal error", "130 interrupted"):
        assert words in " ".join(text.split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "3 internal error" in readme and "130" in readme


# 6. files: IR version, umask, no leftovers, external data -------------------------------
@pytest.mark.parametrize("planted", [True, False])
def test_output_keeps_the_input_ir_version(tmp_path, capsys, planted):
    model = redundant_cnn(ir_version=11)
    if not planted:  # nothing to remove: the model is handed back as it came
        model = custom_op_free_unslimmable()
        model.ir_version = 11
    src, out = save(model, tmp_path / "in.onnx"), tmp_path / "out.onnx"
    assert main([str(src), str(out)]) == 0
    assert onnx.load(str(out)).ir_version == 11
    assert onnx.load(str(src)).ir_version == 11


def custom_op_free_unslimmable() -> onnx.ModelProto:
    b = Net((None, 3, 8, 8))
    return b.build(b.conv(b.x, 4))


@pytest.fixture(params=[True, False], ids=["O_TMPFILE", "mkstemp"])
def unnamed(request, monkeypatch):
    if request.param and not atomic._UNNAMED:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(atomic, "_UNNAMED", request.param)
    return request.param


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_output_mode_follows_the_umask(tmp_path, unnamed, mask):
    old = os.umask(mask)
    try:
        model_io.save_atomic(redundant_cnn(), tmp_path / "m.onnx")
        model_io.save_atomic(redundant_cnn(), tmp_path / "m.onnx")  # over an existing file
        model_io.save_atomic(redundant_cnn(), tmp_path / "e.onnx", external=True)
    finally:
        os.umask(old)
    for name in ("m.onnx", "e.onnx", "e.onnx.data"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.onnx", "e.onnx.data", "m.onnx"]


@pytest.mark.parametrize("external", [False, True])
def test_failed_serialization_leaves_no_file(tmp_path, monkeypatch, unnamed, external):
    def fails(model, ir_version):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(model_io, "serialized", fails)
    with pytest.raises(RuntimeError):
        model_io.save_atomic(redundant_cnn(), tmp_path / "m.onnx", external=external)
    assert list(tmp_path.iterdir()) == []


KILLED_WRITE = """import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])  # no package imports
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.staged() as stage:
    stage(sys.argv[2] + ".data").write(b"w" * 100_000)
    stage(sys.argv[2]).write(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
"""


TWO_RUNS = """
import sys
from onnxslim_fr.cli import main
model, out = sys.argv[1:3]
print(main([model, out + "/ok.onnx", "-q"]), main([model, out + "/no.onnx", "-q",
                                                    "--tolerance", "1e-30"]))
"""


def test_a_run_leaves_nothing_in_tmpdir_whether_it_succeeds_or_fails(tmp_path):
    """onnxruntime's telemetry writes $TMPDIR/.ses at import; sessions and the weight store
    must leave nothing either, after a written model (exit 0) or a failed validation (1)."""
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    proc = subprocess.run([sys.executable, "-c", TWO_RUNS, str(MASKED), str(out)],
                          env={**env, "TMPDIR": str(tmp)}, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.stdout.split()[-2:] == ["0", "1"], proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ok.onnx"]
    assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tmp"]


@pytest.mark.skipif(not atomic._UNNAMED, reason="no O_TMPFILE here")
def test_killed_write_leaves_no_file(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, atomic.__file__,
                           str(tmp_path / "m.onnx")], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []


def _outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_external_data_model_is_slimmed_to_external_data(tmp_path, capsys):
    src = save(redundant_cnn(), tmp_path / "in.onnx", save_as_external_data=True,
               location="in.onnx.data", size_threshold=0)
    before = digests(tmp_path)
    out = tmp_path / "out" / "out.onnx"
    assert main([str(src), str(out)]) == 0
    assert digests(tmp_path) == before  # (out/ is a directory: not hashed)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    loaded = onnx.load(str(out))
    assert any(t.data_location == T.EXTERNAL for t in onnx.load(str(out), load_external_data=False
                                                              ).graph.initializer)
    assert out.stat().st_size < 2048  # the weights are beside it, not in it
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(_outputs(out, feeds)[0], _outputs(src, feeds)[0],
                               rtol=1e-4, atol=1e-4)
    assert loaded.graph.initializer[0].dims[0] == 15  # the planted channel went


def test_output_over_the_inline_limit_goes_to_external_data(tmp_path, capsys, monkeypatch,
                                                           model_path):
    monkeypatch.setattr(model_io, "INLINE_LIMIT", 1000)
    out = tmp_path / "out.onnx"
    assert main([str(model_path), str(out)]) == 0
    assert (tmp_path / "out.onnx.data").is_file()
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    np.testing.assert_allclose(_outputs(out, feeds)[0], _outputs(model_path, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_model_proto_with_unloaded_external_data_is_refused(tmp_path):
    src = save(redundant_cnn(), tmp_path / "in.onnx", save_as_external_data=True,
               location="in.onnx.data", size_threshold=0)
    with pytest.raises(SlimError, match="pass the model's path"):
        slim(onnx.load(str(src), load_external_data=False))


# 7. calibration data that cannot be used ----------------------------------------------
def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


X = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
BAD_DATA = [  # (data, words)
    ({"x": X[:0]}, "is empty (no samples)"),
    ({}, "is empty (no arrays)"),
    ([], "is empty (no samples)"),
    ({"x": X, "labels": np.zeros((8, 2), np.int64)}, "labels must be a 1-D array of integer"),
    ({"x": X, "labels": np.zeros(8, np.float32)}, "labels must be a 1-D array of integer"),
    ([{"x": X, "labels": np.zeros(8)}], "labels must be a 1-D array of integer"),
    ({"x": np.full((8, 3, 8, 8), 1e39)}, "beyond the range of float32"),
    (42, "must be a .npz/.npy path"),
]


@pytest.mark.parametrize(("data", "words"), BAD_DATA)
def test_unusable_calibration_data_is_refused(model_path, data, words):
    with pytest.raises(BadDataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        slim(str(model_path), data=data, ratio=0.5, latency_runs=0)


def test_an_input_without_a_batch_axis_says_how_to_export_it():
    """x[:, sel] with sel an index vector [4]: samples cannot be stacked on sel, and
    'has shape 8x4, model expects 4' did not say why."""
    graph = h.make_graph(
        [h.make_node("Gather", ["x", "sel"], ["g"], axis=1),
         h.make_node("MatMul", ["g", "w"], ["y"])], "side",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 6]),
         h.make_tensor_value_info("sel", T.INT64, [4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 2])],
        [nh.from_array(np.ones((4, 2), np.float32), "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=10)
    data = {"x": np.ones((8, 6), np.float32), "sel": np.tile(np.arange(4), (8, 1))}
    with pytest.raises(BadDataError, match=r"sel .* has no batch axis.*export the model"):
        slim(model, data=data, ratio=0.3, latency_runs=0)


def test_int64_data_beyond_int32_input_is_refused(tmp_path, capsys):
    src = save(int32_model(), tmp_path / "in.onnx")
    data = _npz(tmp_path / "d.npz", x=np.full((4, 4), 2**40, np.int64))
    refused(capsys, [src, tmp_path / "o.onnx", "--data", data, "--ratio", "0.2"],
            "input x", "beyond the range of int32")
    ok = _npz(tmp_path / "ok.npz", x=np.arange(16, dtype=np.int64).reshape(4, 4))
    assert main([str(src), str(tmp_path / "o.onnx"), "--data", str(ok), "--ratio", "0"]) == 0


def test_empty_npz_and_holdout_without_labels_are_refused_by_the_cli(tmp_path, capsys,
                                                                     model_path):
    empty = _npz(tmp_path / "empty.npz", x=X[:0])
    refused(capsys, [model_path, tmp_path / "o.onnx", "--data", empty, "--ratio", "0.3"],
            "calibration data is empty")
    good = _npz(tmp_path / "good.npz", x=X)
    refused(capsys, [model_path, tmp_path / "o.onnx", "--data", good, "--holdout", empty,
                     "--ratio", "0.3"], "hold-out data is empty")
    refused(capsys, [model_path, tmp_path / "o.onnx", "--data", good,
                     "--max-accuracy-drop", "0.01"], "--max-accuracy-drop needs labels")
    assert not (tmp_path / "o.onnx").exists()


def test_a_dynamic_dimension_written_as_minus_one_is_an_ordinary_dynamic_dim(tmp_path):
    """Old exporters (paddle's classifiers) declare inputs like [-1, 3, ?, ?]."""
    b = Net((None, 3, 8, 8))
    model = b.build(b.conv(b.relu(b.conv(b.x, 4)), 2))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main([str(path), str(tmp_path / "out.onnx")]) == 0


# the report tells the truth ----------------------------------------------------------------
def test_unchanged_model_with_constant_node_weights_reports_its_params_unchanged():
    """paddle2onnx writes weights as Constant nodes; with nothing to remove the model comes
    back as it was, and the report must not say its parameters went to 0."""
    b = Net((None, 3, 8, 8))
    model = b.build(b.conv(b.relu(b.conv(b.x, 4)), 2))
    for init in list(model.graph.initializer):  # every weight becomes a Constant node
        model.graph.node.insert(0, h.make_node("Constant", [], [init.name], value=init))
    del model.graph.initializer[:]
    rep = slim(model, latency_runs=0).report
    assert rep.before.params == rep.after.params > 0
    assert rep.before.channels == rep.after.channels > 0


def test_labels_that_no_class_can_have_are_refused(tmp_path, capsys):
    """Label 99 for a 10-class output made both accuracies 0, so any slimming was "within"
    --max-accuracy-drop; it is refused before the run."""
    src = ROOT / "models" / "digits_cnn.onnx"
    calib = np.load(ROOT / "models" / "digits_img_calib.npz")
    bad = _npz(tmp_path / "bad.npz", input=calib["input"],
               labels=np.full(len(calib["input"]), 99, np.int64))
    refused(capsys, [src, tmp_path / "o.onnx", "--data", bad, "--max-accuracy-drop", "0.1"],
            "labels must be class ids in [0, 10)", "[99, 99]")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("what", ["model", "pickle", "empty"])
def test_data_that_is_not_an_array_file_is_refused_in_our_words(tmp_path, capsys, model_path,
                                                                 what):
    """`--data model.onnx` (a slip of the arguments) or a pickled object array: one line that
    says what the file should be, not numpy's advice to unpickle it."""
    data = tmp_path / "data.npy"
    if what == "model":
        data = model_path
    elif what == "pickle":
        np.save(data, np.array([{"x": 1}], dtype=object))
    else:
        data.write_bytes(b"")
    code = main([str(model_path), str(tmp_path / "out.onnx"), "--data", str(data),
                 "--ratio", "0.3", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "allow_pickle" not in err and len(err.strip().splitlines()) == 1
    assert ("not a .npz or .npy file" in err) if what != "pickle" else ("Python objects" in err)
