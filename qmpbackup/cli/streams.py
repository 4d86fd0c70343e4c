"""The CLI's output streams, which outlive their reader.

A command's output may go away while it runs: ``backup … | head -1`` closes the pipe
after one line, an ssh session that drops leaves a terminal that fails every write.
Neither may end a backup half-way, so a write that fails with the reader gone
(EPIPE, EIO, ENXIO, EBADF) points the stream's descriptor at ``/dev/null`` (the
programs qmpbackup starts inherit that too, and Python's last flush at exit finds
nothing to complain about) and the command goes on. The lines it still has to say
(results, not progress) are logged instead (:func:`emit`): on stderr, or the journal.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import TextIO

import structlog

# The errors of a write whose reader is gone: a closed pipe or socket, a hung-up
# terminal, a descriptor closed under us.
_GONE = frozenset({errno.EPIPE, errno.EIO, errno.ENXIO, errno.EBADF, errno.ECONNRESET})


class SturdyStream:
    """A text stream whose writes never raise once its reader is gone; :attr:`gone`
    says so. Everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except OSError as err:
                self._lost(err)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except OSError as err:
                self._lost(err)

    def isatty(self) -> bool:
        return not self.gone and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)

    def _lost(self, err: OSError) -> None:
        if err.errno not in _GONE:
            raise err
        self.gone = True
        try:
            # What is still buffered is dropped: its reader is gone.
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError):
            pass


def sturdy_streams() -> tuple[SturdyStream, SturdyStream]:
    """Make ``sys.stdout`` and ``sys.stderr`` sturdy (idempotent); both, in that order."""
    if not isinstance(sys.stdout, SturdyStream):
        sys.stdout = SturdyStream(sys.stdout)
    if not isinstance(sys.stderr, SturdyStream):
        sys.stderr = SturdyStream(sys.stderr)
    out, err = sys.stdout, sys.stderr
    assert isinstance(out, SturdyStream) and isinstance(err, SturdyStream)
    return out, err


def emit(line: str, stream: TextIO) -> None:
    """Print ``line`` on ``stream`` at once; once the stream's reader is gone, log it
    instead (warning ``output``), so that a result is not lost with the reader."""
    print(line, file=stream, flush=True)
    if getattr(stream, "gone", False):
        structlog.get_logger("qmpbackup.cli").warning("output", line=line)
