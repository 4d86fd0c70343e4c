"""A pytest plugin that fails the run if a test leaves a process, socket or temp file.

Every process the tests start inherits a marker in its environment, so a helper
that daemonized (and was reparented to init) is still found.  Temporary files
made through :mod:`tempfile` land in a directory of this run, which must be
empty at the end.  Each test's ``tmp_path`` must hold no socket once its
fixtures are torn down.  A leak fails the test that made it (when it can be
told) and always the whole session; leaked processes are killed after the
report so that one leak does not cascade.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

MARKER = "QMPBACKUP_TEST_RUN"

# pytest's own base temp stays in the system temp dir; only what the code
# under test makes through tempfile goes to this run's directory.  The name is
# short because unix socket paths are limited to 107 bytes.
_SYSTEM_TMP = tempfile.gettempdir()
_RUN = uuid.uuid4().hex[:8]
RUN_TMP = Path(_SYSTEM_TMP) / f"qbt-{_RUN}"

_session_leaks: list[str] = []


def _marked_processes() -> dict[int, str]:
    """Live processes carrying this run's marker, except pytest itself: pid to command."""
    found: dict[int, str] = {}
    needle = f"{MARKER}={_RUN}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            status = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        # A zombie is already dead; its parent reaps it.
        if status.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        if needle in environ.split(b"\0"):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
    return found


def _kill(pids: dict[int, str]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _sockets(root: Path) -> list[Path]:
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    found.append(path)
            except OSError:
                continue
    return found


def pytest_configure(config: pytest.Config) -> None:
    """Mark this run's children and point tempfile at this run's directory."""
    os.environ[MARKER] = _RUN
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", _SYSTEM_TMP)
    RUN_TMP.mkdir(mode=0o700)
    os.environ["TMPDIR"] = str(RUN_TMP)
    tempfile.tempdir = None


@pytest.fixture(autouse=True)
def _no_leaks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Fail the test if it left a process or, in its tmp_path, a socket."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    before = set(_marked_processes())
    yield
    leaks = []
    new = {pid: cmd for pid, cmd in _marked_processes().items() if pid not in before}
    leaks += [f"process {pid} still running: {cmd}" for pid, cmd in new.items()]
    _kill(new)
    if tmp is not None:
        leaks += [f"socket left: {path}" for path in _sockets(tmp)]
    if leaks:
        _session_leaks.extend(f"{request.node.nodeid}: {leak}" for leak in leaks)
        pytest.fail("left behind:\n  " + "\n  ".join(leaks), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if anything of this run is still there."""
    leaks = list(_session_leaks)
    running = _marked_processes()
    leaks += [f"process {pid} still running: {cmd}" for pid, cmd in running.items()]
    _kill(running)
    if RUN_TMP.exists():
        left = sorted(str(p) for p in RUN_TMP.iterdir())
        leaks += [f"temp file left: {name}" for name in left]
        shutil.rmtree(RUN_TMP, ignore_errors=True)
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "leak check failed", red=True)
            for leak in leaks:
                reporter.write_line(leak)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
