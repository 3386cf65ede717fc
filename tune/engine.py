"""The one training loop every recipe uses.

A recipe hands the engine a model, a BatchSource and (optionally) a loss function; the engine owns
everything else: Accelerate setup, mixed precision, gradient accumulation with per-token
normalisation, clipping, AdamW + warmup/cosine, torch.compile, periodic evaluation, checkpoints with
exact resume, progress bar, metrics.jsonl + the trackers of train.log_with (TensorBoard by default), sample
completions at every evaluation (samples.jsonl), and report.png.

Checkpoints (tune/checkpoint.py) hold whole tensors, also under FSDP (Accelerate's FSDP2): they are
gathered to rank 0 on save and re-sharded on load, so a checkpoint resumes under any process count.
CPU threads and signal handling live in tune/runtime.py, metrics.jsonl and report.png in tune/report.py.

Data is addressed by step: `source.step_batches(step, rank, world)` returns the micro-batches one rank
trains on at that optimizer step. Sources are pure functions of (seed, step), so resuming needs only
the step number, and a run on N processes sees the same global batch as a run on one.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.nn as nn

from tune.checkpoint import (  # noqa: F401 - re-exported: recipes, tests and tools import them from here
    SCHEDULE_KEYS, Checkpointer, _fsync_dir, _load_plain, checkpoint_tensor_shape, fault_point,
    find_checkpoint, is_sharded, read_checkpoint_weights, rng_state, schedule_changes, schedule_settings,
    trainable_names, trainable_state, trained_schedule)
from tune.errors import ConfigError, TuneError
from tune.losses import IGNORE_INDEX, causal_lm_loss, liger_loss_fn
from tune.report import MetricsLog  # noqa: F401 - re-exported
from tune.run_lock import check_run_dir_shared, lock_run_dir
from tune.runtime import (  # noqa: F401 - re-exported
    STOP_SIGNALS, Interrupted, SignalHold, StopAtStepBoundary, apply_num_threads, busy_fraction, choose_num_threads,
    deferred_signals, restore_handlers, stop_on_signals, usable_cores)
from tune.train_config import TrainConfig  # noqa: F401 - re-exported


class BatchSource(Protocol):
    def step_batches(self, step: int, rank: int, world: int) -> list[dict]:
        """Micro-batches (dicts of tensors with input_ids and targets) for optimizer step `step` (1-based)."""

    def val_batches(self, rank: int, world: int, limit: int) -> Iterable[dict]:
        """A fixed set of validation batches."""


# loss_fn(model, batch) -> (summed loss, number of target tokens[, {name: summed extra metric}]); the engine
# divides sums by the step's target count, and logs extras (e.g. the KL and CE parts of a distillation loss)
LossFn = Callable[[nn.Module, dict], tuple]


class TrainingModule(nn.Module):
    """Model + loss in one forward, so DDP/FSDP/compile see the whole computation."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        # the layer classes FSDP's transformer-based auto-wrap shards one by one (HF models, peft or not, and ours)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._no_split_modules = list(getattr(inner, "_no_split_modules", None) or [])

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)

    def tie_weights(self):
        """Re-tie the model's shared weights (Accelerate calls this after FSDP's meta-device loading)."""
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()


