"""What a training process sets up around the loop: its CPU threads, and how signals stop it.

Threads: intra-op threads are chosen so that processes x threads stays within the cores other work leaves
idle (`apply_num_threads`). Signals: Ctrl-C, SIGTERM and SIGUSR1 (a scheduler's preemption notice) stop a run
with a checkpoint; they are held while a checkpoint is written (`deferred_signals`), and several processes
stop together at a step boundary (`StopAtStepBoundary`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable

import torch


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 (a scheduler's preemption notice) during training: handled like Ctrl-C (a checkpoint
    is saved); `tune` exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def stop_on_signals() -> dict:
    """Make SIGTERM and SIGUSR1 raise Interrupted (main thread only); returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        raise Interrupted(signum)

    return {s: signal.signal(s, stop) for s in STOP_SIGNALS}


def restore_handlers(previous: dict):
    for s, handler in previous.items():
        signal.signal(s, handler)


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def deferred_signals(deliver: bool = True):
    """Hold SIGINT, SIGTERM and SIGUSR1 while the block runs (a checkpoint being written): they are recorded and,
    with `deliver`, sent again to the process once it is done, so a second Ctrl-C cannot break a save.
    Outside the main thread (where signal handlers cannot be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if deliver:
            for s in dict.fromkeys(pending):
                signal.raise_signal(s)


class SignalHold:
    """SIGINT, SIGTERM and SIGUSR1 held between `hold()` and `release()`, which may sit in different functions (the
    engine holds them from a step's optimizer update until the step is counted, so an interrupt never saves weights
    that took part of an update under the previous step's number). `release()` puts the previous handlers back and,
    with `deliver`, sends the held signals again. Outside the main thread both do nothing."""

    def __init__(self):
        self.previous: dict = {}
        self.pending: list[int] = []

    def hold(self):
        if self.previous or threading.current_thread() is not threading.main_thread():
            return
        self.pending = []
        self.previous = {s: signal.signal(s, lambda signum, frame: self.pending.append(signum))
                         for s in INTERRUPT_SIGNALS}

    def release(self, deliver: bool = True):
        previous, self.previous = self.previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
        if deliver:
            for s in dict.fromkeys(self.pending):
                signal.raise_signal(s)
        self.pending = []


class StopAtStepBoundary:
    """Ctrl-C, SIGTERM or SIGUSR1 for a run on several processes (torchrun forwards SIGINT and SIGTERM to each):
    an exception raised wherever each process happens to be would leave one rank inside a collective (a
    gradient all-reduce) that another rank abandoned, and the checkpoint's barriers would then hang or fail.
    Instead a signal only records its number, and at each step boundary the processes agree (one gather)
    whether any was asked to stop. Installed from the main thread only (signal handlers live there); `restore`
    puts the previous handlers back."""

    def __init__(self):
        self.requested = 0  # the signal number received, 0: none
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._request) for s in (signal.SIGINT, *STOP_SIGNALS)}

    def _request(self, signum, frame):
        self.requested = self.requested or signum

    def agreed(self, accelerator) -> int:
        """The signal any process got (0: none); the same on every process (a collective: every rank calls it)."""
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())

    def raise_if_requested(self, accelerator):
        """Raise KeyboardInterrupt (SIGINT) or Interrupted (SIGTERM, SIGUSR1) on every process when any got one."""
        signum = self.agreed(accelerator)
        if signum:
            raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_fraction(interval: float = 0.2) -> float:
    """The fraction of the machine's CPU time spent outside idle over the next `interval` seconds (this
    process sleeps meanwhile, so it measures other work), from /proc/stat; elsewhere the 1-minute load
    average per CPU. 0.0 when neither is available."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
        return sum(ticks), ticks[3] + ticks[4]

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
        if total1 > total0:
            return min(1.0, max(0.0, 1 - (idle1 - idle0) / (total1 - total0)))
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "getloadavg"):
        return min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    return 0.0


def choose_num_threads(requested: int, cores: int, processes: int, omp_env: str | None = None,
                       busy: float = 0.0) -> tuple[int, str]:
    """(intra-op threads per process, where the number comes from) for `processes` processes on this machine.

    `requested` > 0 (train.num_threads) is taken as given. Else a set OMP_NUM_THREADS (`omp_env`, its first
    number) is respected. Else auto: the cores other work leaves idle (`cores` x (1 - `busy`), rounded, at
    least 1) shared out so that processes x threads <= those cores. More threads than idle cores make every
    step wait for descheduled threads: on 2 busy cores the demo ran 2.5-4x slower with 2 threads than with 1
    (README: The engine).
    """
    if requested > 0:
        return requested, "train.num_threads"
    if omp_env:
        first = omp_env.split(",")[0].strip()
        if first.isdigit() and int(first) > 0:
            return int(first), "OMP_NUM_THREADS"
    idle = max(1, round(cores * (1 - min(1.0, max(0.0, busy)))))
    return max(1, idle // max(1, processes)), "auto"


def apply_num_threads(requested: int, log: Callable[[str], None] | None = print,
                      key: str = "train.num_threads") -> int:
    """torch.set_num_threads(choose_num_threads(...)) for this process, from `requested` (0 = auto), the
    environment's OMP_NUM_THREADS, LOCAL_WORLD_SIZE (processes on this machine: set by torchrun, else 1),
    the usable cores and (auto only) how busy they are. `log` (None on non-main processes) gets one line
    saying the choice. Returns the thread count."""
    cores, processes = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    omp_env = os.environ.get("OMP_NUM_THREADS")
    busy = busy_fraction() if requested == 0 and not omp_env else 0.0
    threads, source = choose_num_threads(requested, cores, processes, omp_env, busy)
    torch.set_num_threads(threads)
    if log is not None:
        why = {"train.num_threads": f"{key}={threads}", "OMP_NUM_THREADS": "from OMP_NUM_THREADS",
               "auto": f"auto: cores {100 * busy:.0f}% busy with other work"}[source]
        change = "" if source == "train.num_threads" else f"; {key}=N to change"
        log(f"threads: {threads} intra-op per process ({why}; {processes} process{'es' if processes > 1 else ''}, "
            f"{cores} cores{change})")
    return threads
