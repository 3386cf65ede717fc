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
    _held[key] = fd


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
