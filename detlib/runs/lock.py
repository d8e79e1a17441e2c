"""Who owns a run folder: ``RunLock``, an ``flock`` on ``RUN/.lock`` held for the run's life, naming its
owner (pid, host); and which folder a launch trains in (``run_dir``, Hydra's ``detlib_run_dir`` resolver):
the unfinished run it continues, or a new one; a sweep job's (``job_subdir``, ``detlib_job_subdir``)."""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from detlib.runs.layout import LOCK, RECORD, is_finished


class RunDirInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for the life of the process that trains in ``RUN``.

    The kernel drops the lock when the process dies (even SIGKILL), so a crashed run never leaves
    its folder locked. The file names the owner so a refused launch can say who holds it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip() or "unknown owner"
            os.close(fd)
            raise RunDirInUse(f"run directory {self.path.parent} is in use by another run ({owner}; lock file "
                              f"{self.path}). Two runs never share a folder: wait for it, stop it, or use "
                              "another folder.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


NEW_RUN = "trainer.resume=new"  # the switch that starts over in a new folder instead of continuing


def run_dir(base: str = "outputs", overrides: Sequence[str] | None = None) -> str:
    """The run folder of a launch (Hydra resolver ``detlib_run_dir``): the newest unfinished run under
    ``base`` launched with exactly these ``overrides`` and not running now, so re-running the same command
    continues it (as detectron2's ``--resume``, but by default); otherwise, or with ``trainer.resume=new``,
    a new ``base/DATE/TIME`` folder."""
    from detlib import distributed as dist

    wanted = None if overrides is None else [str(o) for o in overrides]
    return dist.run_stamp(base, lambda: (None if wanted is None or NEW_RUN in wanted else
                                         unfinished_run(base, wanted)) or dist.claim_new_folder(base))


def unfinished_run(base: str | Path, overrides: list[str]) -> str | None:
    """The newest ``base/DATE/TIME`` whose ``run.json`` records ``overrides``, without ``metrics.json``
    (unfinished) and not locked by a live process; None if there is none."""
    candidates = []
    for record_file in Path(base).glob(f"*/*/{RECORD}"):
        folder = record_file.parent
        if is_finished(folder) or _locked(folder / LOCK):
            continue
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("overrides") == overrides:
            candidates.append((record_file.stat().st_mtime, str(folder)))
    return max(candidates)[1] if candidates else None


def _locked(path: Path) -> bool:
    """Whether a live process holds ``RunLock`` on ``path`` (the lock itself is taken later, by train.py)."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


def job_subdir(name: str) -> str:
    """A sweep job's folder name (``hydra.sweep.subdir``), shortened deterministically when it exceeds the
    file-name limit: a long override value would otherwise stop the sweep with a traceback from ``mkdir``.
    The short name keeps the start and adds a hash of the whole, so it is unique and the same on a relaunch."""
    name = str(name)
    if len(name.encode()) <= NAME_MAX:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    head = name.encode()[:NAME_MAX - 14].decode(errors="ignore")
    short = f"{head}~{digest}"
    print(f"hydra.sweep.subdir: the job folder name is {len(name.encode())} bytes, over the {NAME_MAX}-byte "
          f"file-name limit; using {short[:40]}...~{digest} (set hydra.sweep.subdir='${{hydra.job.num}}' "
          "for short names)", file=sys.stderr)
    return short
