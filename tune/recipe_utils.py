"""Small steps every recipe shares: preparing the run directory and sampling text."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tune.errors import ConfigError


def prepare_output_dir(cfg, accelerator, inputs=()) -> Path:
    """Check output_dir against inputs and earlier runs before any heavy work; returns it (not created yet).
    An existing output_dir is locked first (tune.run_lock): a second run writing into it is refused.

    Refuses to start afresh over an earlier run's checkpoints unless train.resume or overwrite is set,
    so nothing already saved is lost by a re-run, and refuses a resume that would change the schedule the
    checkpoint was trained with (engine.schedule_changes) unless train.allow_schedule_change is set.
    config.yaml is not written here: the engine writes it (Engine(run_config=cfg)) when training starts, so a
    refused resume leaves the earlier config.yaml as it was and a run that fails before its first step leaves
    no directory holding only a config.
    """
    from tune.checkpoint import Checkpointer, schedule_changes
    from tune.run_lock import lock_run_dir

    run_dir = Path(cfg.output_dir)
    for item in inputs:
        if item and Path(item).resolve() == run_dir.resolve():
            raise ConfigError(f"output_dir={cfg.output_dir} is also an input ({item}); choose a separate output_dir")
    if accelerator.is_main_process and run_dir.is_dir():  # before anything here is read or changed (new: Engine.fit)
        lock_run_dir(run_dir)
    checkpoints = run_dir / "checkpoints"
    has_checkpoints = (checkpoints / "latest").is_file() or any(p.is_dir() for p in checkpoints.glob("step_*"))
    if has_checkpoints and not cfg.train.resume and not getattr(cfg, "overwrite", False):
        raise ConfigError(f"output_dir={cfg.output_dir} holds checkpoints of an earlier run: set train.resume=true to "
                          "continue it, overwrite=true to start afresh, or choose another output_dir")
    latest = Checkpointer(run_dir, keep=1).resume_point(accelerator.num_processes) if cfg.train.resume else None
    if latest is not None:
        schedule_changes(latest, cfg.train, accelerator.num_processes, getattr(cfg, "seed", None))
    if accelerator.is_main_process and has_checkpoints and not cfg.train.resume:
        shutil.rmtree(run_dir / "checkpoints")
    accelerator.wait_for_everyone()
    return run_dir


def sample_text(model, tokenizer, sample_cfg, device, stream=print) -> list[str]:
    """Generate sample_cfg.num_samples continuations of sample_cfg.prompt with the native GPT, streaming text."""
    from tune.generate import TextStreamer

    ids = tokenizer(sample_cfg.prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    samples = []
    for i in range(sample_cfg.num_samples):
        streamer = TextStreamer(tokenizer)
        prompt = torch.tensor([ids], device=device)
        if stream:
            stream(f"--- sample {i + 1} ---\n{sample_cfg.prompt}", end="", flush=True)
        pieces = []
        for token in model.generate(prompt, sample_cfg.max_new_tokens, sample_cfg.temperature, sample_cfg.top_k,
                                    sample_cfg.top_p, eos_token_id=tokenizer.eos_token_id):
            piece = streamer.put(token[0].tolist())
            pieces.append(piece)
            if stream and piece:
                stream(piece, end="", flush=True)
        pieces.append(streamer.end())
        if stream:
            stream(pieces[-1])
        samples.append(sample_cfg.prompt + "".join(pieces))
    return samples

