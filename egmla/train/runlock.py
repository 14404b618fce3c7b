"""One trainer per run directory: an OS file lock held for the run's life.

`RUN/.lock` is locked with flock(2) while a trainer (or resume) owns the run, and records who holds it
(pid, host, start time). The kernel drops the lock when the process exits or is killed, so a lock left
by a dead process is never obeyed: the next trainer simply takes it. A second live trainer gets
`RunLocked`, naming the holder. (flock is advisory and local to one host's kernel, or NFS with lock
support: two hosts writing one run over a file system without locks are not detected.)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from egmla.runs import list_checkpoints, storage_problem
from egmla.train.distributed import DistInfo, broadcast_object

LOCK_NAME = ".lock"


class RunLocked(ValueError):
    """Another live process holds the run directory."""


class RunLock:
    """`with RunLock(run_dir):` holds RUN/.lock, or raises RunLocked naming the holder at once."""

    def __init__(self, run_dir: str | Path):
        self.run_dir, self.file = Path(run_dir), None

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_NAME
        file = open(path, "a+")  # never truncate before holding the lock: the holder's record is there
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            for _ in range(20):  # the holder may be writing its record this very moment
                if holder:
                    break
                time.sleep(0.05)
                holder = read_holder(path)
            file.close()
            raise RunLocked(f"run directory {str(self.run_dir)!r} is in use by another trainer (pid "
                            f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
                            f"{holder.get('since', '?')}); wait for it to finish, stop it, or choose another "
                            f"--run-dir") from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # releases the flock; the record stays, and is ignored once unlocked
            self.file = None


def read_holder(path: Path) -> dict:
    """The {pid, host, since} a lock file records ({} if unreadable, e.g. written a moment ago)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, resume: bool, info: DistInfo):
    """The run directory, held by this trainer until the block ends (rank 0 holds the lock; every process
    gets the same error). A new run may not take a folder that already holds checkpoints."""
    created = not run_dir.exists()
    with contextlib.ExitStack() as held:
        problem = None
        if info.is_main:
            try:
                if run_dir.exists() and not run_dir.is_dir():
                    raise ValueError(f"--run-dir {str(run_dir)!r}: is a file, not a folder; choose a folder path")
                held.enter_context(RunLock(run_dir))
                if created:  # a run that fails before writing anything leaves no folder (removed under the lock)
                    held.callback(remove_if_unused, run_dir)
                if not resume and list_checkpoints(run_dir):
                    raise ValueError(f"--run-dir {str(run_dir)!r}: already holds a run with checkpoints; continue "
                                     f"it with --resume {run_dir} or choose another --run-dir")
                if not resume and any(run_dir.glob("*.safetensors")):  # an export, or a run's final weights: a new
                    # run would replace the config.json and tokenizer.json that those weights are read with
                    raise ValueError(f"--run-dir {str(run_dir)!r}: already holds model weights (*.safetensors), "
                                     f"whose config.json and tokenizer.json a new run would overwrite; choose another "
                                     f"--run-dir")
            except ValueError as err:
                problem = err
            except OSError as err:  # a parent that is a file, a read-only or missing mount: one line, not a traceback
                problem = ValueError(f"--run-dir {str(run_dir)!r}: cannot be created or locked ("
                                     f"{storage_problem(err)}); choose a folder path you can write")
        problem = broadcast_object(problem, info)
        if problem is not None:
            raise problem
        yield run_dir


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but its lock file (called while the lock is still held, so no
    other trainer can be starting in it)."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK_NAME}:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
