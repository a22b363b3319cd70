"""The README's commands are the ones that work: the demo runs, CI runs the test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from onnxslim_fr.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", README, re.S)
    assert match, f"README has no {marker} command"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    assert _command("tests") in (ROOT / ".ci" / "run").read_text()


def test_readme_demo_command_runs(tmp_path, monkeypatch):
    demo = _command("demo").split("&&")[-1].strip()
    argv = shlex.split(demo)
    assert argv[0] == "onnxslim-fr"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(ROOT / "models")
    assert main(argv[1:]) == 0
    assert (tmp_path / "digits_cnn_slim.onnx").exists()
