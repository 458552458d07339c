"""The exit codes of every dmdx command, and the two error kinds that map onto them (docs/operations.md "Exit
codes"). A user or a job script can tell from the code alone whether rerunning the same command can help:

    0    done, or stopped on USR1 with a checkpoint written (a rerun resumes; the sbatch script requeues)
    1    training stopped itself (guards: non-finite losses after the allowed rollbacks)
    2    bad input: recipe, arguments, run-dir config, a damaged or mismatched data stream; fix it, then rerun
    3    the environment: disk full, quota, permissions, read-only file system, run dir held by another trainer,
         no usable checkpoint storage; fix it (or wait), then rerun the same command
    130  stopped on SIGINT, 143 on SIGTERM: a checkpoint was written at the next step boundary; rerun resumes
"""
from __future__ import annotations

import errno
import signal

OK = 0
TRAINING_FAULT = 1
BAD_INPUT = 2
ENVIRONMENT = 3

# errnos that no change of recipe can fix
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def stopped_by(signum: int) -> int:
    """The shell's convention for a process ended by a signal (here: ended cleanly after a checkpoint)."""
    return 128 + int(signal.Signals(signum))


class EnvironmentFault(RuntimeError):
    """The machine refused (exit 3); the message is one line naming the path and the cause."""


def environment_cause(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, its cause or context chain) whose errno is an environment fault, or None.
    Libraries wrap write failures (DCP's CheckpointException, torch.save's RuntimeError): the chain is followed."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)   # DCP's CheckpointException: {rank: exception}
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
    return None
