"""One writer per run directory: an exclusive lock on output_dir/.lock.

The lock is fcntl.flock(LOCK_EX | LOCK_NB) on output_dir/.lock, held by the process that writes the run's shared
files (the main process; under torchrun the other ranks write only their RNG files into the checkpoint temp
folder). The OS releases it when that process exits, however it ends, so a .lock file left by a killed
process blocks nothing: the next run simply locks it again. The file holds the holder's pid, host, start time
and command, for the message a second writer gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from tune.errors import ConfigError

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # resolved run dir -> the open file descriptor holding its lock (this process)


def lock_run_dir(run_dir: Path) -> None:
    """Take the exclusive lock on `run_dir` (created if missing) for the rest of this process's life; a second
    call for the same directory in this process is a no-op.

    Raises ConfigError naming the holder (pid, host, since when) when another process holds it."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(f"output_dir={run_dir} is in use by another run (pid {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')} since {holder.get('since', '?')}); wait for it to finish or "
                          "choose another output_dir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)  # on a network filesystem, other nodes read it while this process keeps it open
    _held[key] = fd


def lock_record(run_dir: Path) -> dict:
    """What run_dir/.lock says (pid, host, since, command); {} when it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def unshared_processes(records: list[dict]) -> list[int]:
    """The processes (by index) whose view of the lock record differs from process 0's, which took the lock."""
    return [rank for rank, record in enumerate(records) if record != records[0]]


def check_run_dir_shared(accelerator, run_dir: Path, attempts: int = 3) -> None:
    """Every process must see the lock the main process (0) took on run_dir, i.e. one filesystem holds run_dir
    for all of them: checkpoints are written by every process into one directory, so with several nodes it
    must be shared (NFS, Lustre, ...). A collective: every process calls it after the lock, and all raise the
    same ConfigError when one sees another directory (retried `attempts` times, 1 s apart, for slow caches)."""
    from accelerate.utils import gather_object

    for attempt in range(attempts):
        views = gather_object([(socket.gethostname(), lock_record(run_dir))])
        unshared = unshared_processes([record for _, record in views])
        if not unshared:
            return
        if attempt < attempts - 1:
            time.sleep(1)
    hosts = ", ".join(sorted({views[rank][0] for rank in unshared}))
    raise ConfigError(f"output_dir={run_dir} is not one directory for all processes: process(es) "
                      f"{', '.join(map(str, unshared))} on {hosts} do not see the run lock process 0 took there; "
                      "with several nodes, put output_dir (and data.cache_dir) on a filesystem every node mounts")


def unlock_run_dir(run_dir: Path) -> None:
    """Release this process's lock on `run_dir`, if it holds one (the file stays; exiting releases it too)."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:  # the holder is between truncating and writing it
        return {}
