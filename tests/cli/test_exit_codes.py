"""One exit-code convention for every command: 0 ok, 1 a failed gate, 2 unusable input, 3 a bug (never 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from speechlm_eval.cli import app, main

@app.command("boom")
def boom() -> None:
    raise RuntimeError("an exception nothing anticipated")

sys.argv = ["speechlm-eval", *sys.argv[1:]]
main()
"""


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_an_unanticipated_exception_exits_3_with_its_traceback() -> None:
    done = run("boom")
    assert done.returncode == 3
    assert "Traceback" in done.stderr and "RuntimeError: an exception nothing anticipated" in done.stderr
    assert "internal error (a bug" in done.stderr


def test_bad_input_still_exits_2_and_help_0(tmp_path: Path) -> None:
    assert run("report", str(tmp_path / "nowhere")).returncode == 2
    assert run("--help").returncode == 0
