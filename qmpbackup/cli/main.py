"""The ``qmpbackup`` entry point: parse, connect, run one command, print errors as one line."""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import InvalidInputError, QmpBackupError
from ..logconfig import configure_logging
from .parser import Handler, OfflineHandler, build_parser
from .streams import sturdy_streams

if TYPE_CHECKING:
    import asyncio

# SIGTERM (systemd stopping the service) and SIGHUP (the terminal or ssh session went
# away) end a command as Ctrl-C does: the run cleans up, a backup is aborted.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[str] = []


async def _run(args: argparse.Namespace) -> int:
    import asyncio

    # First, before any import: from here a stop signal cancels this task at its next
    # await, so that the run cleans up (a KeyboardInterrupt raised into the event loop
    # could land anywhere, an import included).
    task = asyncio.current_task()
    assert task is not None
    for number in STOP_SIGNALS:
        asyncio.get_running_loop().add_signal_handler(number, _cancel, task, number)
    if _received:
        raise asyncio.CancelledError
    # Here, not at the top: the commands on a repository alone start without the API.
    from ..api import VM
    from ..runner import uninterrupted

    if args.command == "demo":
        from ..demo.walk import run_demo

        return await run_demo(args.workdir, keep=args.keep, verbose=args.verbose)
    if not args.qmp:
        raise InvalidInputError("no QMP socket: pass --qmp SOCKET|HOST:PORT or set QMPBACKUP_QMP")
    handler: Handler = args.handler
    vm = await VM.connect(args.qmp, args.state_dir)
    try:
        return await handler(args, vm)
    finally:
        # Not cut short by a stop signal: a half-done disconnect prints qemu.qmp's traceback.
        await uninterrupted(vm.close())


def _cancel(task: asyncio.Task[int], number: int) -> None:
    _received.append(signal.Signals(number).name)
    task.cancel()


def _interrupt(number: int, frame: FrameType | None) -> None:
    _received.append(signal.Signals(number).name)
    raise KeyboardInterrupt


def _note(number: int, frame: FrameType | None) -> None:
    _received.append(signal.Signals(number).name)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command: a repository command directly, the others in an event loop."""
    if args.offline is not None:
        offline: OfflineHandler = args.offline
        return offline(args)
    import asyncio

    # Until _run's first lines take them over: noted, acted on there.
    for number in STOP_SIGNALS:
        signal.signal(number, _note)
    if _received:
        raise KeyboardInterrupt
    try:
        return asyncio.run(_run(args))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        # The command has ended: a stop signal no longer changes its outcome. Ignored,
        # as Python's exit would put back the default action, which kills the process.
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmpbackup`` console script."""
    sturdy_streams()
    # From here a stop signal unwinds the command, cleaning up on its way; the event
    # loop of the commands on a VM takes them over (see _run).
    for number in STOP_SIGNALS:
        signal.signal(number, _interrupt)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    configure_logging(args.log_format, args.verbose)
    try:
        return _dispatch(args)
    except QmpBackupError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        by = f" ({_received[-1]})" if _received else ""
        print(f"error: interrupted{by}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
