"""Preemption-safe training: stop at a step boundary on SIGUSR1/SIGTERM, checkpoint, exit for requeue.

Clusters announce the end of a job with a signal: Slurm sends SIGUSR1 `--signal=USR1@<seconds>`
before the time limit (and on `scancel --signal=USR1`), Kubernetes and torchrun send SIGTERM. The
handler only records the signal; the training loop asks at every optimizer-step boundary whether
*any* rank got one (one all-reduce of a single number), so all ranks stop after the same step even
when the signal reached only some of them (Kubernetes signals PID 1 only). The loop then writes one
complete checkpoint (atomic: a hidden temporary folder renamed when complete) and the process
exits with `REQUEUE_EXIT_CODE`; `config_hub/slurm/litllm.sbatch` turns that status into
`scontrol requeue $SLURM_JOB_ID`, and the requeued job continues with `--resume auto`.

A second signal while the checkpoint is written changes nothing: the handler stays installed until
the process exits and only sets the flag again. (SIGKILL can't be caught; the atomic write means
it leaves the previous checkpoint as the newest complete one.)

    stop = StopOnSignal()              # before the loop (main thread)
    ...
    if stop.agreed(fabric):            # at each step boundary, on every rank (collective)
        save the checkpoint; stop.exit(fabric)
    stop.restore()                     # after a loop that ran to the end
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

REQUEUE_EXIT_CODE = 75
"""Exit status of a run stopped by a signal after writing its checkpoint (75 = EX_TEMPFAIL,
"temporary failure, try again"). Resuming with `--resume auto` continues it exactly."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopOnSignal:
    """Records SIGUSR1/SIGTERM; `agreed(fabric)` tells every rank whether any rank got one."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:  # the first signal counts; a later one (mid-checkpoint) changes nothing
            self.received = signum

    def agreed(self, fabric) -> bool:
        """Collective (call on every rank at the same step): True everywhere if any rank got a signal."""
        if fabric.world_size == 1:  # nothing to agree on: no device tensor, no host sync per step
            return self.received is not None
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=fabric.device)
        flag = fabric.all_reduce(flag, reduce_op="sum")
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """Put the previous handlers back (a run that ended normally)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def exit(self, fabric, step: int) -> None:
        """After the checkpoint is written: say why, and leave with `REQUEUE_EXIT_CODE` (every rank)."""
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        fabric.print(
            f"Stopped by {name} after step {step}: checkpoint written; exiting with status {REQUEUE_EXIT_CODE} "
            f"(requeue and run again with --resume auto to continue)"
        )
        raise SystemExit(REQUEUE_EXIT_CODE)
