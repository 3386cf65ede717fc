"""Checkpoints: the directories a run saves its state in, and reading them back.

checkpoints/step_NNNNNNN/ holds the trainable weights (model.safetensors), the optimizer and scheduler states,
each process's RNG state, state.json (step, counters, the schedule settings) and, written last, manifest.json
(every file's size and SHA-256). A checkpoint is written into a temp folder and renamed into place; `latest`
(and `best`) name complete ones, and a resume verifies the manifest, falling back to the newest checkpoint
that verifies. Under FSDP the weights and optimizer state are gathered to whole tensors on rank 0, so a
checkpoint resumes under any process count.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn as nn

from tune.errors import ConfigError, TuneError
from tune.runtime import deferred_signals
from tune.train_config import TrainConfig

# What shapes the lr schedule and the data order; a resume must keep them unless train.allow_schedule_change
SCHEDULE_KEYS = ("max_steps", "lr", "min_lr", "warmup_steps", "lr_schedule")
_GLOBAL_BATCH = "global batch (train.micro_batch_size x train.grad_accum_steps x processes)"


def schedule_settings(cfg: TrainConfig, world: int, seed: int | None = None) -> dict:
    """The settings that shape a run's lr schedule and data order, as checkpoints record them in state.json:
    the SCHEDULE_KEYS (as `train.KEY`), the global batch in sequences (batches are drawn per step) and the
    seed (when known)."""
    settings = {f"train.{k}": getattr(cfg, k) for k in SCHEDULE_KEYS}
    settings[_GLOBAL_BATCH] = cfg.micro_batch_size * cfg.grad_accum_steps * world
    if seed is not None:
        settings["seed"] = seed
    settings["train.optimizer"] = cfg.optimizer  # not a schedule setting, but its state must match (schedule_changes)
    settings["train.loraplus_lr_ratio"] = cfg.loraplus_lr_ratio  # the LoRA B matrices' lr
    return settings


def trained_schedule(checkpoint: Path) -> dict | None:
    """The schedule_settings a checkpoint was trained with: from its state.json, or for checkpoints written
    before state.json kept them, from the run's config.yaml (None when neither says)."""
    state = json.loads((checkpoint / "state.json").read_text())
    if "schedule" in state:
        return {"train.optimizer": "adamw", **state["schedule"]}  # checkpoints from before train.optimizer: AdamW
    config_file = Path(checkpoint).parent.parent / "config.yaml"
    if not config_file.is_file():
        return None
    from tune.config import read_yaml

    data = read_yaml(config_file)
    train, defaults = data.get("train") or {}, TrainConfig()
    settings = {f"train.{k}": train.get(k, getattr(defaults, k)) for k in SCHEDULE_KEYS}
    settings[_GLOBAL_BATCH] = (train.get("micro_batch_size", defaults.micro_batch_size)
                               * train.get("grad_accum_steps", defaults.grad_accum_steps) * state.get("world_size", 1))
    if "seed" in data:
        settings["seed"] = data["seed"]
    settings["train.optimizer"] = train.get("optimizer", "adamw")
    return settings


