"""A real one-node Slurm on loopback for the tests (slurm/local/start.sh: Debian's slurm-wlm + munge, daemons under
a state dir, stopped by PID). Root is needed (the daemons run in their own UTS namespace). Without root or apt the
Slurm tests are skipped, except under CI (CI=true), where they fail instead."""
import os
import subprocess

import pytest

from tests.helpers import ROOT

START = os.path.join(ROOT, "slurm", "local", "start.sh")
STOP = os.path.join(ROOT, "slurm", "local", "stop.sh")


@pytest.fixture(scope="session")
def slurm():
    state = f"/tmp/slurm-dmdx-{os.getpid()}"        # short: munge's unix-socket path limit
    result = subprocess.run(["bash", START, state], capture_output=True, text=True, timeout=600)
    if result.returncode:
        message = f"local Slurm did not start: {result.stderr.strip()[-1500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = dict(line[len("export "):].split("=", 1) for line in result.stdout.splitlines()
               if line.startswith("export "))
    env = {k: v.strip("'\"") for k, v in env.items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        subprocess.run(["bash", STOP, state], capture_output=True, text=True, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
