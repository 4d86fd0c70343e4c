"""Begin a backup and SIGKILL this process just before plan step K is sent.

``python -m tests.cut_runner QMP STATE_DIR SPEC CHECKPOINT K`` — used by the
recover tests to cut a ``backup-begin`` at every point of its plan.  K ``save``
cuts after the last step, when the checkpoint metadata is about to be saved.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from qmpbackup.api import VM
from qmpbackup.planner.plan import Step
from qmpbackup.request import load_backup_spec
from qmpbackup.request.models import CheckpointSpec
from qmpbackup.state.checkpoints import CheckpointStore


def die(*args: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(qmp: str, state_dir: str, spec: str, checkpoint: str, cut: str) -> None:
    def on_step(number: int, step: Step) -> None:
        if str(number) == cut:
            die()

    if cut == "save":
        CheckpointStore.save = die  # type: ignore[method-assign]

    vm = await VM.connect(qmp, state_dir)
    await vm.backup_begin(load_backup_spec(spec), CheckpointSpec(name=checkpoint), on_step)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    qmp, state_dir, spec, checkpoint, cut = sys.argv[1:]
    asyncio.run(main(qmp, state_dir, spec, checkpoint, cut))