def schedule_changes(checkpoint: Path, cfg: TrainConfig, world: int, seed: int | None = None) -> list[str]:
    """What resuming `checkpoint` with `cfg` on `world` processes would change of its schedule, as
    "KEY old -> new" strings (settings that either side does not know are not compared).

    Raises ConfigError naming every change unless cfg.allow_schedule_change is set, and always for another
    train.optimizer (one optimizer's state cannot be loaded into another's)."""
    old = trained_schedule(checkpoint)
    if old is None:
        return []
    new = schedule_settings(cfg, world, seed)
    if old.get("train.optimizer", new["train.optimizer"]) != new["train.optimizer"]:
        raise ConfigError(f"resuming {checkpoint}: it holds the state of train.optimizer={old['train.optimizer']}, "
                          f"which train.optimizer={new['train.optimizer']} cannot load; resume with "
                          f"train.optimizer={old['train.optimizer']} (or start a new run)")
    old, new = ({k: v for k, v in d.items() if k != "train.optimizer"} for d in (old, new))
    changes = [f"{k} {old[k]} -> {new[k]}" for k in new if k in old and old[k] != new[k]]
    if changes and not cfg.allow_schedule_change:
        raise ConfigError(f"resuming {checkpoint} would change the schedule it was trained with: {', '.join(changes)}; "
                          "resume with its values, or set train.allow_schedule_change=true to continue with the new ones")
    return changes


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 holds this model's parameters as shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters (a tied matrix appears once)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole and on the CPU; frozen weights are not checkpointed.

    Under FSDP the shards are all-gathered: a collective every rank must call, and only rank 0 gets the
    tensors (the others get an empty dict)."""
    if not is_sharded(model):
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=True))
    return {n: full[n].contiguous() for n in trainable_names(model) if n in full}


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class Checkpointer:
    """checkpoints/step_NNNNNNN/ directories, written to a temp dir and renamed into place;
    `latest` names the newest complete one, `best` (train.keep_best) the one of the lowest validation loss.
    Rotation keeps the newest `keep` and the one `best` names."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        return self._pointed("latest")

    def best(self) -> Path | None:
        return self._pointed("best")

    def _pointed(self, pointer_name: str) -> Path | None:
        pointer = self.dir / pointer_name
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def save(self, accelerator, model: nn.Module, optimizer, scheduler, state: dict, rng: dict | None = None,
             best: bool = False) -> Path:
        """Write the checkpoint of `state["step"]` aside, fsync it, rename it into place, then move `latest`
        (and `best`, when `best`). SIGINT/SIGTERM/SIGUSR1 arriving meanwhile take effect once it is done.

        Raises TuneError (the partial temp folder removed) when the disk or quota is full."""
        final = self.dir / f"step_{state['step']:07d}"
        with deferred_signals():
            # A complete checkpoint of this step may exist already (Ctrl-C right after a save, or a run killed
            # between the rename and the pointer update): training is deterministic, so it holds this very
            # state; keep it rather than delete what `latest` may name.
            if verify_checkpoint(final, accelerator.num_processes) is not None:
                self._write(accelerator, model, optimizer, scheduler, state, final, rng)
            if accelerator.is_main_process:
                if best:
                    self._point("best", final)
                self._point("latest", final)
                self._rotate(final)
            accelerator.wait_for_everyone()
        return final

    def _write(self, accelerator, model, optimizer, scheduler, state: dict, final: Path, rng: dict | None):
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        tmp = self.dir / f".tmp-{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        weights = optimizer_state = None
        if accelerator.is_main_process or is_sharded(model):  # under FSDP these are collectives: every rank calls
            weights = trainable_state(model)
            # keyed by parameter name, whole tensors: the same file whatever the sharding or process count
            optimizer_state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
        try:
            torch.save(rng if rng is not None else rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
            if accelerator.is_main_process:
                save_file(weights, tmp / "model.safetensors")
                fault_point("checkpoint", state["step"])
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "state.json").write_text(json.dumps(state, indent=2))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                files = sorted(f for f in tmp.iterdir() if f.name != MANIFEST)
                for f in files:
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                write_manifest(tmp, state["step"], files)  # last: its presence says every file is complete
        except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError: see _is_out_of_space
            if not _is_out_of_space(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            needed = _tensor_bytes(weights) + _tensor_bytes(optimizer_state)
            latest = self.latest()
            kept = (f"the latest complete checkpoint {latest.name} is intact" if latest is not None
                    else "no complete checkpoint was saved before")
            free = shutil.disk_usage(self.dir).free
            detail = (str(e).splitlines() or [""])[0][:120]
            raise TuneError(f"no space left to write checkpoint {final.name} in {self.dir} (it needs about "
                            f"{needed / 1e6:,.1f} MB: weights and optimizer state; {free / 1e6:,.1f} MB free; "
                            f"{type(e).__name__}: {detail}); {kept}; free space and run again with "
                            "train.resume=true") from None
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)  # only ever an incomplete leftover (it did not verify)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            fault_point("pointer", state["step"])

    def remove_stale_temp(self) -> list[Path]:
        """Remove temp folders (`.tmp-step_*`) and pointer temp files that an earlier, killed run left behind.
        Call it only while holding the run lock (tune.run_lock), so no other run is writing them."""
        stale = sorted(self.dir.glob(".tmp-*")) + sorted(self.dir.glob(".*.tmp"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return stale

    def resume_point(self, world: int, log=None) -> Path | None:
        """The checkpoint a resume continues from: the one `latest` names if it verifies (verify_checkpoint),
        else the newest step_* folder that does; `log(line)` hears one line per checkpoint skipped and why.
        None when there is no checkpoint at all.

        Raises TuneError listing every checkpoint and its fault when there are some but none verifies."""
        say = log or (lambda line: None)
        pointer = self.dir / "latest"
        named = self.dir / pointer.read_text().strip() if pointer.is_file() else None
        folders = sorted((p for p in self.dir.glob("step_*") if p.is_dir()), reverse=True)
        candidates = ([named] if named is not None else []) + [p for p in folders if p != named]
        faults = []
        for path in candidates:
            fault = verify_checkpoint(path, world)
            if fault is None:
                if not (path / MANIFEST).is_file():
                    say(f"{path} has no {MANIFEST} (written by an earlier version): resuming it unverified")
                return path
            faults.append(f"{path.name}: {fault}")
            say(f"skipping {self.dir.name}/{path.name}: {fault}")
        if faults and folders:
            raise TuneError(f"no checkpoint in {self.dir} can be resumed ({'; '.join(faults)}); restore one from a "
                            "copy, or start afresh with overwrite=true (train.resume=false)")
        return None

    def supersede_after(self, resumed: Path) -> list[Path]:
        """After resuming `resumed` (possibly an older checkpoint than `latest`, when newer ones failed to verify):
        move every newer step_* folder, the history the resumed run replaces, to checkpoints/superseded/ (never
        deleted), and point `latest` at `resumed`, so rotation counts only the checkpoints of the live history.
        Main process only. Returns the new paths of the folders moved."""
        step = int(resumed.name.split("_")[1])
        moved = []
        for path in sorted(p for p in self.dir.glob("step_*") if p.is_dir() and int(p.name.split("_")[1]) > step):
            target = self.dir / "superseded" / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
        for name in ("latest", "best"):
            pointer = self.dir / name
            if pointer.is_file() and not (self.dir / pointer.read_text().strip()).is_dir():
                if name == "latest":
                    self._point("latest", resumed)
                else:
                    pointer.unlink()  # its checkpoint moved with the superseded history
        return moved

    def _point(self, pointer_name: str, target: Path):
        pointer_tmp = self.dir / f".{pointer_name}.tmp"
        with open(pointer_tmp, "w") as fh:
            fh.write(target.name)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(pointer_tmp, self.dir / pointer_name)
        _fsync_dir(self.dir)

    def _rotate(self, newest: Path):
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        best = self.dir / (self.dir / "best").read_text().strip() if (self.dir / "best").is_file() else None
        for old in done[:-self.keep]:
            if old != newest and old != best:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: Path, accelerator, model: nn.Module, optimizer, scheduler) -> dict:
        """Restore model, optimizer, scheduler and RNG states from checkpoint `path`; a ConfigError (before anything
        changes) when a weight's shape differs from the model the config built."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        weights = read_checkpoint_weights(path, model)
        check_shapes(path, weights, model)
        # every rank reads the whole tensors; under FSDP each keeps its own shard of them
        set_model_state_dict(model, weights, options=_full_options(strict=False))
        set_optimizer_state_dict(model, optimizer, _load_plain(path / "optimizer.pt"), options=_full_options())
        scheduler.load_state_dict(_load_plain(path / "scheduler.pt"))
        rng_file = path / f"rng_rank{accelerator.process_index}.pt"
        if rng_file.is_file():
            rng = _load_plain(rng_file)
            torch.set_rng_state(rng["torch"])
            random.setstate((3, tuple(rng["python"]), None))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return json.loads((path / "state.json").read_text())


def read_checkpoint_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors, checked to be exactly the model's trainable parameters."""
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    expected = set(trainable_names(model))
    if set(weights) != expected:
        raise TuneError(f"{path}: checkpoint tensors do not match the model's trainable parameters "
                        f"(missing {sorted(expected - set(weights))[:3]}, extra {sorted(set(weights) - expected)[:3]}); "
                        "was it written by a different config?")
    return weights


def checkpoint_tensor_shape(path: Path, name: str) -> list[int]:
    """The shape of one tensor of a checkpoint, read from its header (e.g. a native model's vocabulary size)."""
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return list(f.get_slice(name).get_shape())


def find_checkpoint(run_dir: Path, step: int | None = None, best: bool = False) -> Path:
    """The run's latest complete checkpoint, the one of `step`, or (best=True) the one of its lowest validation
    loss. Raises ConfigError naming what is there when there is no such checkpoint, TuneError when it does not
    verify (verify_checkpoint)."""
    checkpoints = Checkpointer(run_dir, keep=1)
    complete = sorted(p.name for p in checkpoints.dir.glob("step_*") if (p / "state.json").is_file())
    if best:
        path = checkpoints.best()
        if path is None:
            raise ConfigError(f"{checkpoints.dir}: no best checkpoint (only runs with train.keep_best=true keep the "
                              "checkpoint of their lowest validation loss); use --step N or the latest")
    elif step is None:
        path = checkpoints.latest()
        if path is None:
            raise ConfigError(f"{checkpoints.dir}: no complete checkpoint (set train.save_every, or let the run finish)")
    else:
        path = checkpoints.dir / f"step_{step:07d}"
        if not (path / "state.json").is_file():
            raise ConfigError(f"{checkpoints.dir}: no complete checkpoint of step {step}; there are: "
                              f"{', '.join(complete) or 'none'} (train.keep_checkpoints sets how many are kept)")
    fault = verify_checkpoint(path)
    if fault is not None:
        raise TuneError(f"{path} is damaged: {fault}; choose another with --step N (there are: {', '.join(complete)})")
    return path


def _load_plain(path: Path):
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise TuneError(f"{path}: refusing to load it: it is not plain tensor data ({str(e).splitlines()[0][:160]}); "
                        "checkpoint files are only read with torch.load(weights_only=True), so delete this "
                        "checkpoint or restore it from a trusted copy") from None


def rng_state() -> dict:
    """This process's RNG states (dropout masks come from them), as checkpoints store them."""
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def fault_point(name: str, step: int):
    """Crash-safety test hook: with TUNE_KILL_AT=name:step in the environment (several: comma-separated), the
    process SIGKILLs itself there (names: step, eval, checkpoint, pointer); TUNE_KILL_SIGNAL=INT, TERM or USR1
    sends that signal instead (INT is Ctrl-C's). Does nothing otherwise."""
    if f"{name}:{step}" in os.environ.get("TUNE_KILL_AT", "").split(","):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("TUNE_KILL_SIGNAL", "KILL")))


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- integrity: the manifest written last into every checkpoint -------------------------------------------------
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "state.json")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, hex (hashlib reads it in chunks: about 0.85 s per 500 MB on one CPU core)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(folder: Path, step: int, files: list[Path]):
    """Write folder/manifest.json: format version, step, and every file's name, size in bytes and SHA-256; fsynced."""
    entries = {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)} for f in files}
    path = folder / MANIFEST
    with open(path, "w") as fh:
        json.dump({"format": MANIFEST_VERSION, "step": step, "files": entries}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(path: Path, world: int = 1) -> str | None:
    """None when the checkpoint folder is complete and intact, else what is wrong with it (one phrase).

    Checks: every file the manifest lists has its size and SHA-256; state.json parses and names a step; the
    weights, optimizer, scheduler and the RNG file of every process that both the saving and the resuming run
    have (ranks below the smaller of the two process counts) are present. A checkpoint without manifest.json
    (written before manifests existed) is checked for its files and state.json only."""
    if not path.is_dir():
        return "the folder does not exist"
    manifest = None
    if (path / MANIFEST).is_file():
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is not a valid manifest"
        for name, entry in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            size = f.stat().st_size
            if size != entry["bytes"]:
                return f"{name} is {size} bytes, the manifest says {entry['bytes']}"
            if file_digest(f) != entry["sha256"]:
                return f"{name} does not match its checksum in the manifest (damaged content)"
    elif not (path / "state.json").is_file():
        return "incomplete (no state.json, no manifest)"
    for name in REQUIRED:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        return "state.json is not valid (it does not parse or names no step)"
    for rank in range(min(world, int(state.get("world_size", 1)))):
        if not (path / f"rng_rank{rank}.pt").is_file():
            return f"rng_rank{rank}.pt is missing"
    return None


# -- signals and disk space ----------------------------------------------------------------------------------
def _is_out_of_space(e: BaseException) -> bool:
    """Whether a write failed for want of disk space or quota (torch's zip writer reports it as 'unexpected pos',
    safetensors as 'os error 28')."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("unexpected pos", "No space left", "os error 28", "Disk quota", "os error 122"))


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (numel x element size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def check_shapes(path: Path, weights: dict, model: nn.Module) -> None:
    """ConfigError naming the first checkpoint tensor whose shape differs from the model's (a resume with other
    model settings, e.g. model.n_experts or n_embd), instead of load_state_dict's wall of size mismatches. Under
    FSDP the model's DTensors report their full shapes."""
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, tensor in weights.items():
        if name in own and tuple(tensor.shape) != own[name]:
            raise ConfigError(f"{path}: {name} has shape {list(tensor.shape)} in the checkpoint but "
                              f"{list(own[name])} in the model this config builds; resume with the run's own model "
                              "settings (its config.yaml) or start a new output_dir")
