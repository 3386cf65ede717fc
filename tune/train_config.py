"""The config sections shared by recipes: training loop, LoRA, 4-bit quantization.

Plain dataclasses without torch, so `tune validate` can check a config in a second (tune/engine.py
and tune/adapters.py re-export them).
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from tune.config import check_ranges, range_problems
from tune.errors import ConfigError, ConfigProblems
from tune.trackers import missing_tracker_problems, unknown_tracker_problems


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1  # applied to matrices only (never biases, norms; embeddings see below)
    decay_embeddings: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    eval_every: int = 250  # 0 disables periodic evaluation (the final one still runs)
    eval_batches: int = 20
    stop_at_val_loss: float | None = None  # end the run once validation loss is at or below this
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it
    compile: bool = False  # torch.compile each transformer block (regional compilation; tune.engine.compile_blocks)
    # adamw: torch's fused AdamW; adamw_8bit / paged_adamw / paged_adamw_8bit: bitsandbytes' AdamW8bit / PagedAdamW /
    # PagedAdamW8bit (8-bit optimizer states; paged: states in CUDA unified memory, so a GPU only)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    activation_offload: bool = False  # keep the activations saved for backward in (pinned) CPU memory (CUDA only)
    resume: bool = False
    gradient_checkpointing: bool = False
    skip_nonfinite_steps: bool = False  # on a NaN/Inf loss or gradient: skip that update instead of stopping
    max_skipped_steps: int = 10  # with skip_nonfinite_steps: stop after this many skipped steps in a row
    progress: bool = True
    keep_best: bool = False  # also keep the checkpoint of the lowest validation loss (checkpoints/best names it)
    allow_schedule_change: bool = False  # let a resume change the schedule / data order (tune.checkpoint.SCHEDULE_KEYS)
    num_threads: int = 0  # intra-op CPU threads per process; 0: auto (see tune.runtime.choose_num_threads)
    ce_kernel: Literal["chunked", "liger"] = "chunked"  # fused chunks (tune.losses), or Liger-Kernel (CUDA only)
    # LoRA+ (Hayou et al. 2024): the LoRA B matrices train at lr x this ratio (16 in the paper), A at lr; null: off
    loraplus_lr_ratio: float | None = None
    # experiment trackers that get metrics.jsonl's scalars and the sample completions (tune.trackers): tensorboard,
    # wandb, mlflow, trackio, aim, comet_ml, clearml, dvclive, swanlab; a name or a list; [] for metrics.jsonl alone
    log_with: str | list[str] = "tensorboard"
    # held-out prompts completed greedily at every evaluation, to samples.jsonl and the trackers (finetune and distill
    # on NI data); 0: off
    num_samples: int = 3

    def __post_init__(self):
        """Every range problem at once (ConfigProblems when several)."""
        rules = {name: ">= 1" for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches",
                                           "keep_checkpoints", "log_every", "max_skipped_steps")}
        rules.update({name: ">= 0" for name in ("warmup_steps", "eval_every", "save_every", "num_threads",
                                                "num_samples")})
        # stop_at_val_loss: a cross-entropy is >= 0, so a negative target would never end the run
        rules.update({"lr": "> 0", "weight_decay": ">= 0", "eps": "> 0", "grad_clip": ">= 0",
                      "stop_at_val_loss": ">= 0", "loraplus_lr_ratio": "> 0"})
        problems = range_problems("train.", self, rules)
        if self.lr > 0 and not 0 <= self.min_lr <= self.lr:
            problems.append(f"train.min_lr must be within [0, train.lr={self.lr}], got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        problems += unknown_tracker_problems(self.log_with)
        if len(problems) > 1:
            raise ConfigProblems(problems)
        if problems:
            raise ConfigError(problems[0])


def schedule_warning(train: TrainConfig) -> str | None:
    """A `warning:` line when the run ends before its warmup does (warmup_steps > max_steps: the lr never reaches
    train.lr and never decays), else None. A warning, not an error: short trial runs (train.max_steps=2) of a
    config whose warmup suits its full length are common and harmless."""
    if train.warmup_steps <= train.max_steps:
        return None
    return (f"warning: train.warmup_steps={train.warmup_steps} is more than train.max_steps={train.max_steps}: "
            f"the run ends during its warmup (the lr reaches {train.max_steps / train.warmup_steps:.0%} of "
            f"train.lr and never decays); lower train.warmup_steps for a full schedule")


def ce_kernel_problem(train: TrainConfig | None) -> str | None:
    """The problem line when train.ce_kernel=liger is chosen but Liger-Kernel is not installed, else None. A check of
    `tune validate` / run start, not of the config itself: a run's saved config.yaml must still load elsewhere."""
    if train is None or train.ce_kernel != "liger" or importlib.util.find_spec("liger_kernel") is not None:
        return None
    return ("train.ce_kernel=liger needs Liger-Kernel, which is not installed: pip install liger-kernel "
            "(or the gpt-tune[liger] extra), or set train.ce_kernel=chunked")


