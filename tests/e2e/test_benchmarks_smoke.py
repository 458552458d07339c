"""Every benchmark script runs its `--smoke` mode (tiny sizes, seconds) to the end: a benchmark nobody runs breaks
silently (benchmarks/step_overhead.py once crashed on a changed backend signature). The figures are not checked
here; the scripts print them for people. Two scripts run at a time (most are one single-threaded process)."""
import os
import subprocess
import sys
import time

from tests.helpers import ROOT

SCRIPTS = sorted(name for name in os.listdir(os.path.join(ROOT, "benchmarks")) if name.endswith(".py"))
AT_ONCE = 2
TIMEOUT_SECONDS = 300


def test_every_benchmark_smoke_mode_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    waiting, running, failures = list(SCRIPTS), {}, []
    while waiting or running:
        while waiting and len(running) < AT_ONCE:
            script = waiting.pop(0)
            folder = tmp_path / script.removesuffix(".py")
            folder.mkdir()
            args = [sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke"]
            if script == "toy_methods.py":
                args += ["--out", str(folder / "bench")]
            running[script] = (subprocess.Popen(args, env=env, cwd=folder, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True), time.time())
        for script, (proc, started) in list(running.items()):
            if proc.poll() is None and time.time() - started < TIMEOUT_SECONDS:
                continue
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            del running[script]
            print(f"{script}: exit {proc.returncode} after {time.time() - started:.0f} s")
            if proc.returncode != 0 or not out.strip():
                failures.append(f"{script} (exit {proc.returncode}): {err[-1500:]}")
        time.sleep(0.2)
    assert failures == []
