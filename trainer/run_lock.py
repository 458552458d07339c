"""One trainer per run directory: an exclusive lock held for the whole run by global rank 0.

Two mechanisms, because run dirs usually live on NFS or Lustre:
- `flock` on <run_dir>/.lock: exact and released by the kernel when the holder dies, but some file systems refuse
  it and on others it is node-local only;
- a holder file <run_dir>/.lock.holder (JSON: host, pid, since, heartbeat, job) rewritten every
  `HEARTBEAT_SECONDS` by a daemon thread: a lease that works across nodes on any file system that has atomic
  create and rename. A holder whose heartbeat is older than `LEASE_SECONDS` is stale: its run died without
  releasing (SIGKILL, a lost node) and the next trainer takes over with a line saying so.

A holder from the same Slurm job or torchrun rendezvous (a requeue, an elastic restart on another node) is this
run itself, so it is taken over at once; so is one on this host whose process is gone. Anyone else gets one line
naming the holder (host, pid, since when) and exit 3.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time

from trainer.exit_codes import EnvironmentFault

LOCK_FILE, HOLDER_FILE = ".lock", ".lock.holder"
HEARTBEAT_SECONDS = float(os.environ.get("DMDX_LOCK_HEARTBEAT_SECONDS", "10"))
LEASE_SECONDS = float(os.environ.get("DMDX_LOCK_LEASE_SECONDS", "60"))   # tests shorten both
FLOCK_REFUSED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _run_identity() -> str | None:
    """What makes two processes the same run: the Slurm job (requeues keep its id) or torchrun's rendezvous id."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm:{job}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{rdzv}" if rdzv and rdzv != "none" else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    beat = time.time() - holder.get("heartbeat", 0)
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since} (last heartbeat {beat:.0f} s ago)"


class RunDirLock:
    def __init__(self, run_dir: str, log=print):
        self.run_dir, self.log = run_dir, log
        self.lock_path = os.path.join(run_dir, LOCK_FILE)
        self.holder_path = os.path.join(run_dir, HOLDER_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "job": _run_identity()}
        self.fd: int | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    # --- acquire ---------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Raise EnvironmentFault (one line) when another live trainer holds the run dir."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EnvironmentFault(f"{self.lock_path}: cannot create the run dir's lock: {e.strerror} (hint: "
                                   f"run.dir must be writable)") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder()
            self._close()
            raise EnvironmentFault(f"{self.run_dir}: another trainer holds this run dir ("
                                   f"{describe(holder) if holder else 'holder unknown'}) (hint: wait for it, stop it, "
                                   f"or pick another run.dir)") from None
        except OSError as e:
            if e.errno not in FLOCK_REFUSED:
                raise
            self.log(f"[lock] {self.lock_path}: this file system refuses flock ({e.strerror}); the heartbeat lease "
                     f"in {HOLDER_FILE} alone keeps other trainers out")
        self._claim_holder_file()
        self.thread = threading.Thread(target=self._heartbeat, name="run-dir-lock-heartbeat", daemon=True)
        self.thread.start()

    def _read_holder(self) -> dict | None:
        try:
            with open(self.holder_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _takeover_reason(self, holder: dict) -> str | None:
        """Why a holder that is not this run may be replaced (said in a line), or None when it is a live other run."""
        if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1))):
            return "its process is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > LEASE_SECONDS:
            return f"its lease expired {age - LEASE_SECONDS:.0f} s ago (lease {LEASE_SECONDS:.0f} s)"
        return None

    def _same_run(self, holder: dict) -> bool:
        """An earlier attempt of this run (Slurm requeue, torchrun restart): replaced without a word."""
        return bool(self.me["job"]) and holder.get("job") == self.me["job"]

    def _claim_holder_file(self) -> None:
        for _ in range(3):
            record = dict(self.me, heartbeat=time.time())
            try:   # O_EXCL: of two trainers racing for a free run dir (lease-only file systems), one wins
                fd = os.open(self.holder_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:    # being written or damaged: look again shortly
                    time.sleep(0.2)
                    holder = self._read_holder() or {}
                if not self._same_run(holder):
                    reason = self._takeover_reason(holder)
                    if reason is None:
                        self._close()
                        raise EnvironmentFault(f"{self.run_dir}: another trainer holds this run dir "
                                               f"({describe(holder)}) (hint: wait for it, stop it, or pick another "
                                               f"run.dir)") from None
                    self.log(f"[lock] taking over {self.run_dir} from {describe(holder)}: {reason}")
                with contextlib.suppress(FileNotFoundError):   # rename: atomic, so one of two racers removes it
                    os.rename(self.holder_path, f"{self.holder_path}.stale-{self.me['pid']}")
                    os.remove(f"{self.holder_path}.stale-{self.me['pid']}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return
        raise EnvironmentFault(f"{self.holder_path}: could not claim the run dir's lock after 3 tries (another "
                               f"trainer is starting on it)")

    # --- hold ------------------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            holder = self._read_holder()
            if holder is not None and (holder.get("host"), holder.get("pid")) != (self.me["host"], self.me["pid"]):
                self.log(f"[lock] {self.run_dir} was taken over by {describe(holder)} while this run held it "
                         f"(no heartbeat for {LEASE_SECONDS:.0f} s): stop one of the two")
                return
            tmp = f"{self.holder_path}.{self.me['pid']}.tmp"
            with contextlib.suppress(OSError):   # a missed beat is retried; the lease allows several
                with open(tmp, "w") as f:
                    json.dump(dict(self.me, heartbeat=time.time()), f)
                os.replace(tmp, self.holder_path)

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        holder = self._read_holder()
        if holder is not None and (holder.get("host"), holder.get("pid")) == (self.me["host"], self.me["pid"]):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.holder_path)
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