def environment_problems(train: TrainConfig | None) -> list[str]:
    """What keeps `train` from running here (checked by `tune validate` and at run start, not by the config itself):
    train.ce_kernel=liger without Liger-Kernel, trackers of train.log_with that are not installed."""
    if train is None:
        return []
    problem = ce_kernel_problem(train)
    return ([problem] if problem else []) + missing_tracker_problems(train.log_with)


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # every linear layer but the output head
    # 3-D expert weights of an MoE (Mixtral's gate_up_proj / down_proj); all-linear picks them and the router itself
    target_parameters: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False  # DoRA (Liu et al. 2024): a learned magnitude per output feature beside the LoRA direction
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)
    layers_to_transform: list[int] | None = None  # adapt only these decoder layers (0-based); null: every layer
    exclude_modules: list[str] | None = None  # module names left out of target_modules (e.g. of all-linear)
    # the adapter's starting weights: default (A random, B zero: peft's True), gaussian, pissa / pissa_niter_N (the
    # r principal singular directions of each weight, moved out of the base; niter: fast randomized SVD with N
    # iterations), olora (QR), loftq (QLoRA only: the rank-r part of the 4-bit quantization error); LORA_INITS
    init: str = "default"
    rank_pattern: dict[str, int] | None = None  # module name or regex -> its rank instead of r (peft's rank_pattern)
    alpha_pattern: dict[str, float] | None = None  # module name or regex -> its alpha instead of alpha
    # rows of the input embedding trained without the rest of it (peft's trainable tokens; new tokens): token ids,
    # or module name -> token ids
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self):
        check_ranges("lora.", self, {"r": ">= 1", "dropout": "[0, 1)", "alpha": "> 0"})
        if not LORA_INIT.fullmatch(str(self.init)):
            raise ConfigError(f"lora.init={self.init!r} is not one of {', '.join(LORA_INITS)} (or pissa_niter_N, "
                              "N >= 1: PiSSA with a fast randomized SVD)")
        if self.use_dora and self.init != "default" and self.init != "gaussian":
            raise ConfigError(f"lora.use_dora cannot start from lora.init={self.init} (peft sets DoRA's magnitudes "
                              "from the initial weights and does not convert them back to the original base); "
                              "use lora.init=default or gaussian with DoRA")
        for key, kinds in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = getattr(self, key)
            bad = [k for k, v in (pattern or {}).items()
                   if not isinstance(k, str) or not k or isinstance(v, bool) or not isinstance(v, kinds) or not v > 0
                   or not math.isfinite(v)]
            if pattern is not None and (not pattern or bad):
                what = "an integer >= 1" if key == "rank_pattern" else "a number > 0"
                # YAML reads {q_proj:8} (no space after the colon) as the key "q_proj:8" with no value
                hint = ("; YAML needs a space after the colon ({q_proj: 8})"
                        if any(v is None and ":" in str(k) for k, v in pattern.items()) else "")
                raise ConfigError(f"lora.{key} must map module names (or regexes) to {what}, e.g. {{q_proj: 8}}, got "
                                  f"{pattern!r}{hint}")
            for k in pattern or {}:
                try:
                    re.compile(k)
                except re.error as e:
                    raise ConfigError(f"lora.{key}: {k!r} is not a valid regex ({e}); give a module name such as "
                                      "q_proj") from None
        if mutates_base(self) and (self.trainable_token_indices or self.bias != "none"):
            raise ConfigError(f"lora.init={self.init} cannot be combined with lora.trainable_token_indices or "
                              "lora.bias: the adapter converted for the original base keeps only its LoRA matrices "
                              "(peft); use lora.init=default or gaussian for those")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and mutates_base(self):
            raise ConfigError(f"lora.init={self.init} with lora.use_rslora and a rank/alpha pattern cannot be converted "
                              "back to an adapter of the original base (peft refuses it); drop one of them")
        tokens = self.trainable_token_indices
        groups = tokens.values() if isinstance(tokens, dict) else [tokens] if tokens is not None else []
        if any(not isinstance(ids, list) or not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                          for i in ids) for ids in groups) or tokens == {}:
            raise ConfigError(f"lora.trainable_token_indices must list token ids >= 0 (e.g. [50257, 50258]) or map "
                              f"embedding module names to such lists, got {tokens!r}")
        if self.layers_to_transform is not None and (not self.layers_to_transform
                                                     or any(i < 0 for i in self.layers_to_transform)):
            raise ConfigError(f"lora.layers_to_transform must list layer indices >= 0 (or be null for every layer), "
                              f"got {self.layers_to_transform}")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError(f"lora.layers_to_transform needs lora.target_modules as a list of module names (e.g. "
                              f"[q_proj, v_proj]); peft cannot restrict {self.target_modules!r} to layers")


LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq")
LORA_INIT = re.compile(r"default|gaussian|pissa|pissa_niter_[1-9][0-9]*|olora|loftq")


def mutates_base(lora: LoraSection) -> bool:
    """True for the inits that move part of each adapted base weight into the adapter (PiSSA, OLoRA): the trained
    adapter is converted back to one of the untouched base when saved (tune.adapters.save_adapter)."""
    return lora.init.startswith("pissa") or lora.init == "olora"


def lora_init_problem(lora: LoraSection, method: str, converts: bool = True) -> str | None:
    """The problem line when lora.init does not suit `method` (full / lora / qlora), else None. `converts`: the
    recipe saves a PiSSA / OLoRA adapter converted for the original base (finetune); the others refuse those."""
    if method == "full":
        return None
    if not converts and mutates_base(lora):
        return (f"lora.init={lora.init} moves part of each base weight into the adapter, which only the finetune "
                "recipe converts back when saving; use lora.init=default or gaussian here")
    if method == "qlora" and mutates_base(lora):
        return (f"lora.init={lora.init} moves part of each base weight into the adapter, which a 4-bit base cannot "
                "hold exactly; use method=lora for it, or lora.init=loftq with method=qlora")
    if method == "lora" and lora.init == "loftq":
        return ("lora.init=loftq fits the adapter to the error of a 4-bit base and is for method=qlora only; with "
                "method=lora use lora.init=default, gaussian, pissa or olora")
    return None


