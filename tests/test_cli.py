"""CLI surface: --help everywhere, one-line errors, exit codes."""

import subprocess
import sys

import pytest

COMMANDS = [[], ["data"], ["data", "check"], ["data", "convert"], ["train"], ["predict"], ["synth"],
            ["evaluate"], ["demo"], ["bench"], ["bench", "speed"], ["bench", "synth"],
            ["bench", "efficiency"], ["sim2real"], ["sim2real", "fit-translator"], ["sim2real", "translate"],
            ["sim2real", "gap"], ["review"],
            ["benchmark", "speed"]]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "menseg", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help(cmd):
    r = _run(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    r = _run("data", "check", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]


def test_debug_shows_traceback(tmp_path):
    r = _run("--debug", "data", "check", str(tmp_path / "missing"))
    assert r.returncode != 0
    assert "Traceback" in r.stderr


def test_bad_override_is_clear(tmp_path):
    r = _run("train", "baseline", "train.nope=1")
    assert r.returncode == 2
    assert "unknown config key 'train.nope'" in r.stderr
    assert "Traceback" not in r.stderr
