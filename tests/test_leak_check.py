"""The leak check itself: a suite whose tests leave things behind fails."""

from __future__ import annotations

from pathlib import Path

import pytest

LEAKY_TESTS = """
import socket
import subprocess
import tempfile


def test_leaves_a_process():
    subprocess.Popen(["sleep", "60"])


def test_leaves_a_socket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative name: the absolute path is too long to bind
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("left.sock")
    sock.close()


def test_leaves_a_temp_file():
    tempfile.mkstemp(prefix="left-behind-")


def test_clean(tmp_path):
    (tmp_path / "a file").write_text("fine")
"""


def test_leaks_fail_the_tests_and_the_session(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent.parent))
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "tests.leak_check", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    result.assert_outcomes(passed=4, errors=2)
    assert "process" in out and "sleep 60" in out
    assert "socket left:" in out and "left.sock" in out
    assert "temp file left:" in out and "left-behind-" in out
    assert "leak check failed" in out