def lora_model_problems(lora: LoraSection, method: str, model_config: dict, loraplus_lr_ratio=None) -> list[str]:
    """The problem lines of lora.* / train.loraplus_lr_ratio against the base's config.json (`model_config`, a dict:
    no weights, no torch): LoRA+ without LoRA (method=full), a lora.layers_to_transform index past the model's
    decoder layers, a lora.trainable_token_indices id past its vocabulary. add_lora checks them again on the model."""
    if method == "full":
        return (["train.loraplus_lr_ratio applies to method=lora or qlora (it speeds up the LoRA B matrices); set it "
                 "to null for a full fine-tune"] if loraplus_lr_ratio is not None else [])
    problems = []
    text = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else model_config
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(text.get(k), int)),
                  None)
    if lora.layers_to_transform and layers is not None and max(lora.layers_to_transform) >= layers:
        problems.append(f"lora.layers_to_transform={lora.layers_to_transform}: the model has {layers} decoder layers "
                        f"(indices 0 to {layers - 1}); give indices below {layers}")
    vocab, tokens = text.get("vocab_size"), lora.trainable_token_indices
    ids = [i for group in (tokens.values() if isinstance(tokens, dict) else [tokens or []]) for i in group]
    if isinstance(vocab, int) and ids and max(ids) >= vocab:
        problems.append(f"lora.trainable_token_indices: token ids must be below the model's vocabulary of {vocab}, "
                        f"got {max(ids)}; add the new tokens to the tokenizer and base model first")
    return problems


# lora.* settings a resumed run must keep: they decide what the checkpointed adapter weights compute (the scaling,
# the base residual of PiSSA / OLoRA, which embedding rows the trainable-token deltas belong to) or which weights
# exist. lora.dropout may change (it only acts in training).
LORA_RESUME_KEYS = ("r", "alpha", "target_modules", "target_parameters", "bias", "use_dora", "use_rslora",
                    "layers_to_transform", "exclude_modules", "init", "rank_pattern", "alpha_pattern",
                    "trainable_token_indices")


def lora_resume_changes(saved: dict, method: str, lora: LoraSection, method_key: str = "method") -> list[str]:
    """The "KEY old -> new" changes of `method` (the config key `method_key`, e.g. student.method) and the
    LORA_RESUME_KEYS between a run's saved config (`saved`: its config.yaml as a dict; a key it lacks counts as its
    default) and the config resuming it. Empty for method=full."""
    old_method = saved
    for part in method_key.split("."):
        old_method = old_method.get(part) if isinstance(old_method, dict) else None
    old_method = old_method or "full"
    if old_method != method:
        return [f"{method_key} {old_method} -> {method}"]
    if method == "full":
        return []
    old, default = saved.get("lora") or {}, LoraSection()
    return [f"lora.{key} {old.get(key, getattr(default, key))} -> {getattr(lora, key)}" for key in LORA_RESUME_KEYS
            if old.get(key, getattr(default, key)) != getattr(lora, key)]


def check_resume_keeps_lora(output_dir, resume: bool, method: str, lora: LoraSection, method_key: str = "method"):
    """ConfigError when train.resume would continue the run in `output_dir` (its checkpoints and config.yaml) with
    another method or other lora.* settings that change what its adapter weights compute (LORA_RESUME_KEYS: alpha,
    rsLoRA, the init, the trainable token ids, ...): the checkpoint's tensors would load into a different model,
    silently when the shapes agree. Reads config.yaml only (no torch)."""
    from pathlib import Path

    from tune.config import read_yaml

    run_dir = Path(output_dir)
    if not resume or not (run_dir / "config.yaml").is_file() or not any(run_dir.glob("checkpoints/step_*")):
        return
    changes = lora_resume_changes(read_yaml(run_dir / "config.yaml"), method, lora, method_key)
    if changes:
        raise ConfigError(f"resuming {run_dir} would change the model its checkpoints were trained as: "
                          f"{', '.join(changes)}; resume with the run's own settings (its config.yaml) or start a new "
                          "output_dir")


@dataclass
class QuantSection:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # auto: the compute dtype under FSDP (which shards only float tensors), else uint8 (tune.adapters.quant_storage)
    quant_storage: Literal["auto", "uint8", "bf16", "fp32", "fp16"] = "auto"
