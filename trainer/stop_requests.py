"""Stopping a training stage cleanly: a checkpoint at the next step boundary, then exit (docs/operations.md
"Stopping, preemption and time limits").

Three ways to ask, all honoured at the next step boundary by every rank at the same step:
- SIGTERM (Slurm's time limit, `scancel`, torchrun shutting its workers down) and SIGINT (Ctrl-C): checkpoint,
  then exit 143 / 130 (trainer/exit_codes.py). Slurm sends SIGKILL `KillWait` seconds after SIGTERM (30 s by
  default) and torchrun 30 s after forwarding it: one step plus one checkpoint write must fit in that window.
- SIGUSR1, or the file named by DMDX_PREEMPT_FILE (the sbatch script's USR1 trap touches it: `--signal=B:USR1`
  reaches the batch shell only): checkpoint, exit 0, and the job script requeues.
Repeats are expected and ignored: Slurm signals every process of the job and torchrun forwards the same signal to
its workers, so a worker sees SIGTERM (or Ctrl-C's SIGINT) twice within moments. A SIGINT more than
`REPEAT_SECONDS` after the first ends the process at once (the default action): a user pressing Ctrl-C again.

The handlers are installed only while a training stage runs (`installed()`): elsewhere a signal acts as usual.
Agreement across ranks: one 4-byte all-reduce (MAX) per step on a gloo group. It is a host-side collective that
never touches the accelerator's stream (no device sync); across nodes it costs one small-message latency per step
(~0.1 ms against steps of hundreds of milliseconds). Without it ranks could stop at different steps and deadlock.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Iterator

import torch
import torch.distributed as dist

PREEMPT_FILE_ENV = "DMDX_PREEMPT_FILE"
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_SECONDS = 3.0


class StopRequests:
    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.received = 0                 # the first signal number caught, 0 if none
        self.first_at = 0.0               # when (monotonic seconds)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.first_at and time.monotonic() - self.first_at > REPEAT_SECONDS:
            signal.signal(signum, signal.SIG_DFL)   # Ctrl-C again, later: the user wants out now
            os.kill(os.getpid(), signum)
            return
        if not self.received:
            self.received, self.first_at = signum, time.monotonic()

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequests"]:
        previous = {s: signal.getsignal(s) for s in HANDLED}
        for s in HANDLED:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def local(self) -> int:
        """This rank's request: a signal number, or SIGUSR1 for the job script's file (rank 0 looks), or 0."""
        if self.received:
            return int(self.received)
        path = os.environ.get(PREEMPT_FILE_ENV)
        if self.is_main and path and os.path.exists(path):
            return int(signal.SIGUSR1)
        return 0

    def poll(self) -> int:
        """Collective: the request every rank acts on (the highest signal number any rank saw), or 0."""
        flag = self.local()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return flag
        value = torch.tensor([flag], dtype=torch.int32)
        # the default group on CPU; a gloo twin of it on CUDA (nccl would put the flag on the device stream), made
        # on the first poll, which every rank reaches at the same step
        group = None if dist.get_backend() == "gloo" else _gloo_group()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return int(value.item())   # a CPU tensor: no device sync

    def consume_file(self) -> None:
        """Remove the job script's request once the checkpoint is written: the script requeues only when it is gone."""
        path = os.environ.get(PREEMPT_FILE_ENV)
        if self.is_main and path:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


_GLOO = None


def _gloo_group():
    """One gloo group over every rank, made once (a collective call: every rank reaches it at the same point)."""
    global _GLOO
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo")
    return _GLOO