def compile_blocks(model: nn.Module) -> int:
    """Regional compilation: `block.compile()` on every transformer block (the classes named in the model's
    `_no_split_modules`: our GPT's `Block`, an HF model's decoder layer, also inside a peft wrapper), as torchtune
    and litgpt do. Blocks of one class share their compiled code, so compiling costs one block's graph rather
    than the whole model's, and embeddings, head and loss stay eager. Works under gradient checkpointing (HF's
    checkpointing wraps the compiled call).

    Shapes: torch's automatic dynamic shapes. A fixed width (pretraining windows) compiles once, statically;
    packed fine-tuning batches, whose width changes per step, recompile once at the first change and from then
    on run one graph with a symbolic width. Measured over 8 steps of 8 widths (HF GPT-2, CPU inductor): automatic,
    2 compiles then none, no padding; widths padded to a multiple of 64, the same 2 compiles (the second bucket
    turns the width dynamic all the same) plus the padding; `dynamic=True`, 1 compile, but every dimension
    symbolic, fixed-width pretraining and the batch size included; mark_dynamic on the block's input, refused
    (dynamo may not trace it inside the compiled block's pre-forward hook, and the block input is made in eager
    code in between).

    Returns the number of blocks compiled. Raises ConfigError when the model names no block class."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    # by class name along the MRO: FSDP2's fully_shard turns a Block into an FSDPBlock subclass
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise ConfigError(f"train.compile: {type(inner).__name__} names no transformer block class "
                          "(_no_split_modules) to compile; set train.compile=false")
    for block in blocks:
        block.compile()
    return len(blocks)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of cfg.lr after `n` scheduler steps: linear warmup, then cosine/linear decay to min_lr."""
    floor = cfg.min_lr / cfg.lr

    def factor(n: int) -> float:
        step = n + 1  # the multiplier used for optimizer step `step`
        if step <= cfg.warmup_steps:
            return step / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool, lr: float | None = None,
                 loraplus_lr_ratio: float | None = None) -> list[dict]:
    """AdamW groups: decay on trainable matrices; none on biases, norm gains or (by default) embeddings. With
    `loraplus_lr_ratio` (LoRA+, Hayou et al. 2024) peft's LoRA B matrices (lora_B, lora_embedding_B) form a third
    group at lr x ratio, with weight decay (the first group keeps lr: it is the one logged)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, lora_b = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if loraplus_lr_ratio is not None and (".lora_B." in name or ".lora_embedding_B." in name):
            lora_b.append(p)
            continue
        is_matrix = p.ndim >= 2 and (decay_embeddings or id(p) not in embedding_ids)
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if loraplus_lr_ratio is not None:
        if not lora_b:
            raise ConfigError("train.loraplus_lr_ratio is set but the model has no trainable LoRA B matrices; use it "
                              "with method lora or qlora (or set it to null)")
        groups.append({"params": lora_b, "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio})
    return groups


PAGED_OPTIMIZERS = ("paged_adamw", "paged_adamw_8bit")


def check_train_device(cfg: TrainConfig, device) -> None:
    """ConfigError for train settings the training `device` cannot run (a paged optimizer or train.ce_kernel=liger
    off CUDA, liger not installed). Recipes call it right after make_accelerator, before they write anything into
    the output directory; the Engine calls it too, for direct users. `device` is read only when one of those
    settings is chosen (it may then be a callable returning it)."""
    if cfg.optimizer not in PAGED_OPTIMIZERS and cfg.ce_kernel != "liger":
        return
    device = torch.device(device() if callable(device) else device)
    if cfg.optimizer in PAGED_OPTIMIZERS and device.type != "cuda":
        raise ConfigError(f"train.optimizer={cfg.optimizer} pages optimizer states between GPU and CPU memory and "
                          f"needs a CUDA GPU (this run is on {device.type}); use train.optimizer=adamw or adamw_8bit")
    if cfg.ce_kernel == "liger":
        liger_loss_fn(device)  # raises the one-line error when it cannot run here


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names, over param_groups(model) with cfg's lr, betas, eps and weight decay:
    adamw is torch's fused AdamW (CPU and CUDA; ~6% of a small CPU step over the unfused one); adamw_8bit,
    paged_adamw and paged_adamw_8bit are bitsandbytes' AdamW8bit, PagedAdamW and PagedAdamW8bit (8-bit states
    quantized blockwise: ~2 bytes per parameter instead of 8; tensors under 4096 elements keep 32-bit states).
    Paged ones need CUDA: check_train_device refuses them elsewhere (bitsandbytes 0.50 silently runs them unpaged
    on CPU, which would only mislead)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings, cfg.lr, cfg.loraplus_lr_ratio)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[cfg.optimizer]
    return cls(groups, **kwargs)


def offload_activations(device: torch.device):
    """train.activation_offload: a context under which the tensors autograd saves for the backward pass (the
    activations) are moved to CPU memory as the forward makes them, pinned, with asynchronous copies, and
    brought back when the backward needs them (torch.autograd.graph.save_on_cpu): GPU memory for activations
    drops to about one layer's worth, for one host<->device copy of each. On a CPU device it is a no-op (the
    tensors are in CPU memory already; the hooks run and move nothing). With gradient checkpointing, only the
    checkpointed layers' inputs are saved (the checkpoint recomputes the rest), and those go to the CPU."""
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.device(device).type == "cuda")


