"""Helpers shared by the benchmarks: environment banner, isolated runs with peak memory, step-time
statistics, FLOP/MFU estimates, a plain-text table and JSON output."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from tune.plan import transformer_flops_per_token  # noqa: F401 - re-exported: the benchmarks' one FLOPs formula

GIB = 1024 ** 3


# -- environment ------------------------------------------------------------------------------------
def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def banner() -> dict:
    """Device and library versions, for the header of every benchmark."""
    import accelerate
    import transformers

    info = {"device": device_name(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    # other processes on the machine skew timings (badly on a 2-core CPU): show the load at start
    info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    return info


def sync():
    """Wait for queued GPU work, so host timestamps bracket the device work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- isolation and memory -----------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def preload_libraries():
    """Import what either side may import lazily mid-run (Trainer, Accelerate, TensorBoard, safetensors,
    matplotlib for the Engine's report), so a CPU peak-RSS delta measures tensors, not library code."""
    import matplotlib

    matplotlib.use("Agg")
    import accelerate  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers.trainer  # noqa: F401


class PeakMemory:
    """Peak memory of the code inside `with`: CUDA max_memory_allocated on a GPU; on CPU the growth of
    the process's peak RSS (getrusage ru_maxrss) over the RSS at entry, meaningful in a fresh process
    (see `isolated`, and call `preload_libraries` first) because ru_maxrss never goes down."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.method = "CUDA max_memory_allocated"
            self.start = torch.cuda.memory_allocated()
        else:
            self.method = "peak RSS delta (getrusage, fresh process)"
            self.start = _rss_bytes()
        self.bytes = None
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start
        return False


def _child(conn, fn, args, kwargs):
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # report, then let the parent raise
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def isolated(fn, *args, timeout: float | None = None, **kwargs):
    """Run fn(*args, **kwargs) in a fresh spawned process and return its (picklable) result.

    Each workload then starts from the same clean state: no allocator cache, compile cache or memory
    high-water mark left over from the previous one. `fn` must be a module-level function. With `timeout`
    (seconds), a process still running then is killed and RuntimeError raised."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    if timeout is not None and not parent.poll(timeout):
        proc.kill()
        proc.join()
        raise RuntimeError(f"{fn.__name__} did not finish within its {timeout:.0f} s cap (killed)")
    try:
        status, value = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{fn.__name__} died without a result (exit code {proc.exitcode})") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in its subprocess:\n{value}")
    return value


# -- timing ---------------------------------------------------------------------------------------------
def time_steps(engine) -> list[float]:
    """The list that will hold the start time of every optimizer step of `engine` (taken once the GPU has finished
    the previous step), stamped in the training thread: the engine prepares the next step's batches in a
    background thread during the current step, so a BatchSource's step_batches call is no clock."""
    stamps: list[float] = []
    original = engine._train_step

    def timed(module, optimizer, step):
        sync()
        stamps.append(time.perf_counter())
        return original(module, optimizer, step)

    engine._train_step = timed
    return stamps


def intervals(stamps: list[float]) -> list[float]:
    """Durations between consecutive timestamps."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def step_stats(step_times: list[float], skip: int, tokens_per_step: int) -> dict:
    """Median step time and tokens/s over the steady steps (the first `skip` are warm-up)."""
    steady = step_times[skip:]
    if not steady:
        raise ValueError(f"no steady steps: {len(step_times)} timed, {skip} skipped as warm-up; raise --steps")
    median = statistics.median(steady)
    return {"steady_steps": len(steady), "step_s_median": median, "step_s_min": min(steady),
            "step_s_max": max(steady), "tokens_per_s": tokens_per_step / median}


# -- FLOPs ------------------------------------------------------------------------------------------------
def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a peak to compare against."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def default_peak_tflops() -> float | None:
    """989 TFLOP/s (H100 SXM bf16 dense) on CUDA; None on CPU, where there is no honest default."""
    return 989.0 if torch.cuda.is_available() else None


# -- output -------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ",.0f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_table(headers: list[str], rows: list[list], title: str | None = None):
    """A fixed-width text table; cells are printed as given (format them first)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def print_banner(info: dict, settings: dict):
    for k, v in {**info, **settings}.items():
        print(f"  {k:<14} {v}")


def write_json(path, data: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}")
