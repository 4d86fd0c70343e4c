"""Exception hierarchy of qmpbackup.

Every error the API raises is a :class:`QmpBackupError`.  Its ``exit_code``
is what the CLI exits with: 2 for input that was refused before anything was
sent to QEMU, 1 for a refusal or failure at run time.  ``str(error)`` is the
one line shown to the user.
"""

from __future__ import annotations


class QmpBackupError(Exception):
    """Base class of every qmpbackup error."""

    exit_code: int = 1


class InvalidInputError(QmpBackupError):
    """The request, a name or an argument is invalid; QEMU was not touched."""

    exit_code = 2


class SpecError(InvalidInputError):
    """A backup or checkpoint description could not be loaded."""


class UnknownDiskError(InvalidInputError):
    """A disk name does not match any guest disk."""


class UnknownCheckpointError(InvalidInputError):
    """A checkpoint name is not known."""


class TargetExistsError(InvalidInputError):
    """A target file exists and reuse was not asked for."""


class PlanError(QmpBackupError):
    """The planner cannot build a plan for this request and this VM."""


class SchemaMismatchError(QmpBackupError):
    """A planned command does not match the live QEMU's QAPI schema."""

    def __init__(self, command: str, member: str, message: str) -> None:
        self.command = command
        self.member = member
        where = f"{command}: {member}" if member else command
        super().__init__(f"schema check failed for {where}: {message}")


class ConnectionFailedError(QmpBackupError):
    """The QMP peer could not be reached, or is not a QMP server."""


class DisconnectedError(QmpBackupError):
    """QEMU went away while a command was in flight."""


class QMPCommandError(QmpBackupError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{command} failed: {error_class}: {desc}")


class GuestAgentError(QmpBackupError):
    """The guest agent could not be reached, did not answer in time, or refused a command
    (then ``command``, ``error_class`` and ``desc`` say which and why)."""

    def __init__(
        self,
        message: str,
        *,
        command: str | None = None,
        error_class: str | None = None,
        desc: str | None = None,
    ) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(message)


class JobFailedError(QmpBackupError):
    """A QEMU job concluded with an error."""


class ScratchFullError(QmpBackupError):
    """A pull backup's scratch ran out of the room it was given: the backup ends, so that
    the guest's writes never fail for it."""


class BackupActiveError(QmpBackupError):
    """A backup job is still copying and --abort was not given."""


class BackupNotFoundError(InvalidInputError):
    """No backup job with that id."""


class LeftoversError(QmpBackupError):
    """An earlier run left jobs, nodes, exports, bitmaps, files or journals behind."""


def one_line(exc: BaseException) -> str:
    """A one-line account of ``exc`` (pydantic's and OSError's own texts are longer)."""
    # Imported here: the commands that never validate a model start without pydantic.
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{exc.error_count()} invalid field(s), first {where}: {first['msg']}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