def make_accelerator(mixed_precision: str, num_threads: int | None = None):
    """The run's Accelerator; with `num_threads` (train.num_threads, 0 = auto) also this process's intra-op
    CPU threads, announced in one line by the main process (see apply_num_threads)."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    if num_threads is not None:
        apply_num_threads(num_threads, log=print if accelerator.is_main_process else None)
    return accelerator


@dataclass
class FitResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    run_dir: Path
    history: list[dict]
    model: nn.Module | None = None  # the trained model, unsharded (under FSDP: on rank 0 only, None elsewhere)


class Engine:
    """Trains `model` on `source` into `run_dir`. One instance per run."""

    def __init__(self, cfg: TrainConfig, run_dir, model: nn.Module, source: BatchSource, loss_fn: LossFn | None = None,
                 accelerator=None, log: Callable[[str], None] = print, rebuild: Callable[[], nn.Module] | None = None,
                 run_config=None, samples: Callable[[nn.Module], list[dict]] | None = None):
        """`rebuild()` makes a fresh, unsharded copy of the model (same structure and frozen weights): under
        FSDP, the trained model handed back in FitResult.model is that copy with the trained weights.
        `run_config`: the recipe's whole config, saved as run_dir/config.yaml once training starts (after the
        resume checks), so a run that fails before its first step leaves no config.yaml; its `seed` (if any)
        is one of the schedule settings a resume must keep. `loss_fn` None: next-token cross-entropy computed as
        train.ce_kernel says (tune.losses: causal_lm_loss, or liger_loss_fn for liger). `samples(model)`: a few
        completions [{"prompt", "reference", "prediction"}] of the model as it stands, made at every evaluation on
        the main process (under FSDP from the unsharded copy `rebuild` makes) and written to samples.jsonl and the
        trackers."""
        self.cfg, self.run_dir, self.model, self.source, self.rebuild = cfg, Path(run_dir), model, source, rebuild
        self.samples = samples
        self.run_config, self.seed = run_config, getattr(run_config, "seed", None)
        self.accelerator = accelerator or make_accelerator(cfg.mixed_precision, cfg.num_threads)
        self.log_line = log if self.accelerator.is_main_process else (lambda s: None)
        check_train_device(cfg, lambda: self.accelerator.device)  # (test stand-ins for the accelerator have no device)
        if loss_fn is None:  # next-token cross-entropy, computed as train.ce_kernel says
            loss_fn = liger_loss_fn(self.accelerator.device) if cfg.ce_kernel == "liger" else causal_lm_loss
        self.module = TrainingModule(model, loss_fn)
        self.optimizer = make_optimizer(cfg, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.checkpointer = Checkpointer(self.run_dir, cfg.keep_checkpoints)
        self.skipped_steps = self.skipped_in_a_row = 0
        self._step_lr = math.nan
        self._signals = SignalHold()
        # the checkpoint at the last step (always written by recipes); benchmarks turn it off so a 1.1B model's
        # weights + optimizer state + their hashing do not count against a time cap
        self.save_at_end = True
        self._eval_step = 0
        # Steps between host reads of the step results (loss sums, target counts, gradient norm). 1: read every
        # step, as a CPU device costs nothing to sync. More (CUDA, torch's fused AdamW, set in fit): the results
        # stay on the device, non-finite steps are skipped there (_deferred_update), and they are read at every
        # log row, evaluation, checkpoint and the end, and every `read_every` steps. A test may set it on CPU.
        self.read_every: int | None = None
        self.prefetch = True  # prepare the next step's batches in a background thread during this step
        # turns the validation extras (per-example or per-token means) into the metrics logged and printed with
        # val_loss, e.g. macro-F1 from per-class counts (tune.task_heads.val_metrics); None: the extras as they are
        self.val_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
        self._pending: list[tuple] = []  # deferred mode: (step, sums, targets, grad_norm) on device, not yet read
        self._device_stop = self._device_run = None  # deferred mode: see _deferred_update
        self._executor = self._next_batches = None

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, module) -> tuple[float, dict[str, float]]:
        """Mean per-token validation loss (and extras) over the source's fixed validation batches (all ranks)."""
        acc = self.accelerator
        module.eval()
        sums: dict[str, torch.Tensor] = {}
        n_tokens = torch.zeros((), device=acc.device, dtype=torch.float64)
        batches = list(self.source.val_batches(acc.process_index, acc.num_processes, self.cfg.eval_batches))
        n_forward = len(batches)
        if is_sharded(self.model):  # every FSDP forward is a collective: all ranks must run as many
            n_forward = int(acc.gather(torch.tensor([n_forward], device=acc.device)).max())
        for i in range(n_forward):
            batch = batches[i] if i < len(batches) else self.source.step_batches(1, acc.process_index, acc.num_processes)[0]
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                out = module(batch)
            if i >= len(batches):
                continue  # a filler forward that keeps this rank in step with the others; not counted
            for name, value in _named_sums(out).items():
                sums[name] = sums.get(name, 0) + value.detach().double()
            fault_point("eval", self._eval_step)
            n_tokens += out[1].double()
        module.train()
        n_tokens = acc.reduce(n_tokens, "sum").clamp(min=1)
        names = {"loss", *sums}
        if acc.num_processes > 1:  # a rank may have had no validation batch: agree on the names to reduce
            from accelerate.utils import gather_object

            names = set().union(*gather_object([sorted(names)]))
        zero = torch.zeros((), device=acc.device, dtype=torch.float64)
        means = {name: (acc.reduce(sums.get(name, zero), "sum") / n_tokens).item() for name in sorted(names)}
        return means.pop("loss"), means

    # -- training -------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg, acc = self.cfg, self.accelerator
        start_time = time.time()
        self._check_distributed_setup()
        if cfg.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            from tune.hf import enable_activation_checkpointing

            enable_activation_checkpointing(self.model)
        if cfg.compile:  # before FSDP/DDP wrap the model, as torchtune does
            n = compile_blocks(self.model)
            self.log_line(f"train.compile: {n} transformer blocks compiled one by one (torch.compile, dynamic shapes "
                          "after the first change of sequence width)")
        module, optimizer = acc.prepare(self.module, self.optimizer)
        if is_sharded(self.model):
            self.log_line(f"FSDP: parameters sharded over {acc.num_processes} processes")
        if self.read_every is None:
            fused = cfg.optimizer == "adamw" and acc.mixed_precision != "fp16" and not is_sharded(self.model)
            self.read_every = cfg.log_every if acc.device.type == "cuda" and fused else 1
        if self.prefetch:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tune-batches")
        if cfg.activation_offload and acc.device.type != "cuda":
            self.log_line(f"train.activation_offload: the activations already live in CPU memory on {acc.device.type}, "
                          "so offloading them changes nothing here")

        step, elapsed_before = 0, 0.0
        # what checkpoints carry besides the step: the running token count, the log window not yet logged, and
        # the best validation loss so far, so a resumed run logs and keeps exactly what an uninterrupted one does
        self.counters = {"tokens": 0, "log_window": _empty_window(), "best_val_loss": None, "best_step": None}
        if acc.is_main_process:  # before anything in run_dir is read or written: one writer per run directory
            lock_run_dir(self.run_dir)
            for stale in self.checkpointer.remove_stale_temp():
                self.log_line(f"removed {stale.name}, left in {self.checkpointer.dir} by an interrupted save")
        acc.wait_for_everyone()
        if acc.num_processes > 1:  # several nodes: each must see this run_dir, not a same-named one of its own
            check_run_dir_shared(acc, self.run_dir)
        latest = self.checkpointer.resume_point(acc.num_processes, self.log_line) if cfg.resume else None
        if cfg.resume and latest is None:
            self.log_line(f"resume=true but no checkpoint in {self.checkpointer.dir}; starting from step 0")
        if latest is not None:
            changes = schedule_changes(latest, cfg, acc.num_processes, self.seed)  # raises unless allowed
            state = Checkpointer.load(latest, acc, self.model, self.optimizer, self.scheduler)
            step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
            self.counters.update({k: state[k] for k in self.counters if k in state})
            self.log_line(f"resumed from {latest} at step {step}")
            if acc.is_main_process:
                for moved in self.checkpointer.supersede_after(latest):
                    self.log_line(f"checkpoint {moved.name.rsplit('-', 2)[0]} belongs to the history replaced by this "
                                  f"resume: moved to {moved.relative_to(self.run_dir)}")
            acc.wait_for_everyone()
            if changes:
                self._restart_schedule()
                self.log_line(f"train.allow_schedule_change=true: the schedule changes from step {step + 1}: "
                              + ", ".join(changes))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.run_config is not None and acc.is_main_process:
            from tune.config import save_config

            save_config(self.run_config, self.run_dir / "config.yaml")
        metrics = MetricsLog(self.run_dir, acc.is_main_process, resume_step=step, log_with=cfg.log_with,
                             config=self.run_config)
        for moved in (metrics.superseded, metrics.samples_superseded):
            if moved is not None:
                self.log_line(f"{moved.name.split('.superseded')[0]} rows after step {step} moved to {moved.name}")
        history = [r for r in metrics.rows()] if step else []
        if latest is not None and "tokens" not in state:  # a checkpoint from before state.json kept the count
            self.counters["tokens"] = next((r["tokens"] for r in reversed(history) if "tokens" in r), 0)

        progress = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file would get every redraw)
            progress = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
        module.train()
        last_loss = last_val = None
        # no validation examples (e.g. data.heldout_fraction=0): no val_loss at all, not the 0.0 of an empty mean,
        # which keep_best would keep and stop_at_val_loss would stop on
        validates = next(iter(self.source.val_batches(0, 1, 1)), None) is not None
        if not validates:
            self.log_line("no validation examples: val_loss is not measured (hold some rows or instances out to "
                          "measure it)")
        speed_tokens, speed_start, bar = 0, time.time(), {}
        step_start_rng = None

        def read_pending():  # deferred mode: the steps' results, read from the device at once
            if self._pending:
                last = self._read_pending()
                if progress is not None:
                    bar["loss"] = f"{last:.4f}"

        def log_window():
            nonlocal speed_tokens, speed_start, last_loss
            read_pending()
            window, now = self.counters["log_window"], time.time()
            means = {k: v / max(window["targets"], 1.0) if window["steps"] else math.nan
                     for k, v in window["sums"].items()}
            last_loss = means.pop("loss", math.nan)
            tok_s = speed_tokens * acc.num_processes / max(now - speed_start, 1e-9)
            row = {"step": step, "loss": last_loss, **means, "lr": self._step_lr,
                   "grad_norm": window["grad_norm"] / window["steps"] if window["steps"] else math.nan,
                   "tokens": self.counters["tokens"], "tokens_per_s": tok_s,
                   "elapsed_s": elapsed_before + now - start_time}
            metrics.log(row)
            history.append(row)
            self.counters["log_window"] = _empty_window()
            speed_tokens, speed_start = 0, time.time()
            bar["tok_s"] = f"{tok_s:,.0f}"

        # several processes: signals stop them together at a step boundary; one: SIGTERM/SIGUSR1 raise at once
        stop = StopAtStepBoundary() if acc.num_processes > 1 else None
        previous_handlers = stop_on_signals() if stop is None else {}
        try:
            while step < cfg.max_steps:
                if stop is not None:
                    stop.raise_if_requested(acc)  # on every rank at once: they save the same step together
                step_start_rng = rng_state()  # what a Ctrl-C inside this step saves: the state after the last one
                sums, targets, tokens, grad_norm, skipped = self._train_step(module, optimizer, step + 1)
                counters = {**self.counters, "tokens": self.counters["tokens"] + tokens * acc.num_processes}
                pending = self._pending
                if skipped is None:  # deferred: the results stay on the device until read_pending
                    pending = [*pending, (step + 1, sums, targets, grad_norm)]
                else:
                    counters["log_window"] = _add_to_window(counters["log_window"], sums, targets, grad_norm, skipped)
                # one assignment: a Ctrl-C lands before it (the step is not counted) or after it (it is)
                step, self.counters, self._pending, step_start_rng = step + 1, counters, pending, None
                self._signals.release()  # held since the update began: a signal that came meanwhile is raised here
                speed_tokens += tokens
                if step % self.read_every == 0:
                    read_pending()
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    log_window()
                if progress is not None:  # this step's loss; metrics.jsonl has the log_every window's mean
                    if skipped is not None:
                        bar["loss"] = f"{sums['loss'] / max(targets, 1.0):.4f}"
                    progress.set_postfix(bar, refresh=False)
                is_last, is_best = step == cfg.max_steps, False
                if validates and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last):
                    read_pending()
                    self._eval_step = step
                    last_val, val_extras = self.evaluate(module)
                    shown = ""
                    if self.val_metrics is not None:
                        val_extras = self.val_metrics(val_extras)
                        shown = "".join(f", {k} {v:.4f}" for k, v in val_extras.items())
                    row = {"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50.0)),
                           **{f"val_{k}": v for k, v in val_extras.items()},
                           "elapsed_s": elapsed_before + time.time() - start_time}
                    metrics.log(row)
                    history.append(row)
                    # a perplexity means nothing for a loss that is not a per-token cross-entropy (val_metrics' users)
                    ppl = f" (ppl {row['val_ppl']:.2f})" if self.val_metrics is None else ""
                    self.log_line(f"step {step}: val_loss {last_val:.4f}{ppl}{shown}")
                    if self.samples is not None:
                        self._log_samples(step, metrics)
                    best_so_far = self.counters["best_val_loss"]
                    if cfg.keep_best and math.isfinite(last_val) and (best_so_far is None or last_val < best_so_far):
                        is_best = True
                        self.counters = {**self.counters, "best_val_loss": last_val, "best_step": step}
                    if cfg.stop_at_val_loss is not None and last_val <= cfg.stop_at_val_loss and not is_last:
                        self.log_line(f"val_loss {last_val:.4f} <= stop_at_val_loss {cfg.stop_at_val_loss}: stopping")
                        is_last = True
                        if self.counters["log_window"]["steps"]:
                            log_window()
                    self._write_report(history)
                if (cfg.save_every and step % cfg.save_every == 0) or (is_last and self.save_at_end) or is_best:
                    read_pending()
                    self._save(step, elapsed_before + time.time() - start_time, best=is_best)
                if progress is not None:
                    progress.update(1)
                if is_last:
                    break
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGUSR1 (a preemption notice) as Interrupted
            self._signals.release(deliver=False)
            if stop is not None:
                stop.restore()
            if progress is not None:  # the bar's line ends before the message (it would glue onto it)
                progress.close()
                progress = None
            name = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
            with deferred_signals(deliver=False):  # more signals while saving: we are stopping anyway
                read_pending()
                self._save(step, elapsed_before + time.time() - start_time, rng=step_start_rng)
                self._write_report(history)
            self.log_line(("interrupted" if name == "SIGINT" else f"received {name}") + f" at step {step}: " + (
                f"saved checkpoint step_{step:07d}; train.resume=true continues" if step else
                "no step had finished, nothing to save"))
            e.reported = True  # tune.cli.main prints no second line
            raise
        except torch.OutOfMemoryError:
            raise TuneError(out_of_memory_advice(cfg, step + 1)) from None
        finally:
            self._signals.release(deliver=False)  # first: it restores the handlers below it
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._next_batches = None
            if stop is not None:
                stop.restore()
            restore_handlers(previous_handlers)
            if progress is not None:
                progress.close()
            metrics.close()
        self._write_report(history)
        return FitResult(step, last_loss, last_val, self.run_dir, history, self._unsharded_model())

    def _log_samples(self, step: int, metrics: MetricsLog):
        """The samples callable's completions at `step`, to samples.jsonl and the trackers. Generated on the main
        process from the model itself (the other processes go on to the next step's collectives and wait there);
        under FSDP from an unsharded copy (`_unsharded_model`: every rank takes part in gathering the weights),
        since generating with the sharded model would need every rank to run the same number of forwards. The
        random number generators are left as they were (building a model draws initial weights from them), so
        samples change nothing of the training that follows."""
        cuda = [torch.cuda.current_device()] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            model = self._unsharded_model()
            if self.accelerator.is_main_process:
                metrics.log_samples(step, self.samples(model))

    def _write_report(self, rows: list[dict]):
        """report.png from the rows so far (main process only)."""
        if self.accelerator.is_main_process:
            from tune.report import write_report

            write_report(rows, self.run_dir / "report.png")

    def _restart_schedule(self):
        """After loading a checkpoint whose schedule differs (train.allow_schedule_change): follow this config's
        lr and schedule from the checkpoint's step on (the loaded scheduler state holds the old base lr)."""
        factor = lr_lambda(self.cfg)(self.scheduler.last_epoch)
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = self.cfg.lr, self.cfg.lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _check_distributed_setup(self):
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type != DistributedType.FSDP:
            return
        if acc.state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError("FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config "
                              "(recipes/accelerate/fsdp.yaml)")
        if self.rebuild is None:
            raise ConfigError("this recipe cannot run under FSDP (it gives the engine no way to rebuild the model "
                              "unsharded at the end); use DDP (recipes/accelerate/ddp.yaml)")

    def _unsharded_model(self) -> nn.Module | None:
        """The trained model as a plain module: the model itself, or under FSDP (on rank 0) a rebuilt copy
        carrying the gathered trained weights."""
        if not is_sharded(self.model):
            return self.model
        weights = trainable_state(self.model)  # a collective: every rank takes part
        if not self.accelerator.is_main_process:
            return None
        plain = self.rebuild()
        missing = set(trainable_names(plain)) - set(weights)
        if missing:
            raise TuneError(f"rebuilding the model after FSDP training: no trained weights for {sorted(missing)[:3]}")
        plain.load_state_dict(weights, strict=False)
        return plain

    def _checkpoint_status(self) -> str:
        """What the run has to continue from, for a stop message: the latest checkpoint (with a warning when its
        weights are already huge) or that none was saved yet."""
        latest = self.checkpointer.latest()
        if latest is None:
            return f"no checkpoint was saved yet in {self.checkpointer.dir}"
        from safetensors import safe_open

        with safe_open(latest / "model.safetensors", "pt") as f:
            largest = max((float(f.get_tensor(k).abs().max()) for k in f.keys()), default=0.0)
        diverged = (f", but its weights reach max |w| = {largest:.3g}, so they may already have diverged"
                    if not largest < DIVERGED_WEIGHT else "")
        return f"the latest checkpoint is {latest.name} in {self.checkpointer.dir}{diverged}"

    def _save(self, step: int, elapsed: float, rng: dict | None = None, best: bool = False):
        if step == 0:
            return
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters() if p.requires_grad]
        finite = all(bool(torch.isfinite(p.detach()).all()) for p in local)  # under FSDP: this rank's shards
        bad = self.accelerator.reduce(torch.tensor(float(not finite), device=self.accelerator.device), "sum")
        if bad.item() > 0:
            raise TuneError(f"step {step}: the weights are not finite (NaN or Inf), so no checkpoint is saved; "
                            f"{self._checkpoint_status()} (try a lower train.lr or train.grad_clip)")
        world = self.accelerator.num_processes
        state = {"step": step, "elapsed_s": elapsed, "world_size": world,
                 "schedule": schedule_settings(self.cfg, world, self.seed), **self.counters}
        self.checkpointer.save(self.accelerator, self.model, self.optimizer, self.scheduler, state, rng, best=best)

    def _step_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of `step`, in CPU memory (pinned when training on CUDA, so the copy to the
        device is asynchronous): prepared by the background thread during the previous step when prefetching
        (the source is a pure function of the step, so this changes no result), else now. An exception the
        source raised for `step` is raised here, at that step, either way."""
        cfg = self.cfg
        if self._next_batches is not None and self._next_batches[0] == step:
            batches = self._next_batches[1].result()
        else:
            batches = self._load_batches(step)
        self._next_batches = None
        if self._executor is not None and step < cfg.max_steps:
            self._next_batches = (step + 1, self._executor.submit(self._load_batches, step + 1))
        return batches

    def _load_batches(self, step: int) -> list[dict]:
        acc = self.accelerator
        batches = self.source.step_batches(step, acc.process_index, acc.num_processes)
        if acc.device.type == "cuda":
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return batches

    def _train_step(self, module, optimizer, step: int) -> tuple[dict, float, int, float, bool | None]:
        """One optimizer step. Returns the step's summed loss and extras over all ranks ({name: sum}, "loss"
        included), its target-token count over all ranks, this rank's input tokens, the gradient norm, and
        whether the update was skipped (a non-finite loss or gradient with train.skip_nonfinite_steps).

        With read_every > 1 (deferred reads) the sums, count and norm are device tensors and `skipped` is None:
        nothing here waits for the device; _read_pending checks them later."""
        cfg, acc = self.cfg, self.accelerator
        cpu_batches = self._step_batches(step)
        # counted on the CPU copies, before the host->device copy: no device sync
        local_targets = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in cpu_batches)
        input_tokens = sum(_input_tokens(b) for b in cpu_batches)
        batches = [{k: v.to(acc.device, non_blocking=True) for k, v in b.items()} for b in cpu_batches]
        deferred = self.read_every > 1
        # Per-token normalisation over the whole step (all micro-batches, all ranks): every target
        # token weighs the same however the tokens fall across micro-batches.
        if acc.num_processes == 1:
            global_targets = float(local_targets)
        else:
            # torch.full launches a fill kernel; torch.tensor(value, device=cuda) would copy from pageable host memory,
            # which waits for the kernels already queued (a sync per step under DDP)
            global_targets = acc.reduce(torch.full((), float(local_targets), device=acc.device), "sum")
            global_targets = global_targets if deferred else global_targets.item()
        divisor = global_targets.clamp(min=1.0) if torch.is_tensor(global_targets) else max(global_targets, 1.0)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            ctx = acc.no_sync(module) if not sync else contextlib.nullcontext()
            offload = offload_activations(acc.device) if cfg.activation_offload else contextlib.nullcontext()
            with ctx, offload, acc.autocast():
                out = module(batch)
                # DDP averages gradients over ranks, so scale back up by the world size
                loss = out[0] * acc.num_processes / divisor
            acc.backward(loss)
            fault_point("step", step)
            for name, value in _named_sums(out).items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        # the norm is always measured (an infinite max_norm clips nothing) so bad gradients are caught before the update
        grad_norm = acc.clip_grad_norm_(module.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        # from here until fit() counts the step, signals wait: the update (one parameter group after another, or
        # bitsandbytes' loop over parameters) and the step count change together, so an interrupt saves either the
        # weights before this step under the previous number, or those after it under this one
        self._signals.hold()
        if deferred:
            sums = {name: acc.reduce(value, "sum") for name, value in sums.items()}
            self._deferred_update(optimizer, sums["loss"], grad_norm)
            skipped = None
        else:
            grad_norm = float(grad_norm)
            sums = {name: acc.reduce(value, "sum").item() for name, value in sums.items()}
            skipped = not self._check_finite(step, sums["loss"] / max(global_targets, 1.0), grad_norm)
            if not skipped:
                optimizer.step()
        self._step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used, for its metrics row
        self.scheduler.step()  # the schedule follows the step count either way, so a resumed run stays aligned
        optimizer.zero_grad(set_to_none=True)
        return sums, global_targets, input_tokens, grad_norm, skipped

    def _check_finite(self, step: int, loss_avg: float, grad_norm: float) -> bool:
        """Whether step `step` may update the weights. A non-finite loss or gradient norm raises TuneError, or with
        train.skip_nonfinite_steps counts a skipped step (raising after train.max_skipped_steps in a row)."""
        cfg = self.cfg
        if math.isfinite(loss_avg) and math.isfinite(grad_norm):
            self.skipped_in_a_row = 0
            return True
        what = f"loss {loss_avg}" if not math.isfinite(loss_avg) else f"gradient norm {grad_norm}"
        if not cfg.skip_nonfinite_steps:
            raise TuneError(f"{what} at step {step}; the weights were not updated; {self._checkpoint_status()} "
                            "(try a lower train.lr or train.grad_clip, or train.skip_nonfinite_steps=true to "
                            "skip such batches)")
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        self.log_line(f"step {step}: {what}; batch skipped (no update), {self.skipped_steps} skipped so far")
        if self.skipped_in_a_row >= cfg.max_skipped_steps:
            raise TuneError(f"{what} at step {step}: {self.skipped_in_a_row} steps in a row skipped "
                            f"(train.max_skipped_steps={cfg.max_skipped_steps}), stopping; "
                            f"{self._checkpoint_status()} (try a lower train.lr or train.grad_clip)")
        return False

    def _deferred_update(self, optimizer, loss_sum: torch.Tensor, grad_norm: torch.Tensor):
        """optimizer.step() that skips a non-finite step's update on the device, without reading anything: torch's
        fused AdamW takes a `found_inf` tensor (as GradScaler sets it) and leaves the weights and its state
        untouched when it is nonzero. The update is also skipped for every step after one that _read_pending will
        stop the run at (a non-finite step without train.skip_nonfinite_steps, or the max_skipped_steps-th in a
        row), so the run stops with the weights of the step before, as when every step is checked at once."""
        bad = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
        if self._device_stop is None:
            self._device_stop = torch.zeros((), device=bad.device)
            self._device_run = torch.full((), float(self.skipped_in_a_row), device=bad.device)
        if self.cfg.skip_nonfinite_steps:
            self._device_run = (self._device_run + 1) * bad
            stops = (self._device_run >= self.cfg.max_skipped_steps).float()
        else:
            stops = bad
        inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate: its wrapped torch optimizer
        inner.found_inf = torch.maximum(bad, self._device_stop)
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        self._device_stop = torch.maximum(self._device_stop, stops)

    def _read_pending(self) -> float:
        """Deferred mode: read the pending steps' results from the device (one sync) and account for each in
        order exactly as a per-step read does (_check_finite, then the log window). Returns the last step's
        mean loss (for the progress bar)."""
        pending, window, last = self._pending, self.counters["log_window"], math.nan
        values = torch.stack([torch.stack([*(v.double() for v in sums.values()),
                                           torch.as_tensor(targets, dtype=torch.float64, device=grad_norm.device),
                                           grad_norm.double()]) for _, sums, targets, grad_norm in pending]).cpu()
        with deferred_signals():  # the window and the pending list change together
            for (step, sums, _, _), row in zip(pending, values.tolist()):
                # float32 values widened exactly to float64: what .item() gives for each step
                named, targets, grad_norm = dict(zip(sums, row[:-2])), row[-2], row[-1]
                last = named["loss"] / max(targets, 1.0)
                skipped = not self._check_finite(step, last, grad_norm)
                window = _add_to_window(window, named, targets, grad_norm, skipped)
            self.counters = {**self.counters, "log_window": window}
            self._pending = []
            self._device_stop = self._device_run = None
        return last


DIVERGED_WEIGHT = 1e4  # a checkpoint whose largest |weight| reaches this is called possibly diverged


def out_of_memory_advice(cfg: TrainConfig, step: int) -> str:
    """What to try, for this run's settings, when the device runs out of memory."""
    tips = []
    if cfg.micro_batch_size > 1:
        tips.append(f"train.micro_batch_size={max(1, cfg.micro_batch_size // 2)} "
                    f"train.grad_accum_steps={cfg.grad_accum_steps * 2} (same global batch)")
    if not cfg.gradient_checkpointing:
        tips.append("train.gradient_checkpointing=true")
    tips += ["method=qlora (fine-tuning) or a 4-bit teacher (teacher.quant=4bit)", "a shorter data.max_length / block_size"]
    return (f"out of memory at step {step} with train.micro_batch_size={cfg.micro_batch_size}; the last checkpoint is "
            "kept (train.resume=true continues from it). Try: " + "; ".join(tips))


def _empty_window() -> dict:
    """The sums behind one metrics row: loss and extras summed over the window's steps (all ranks), their
    target tokens, the summed gradient norm and the number of steps (updates skipped as non-finite excluded)."""
    return {"sums": {}, "targets": 0.0, "grad_norm": 0.0, "steps": 0}


def _add_to_window(window: dict, sums: dict[str, float], targets: float, grad_norm: float, skipped: bool) -> dict:
    if skipped:
        return window
    total = dict(window["sums"])
    for name, value in sums.items():
        total[name] = total.get(name, 0.0) + value
    return {"sums": total, "targets": window["targets"] + targets, "grad_norm": window["grad_norm"] + grad_norm,
            "steps": window["steps"] + 1}


def _named_sums(out) -> dict[str, torch.Tensor]:
    """The summed loss and any extra sums a loss function returned, by name."""
    return {"loss": out[0], **(out[2] if len(out) > 2 else {})}


def _input_tokens(batch: dict) -> int:
    """Tokens fed to the model, right-padding excluded (a 2D attention mask); packed rows count in full."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()
