"""The ``qmpbackup`` entry point: parse, connect, run one command, print errors as one line."""

from __future__ import annotations

import argparse
import signal
import sys
import traceback

from ..errors import InvalidInputError, QmpBackupError
from ..logconfig import configure_logging
from .parser import Handler, OfflineHandler, build_parser


async def _run(args: argparse.Namespace) -> int:
    import asyncio

    # Here, not at the top: the commands on a repository alone start without the API.
    from ..api import VM

    if args.command == "demo":
        from ..demo.walk import run_demo

        return await run_demo(args.workdir, keep=args.keep, verbose=args.verbose)
    if not args.qmp:
        raise InvalidInputError("no QMP socket: pass --qmp SOCKET|HOST:PORT or set QMPBACKUP_QMP")
    handler: Handler = args.handler
    # SIGTERM (systemd stopping the service) cancels like SIGINT: the run cleans up.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    vm = await VM.connect(args.qmp, args.state_dir)
    try:
        return await handler(args, vm)
    finally:
        await vm.close()


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command: a repository command directly, the others in an event loop."""
    if args.offline is not None:
        offline: OfflineHandler = args.offline
        return offline(args)
    import asyncio

    try:
        return asyncio.run(_run(args))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmpbackup`` console script."""
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
        print("error: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
