"""Distill a large causal LM (the teacher) into a smaller one (the student): L = α·T²·KD + (1 − α)·CE.

    tune run distill --config distill_ni [key=value ...]

Steps: teacher tokenizer -> data (Natural-Instructions prompts, prompt masked, or a text corpus) ->
frozen teacher (or its offline top-k cache) -> student (an HF directory, full / LoRA / QLoRA, or a fresh
native preset) -> the shared engine with the KD loss -> student saved -> optional comparison on held-out
instances against the teacher and the same student trained with CE only on the same data and steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recipes.finetune import NIDataSection
from tune.config import os_errors_as_config_errors
from tune.train_config import LoraSection, QuantSection, TrainConfig


@dataclass
class TeacherSection:
    model: str = "runs/full_ni/model"  # any local HF causal-LM directory; its tokenizer is the shared one
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    quant: Literal["none", "8bit", "4bit"] = "none"  # load the frozen teacher through bitsandbytes to save memory
    cache: bool = False  # run the teacher once, store its top-k log-probs on disk, distill from there (NI data)
    cache_dir: str = ".cache/teacher"
    cache_top_k: int = 64  # 0: the whole vocabulary (then distilling from the cache equals the live teacher)
    # the mass outside the cached top k as one bucket (exact bound at T = 1); false: renormalise over the k ids
    cache_tail: bool = True


@dataclass
class StudentSection:
    model: str | None = None  # an HF directory (our export or yours); or leave null and build `preset` fresh
    preset: str | None = "tiny-gpt2"  # a native preset, sized by the overrides below, with the teacher's vocabulary
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    method: Literal["full", "lora", "qlora"] = "full"  # lora / qlora need student.model
    dtype: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class KDSection:
    alpha: float = 0.5  # weight of the distillation term; 0 is plain CE training, 1 is pure distillation
    temperature: float = 1.0  # softens both distributions; the KD term is scaled by T² (Hinton et al., 2015)
    #                           so its gradients keep the CE term's scale whatever T is
    # KL(teacher‖student), KL(student‖teacher), generalized JSD, total variation, DistiLLM's α-skew KLs
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"] = "forward_kl"
    beta: float = 0.5  # jsd only (GKD's β): m = β·p_teacher + (1 − β)·p_student; 0 is forward KL, 1 reverse KL
    skew_alpha: float = 0.1  # skew KLs only: KL(p ‖ α·p + (1 − α)·q), DistiLLM's default 0.1
    chunk_size: int = 4096  # target positions projected to the vocabulary at a time (both models)
    # on-policy distillation (GKD, Agarwal et al. 2024): the share of steps trained on the student's own completions
    # of the prompts, scored by the teacher (needs prompts: NI tasks or alpaca / prompt_completion / chat rows, and a
    # live teacher); 0 is off-policy KD
    lmbda: float = 0.0
    sample_temperature: float = 1.0  # the student's sampling temperature for those completions (0: greedy)
    max_new_tokens: int = 32  # the longest completion sampled (eos ends one earlier)
    # none: teacher and student must share the tokenizer. uld: Universal Logit Distillation (Boizard et al. 2024),
    # α·ULD + (1 − α)·CE, for a student.model with its own tokenizer (NI data, live teacher; README: Different
    # tokenizers (ULD))
    cross_tokenizer: Literal["none", "uld"] = "none"
    # hidden-state distillation (tune/kd_hidden.py): pairs [student_layer, teacher_layer] of 0-based decoder blocks
    # whose outputs (before the final norm) are matched, through a learned projection where the widths differ;
    # [] = off. Needs the live teacher (teacher.cache=false)
    layer_map: list[list[int]] = field(default_factory=list)
    hidden_loss: Literal["mse", "cosine"] = "mse"  # per position: mean squared error over the width, or 1 − cosine
    hidden_weight: float = 1.0  # the term's weight in the loss, added to α·T²·KD + (1 − α)·CE


@dataclass
class DistillDataSection(NIDataSection):
    # data.kind (above): ni tasks, your alpaca / prompt_completion / chat / text rows in data.train, or (text) a corpus
    corpus: str | None = None  # text: .txt file(s) or a directory, in random block_size windows (instead of data.train)
    block_size: int = 256  # text: window length
    val_fraction: float = 0.1  # text


@dataclass
class CompareSection:
    ce_only: bool = True  # also train the same student with CE only (α = 0) on the same data and steps
    # also train the same student, data and steps with these methods (off_policy, on_policy, sequence_kd), beside
    # the run's own; the table then says how much of the CE-only -> teacher val-loss gap each closes
    methods: list[str] = field(default_factory=list)
    lmbda: float = 1.0  # on_policy's kd.lmbda when the run's own kd.lmbda is 0
    max_instances_per_task: int = 10  # held-out instances per task for ROUGE-L
    max_new_tokens: int = 24
    batch_size: int = 8


@dataclass
class SeqKDSection:
    """Sequence-level KD (Kim & Rush, 2016): the teacher decodes an output for every NI training prompt once
    (cached under cache_dir) and the KD student trains on those outputs instead of the references."""
    enabled: bool = False
    decoding: Literal["greedy", "sample"] = "greedy"
    temperature: float = 1.0  # sample only
    top_p: float = 1.0  # sample only: nucleus sampling; 1 = the whole distribution
    max_new_tokens: int = 64  # per output; prompt + output also stay within data.max_length
    keep_gold: bool = False  # also train on the reference outputs: both per prompt, the training set doubles
    batch_size: int = 16  # prompts per generate call
    cache_dir: str = ".cache/seq_kd"


@dataclass
class DistillConfig:
    recipe: Literal["distill"] = "distill"
    output_dir: str = "runs/distill"
    seed: int = 1337
    overwrite: bool = False
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    kd: KDSection = field(default_factory=KDSection)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QuantSection = field(default_factory=QuantSection)
    data: DistillDataSection = field(default_factory=DistillDataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareSection = field(default_factory=CompareSection)
    seq_kd: SeqKDSection = field(default_factory=SeqKDSection)


CONFIG_CLASS = DistillConfig


@os_errors_as_config_errors
def validate(cfg: DistillConfig) -> None:
    """Cheap checks before any heavy work (no weights, no torch); every problem is reported, in one ConfigError.
    Both models' position tables (and a native student's block_size) must hold the training sequences."""
    from recipes.finetune import check_data_sources, check_ni_numbers, check_positions, data_inputs
    from tune.config import SEED_RANGE, range_problems
    from tune.errors import ConfigError, Problems
    from tune.hf import check_model_dir
    from tune.models.config import config_from_preset
    from tune.recipe_utils import check_file_free_dir, check_output_dir, empty_path_problems
    from tune.train_config import check_resume_keeps_lora, lora_init_problem

    problems = Problems()
    problems.extend((*empty_path_problems(cfg, ["output_dir", "teacher.model", "teacher.cache_dir", "student.model",
                                                "data.corpus", "data.train_tasks", "data.eval_tasks", "data.tasks_dir",
                                                "data.cache_dir", "data.train", "data.eval", "data.chat_template"]),
                     *check_file_free_dir("data.cache_dir", cfg.data.cache_dir),
                     *check_file_free_dir("teacher.cache_dir", cfg.teacher.cache_dir)))
    s, kd, d = cfg.student, cfg.kd, cfg.data
    student_sizes = range_problems("student.", s, {"n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1",
                                                   "block_size": ">= 1"})
    teacher = problems.call(check_model_dir, cfg.teacher.model, "teacher.model")
    student = native_layers = None
    if (s.model is None) == (s.preset is None):
        problems.add("set exactly one of student.model (an HF directory) or student.preset (a fresh native model)")
    elif s.model is not None:
        student = problems.call(check_model_dir, s.model, "student.model")
        if init_problem := lora_init_problem(cfg.lora, s.method, converts=False):
            problems.add(init_problem)
        problems.call(check_resume_keeps_lora, cfg.output_dir, cfg.train.resume, s.method, cfg.lora, "student.method")
    elif not student_sizes:
        if s.method != "full":
            problems.add(f"student.method={s.method} needs student.model (an HF directory); a fresh preset trains "
                         "fully")
        try:
            native_layers = config_from_preset(s.preset, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                               block_size=s.block_size).n_layer
        except ConfigError as e:  # the preset's messages name model.*; here the keys live under student.*
            problems.add(str(e).replace("model.", "student."))
    if not 0 <= kd.alpha <= 1:
        problems.add(f"kd.alpha must be in [0, 1], got {kd.alpha}")
    if not kd.temperature > 0:
        problems.add(f"kd.temperature must be > 0, got {kd.temperature}")
    if not 0 <= kd.beta <= 1:
        problems.add(f"kd.beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {kd.beta}")
    if not 0 <= kd.lmbda <= 1:
        problems.add(f"kd.lmbda must be in [0, 1] (the share of on-policy steps), got {kd.lmbda}")
    if kd.lmbda > 0:
        if d.kind == "text":
            problems.add("kd.lmbda > 0 (on-policy distillation) needs prompts for the student to complete: data.kind=ni, "
                         "alpaca, prompt_completion or chat, not text")
        if cfg.teacher.cache:
            problems.add("kd.lmbda > 0 (on-policy distillation) needs a live teacher to score the student's own "
                         "samples; set teacher.cache=false (or kd.lmbda=0)")
        if cfg.train.compile:
            problems.add("kd.lmbda > 0 (on-policy distillation) generates with the student, whose compiled blocks "
                         "would recompile at every new length; set train.compile=false")
    unknown = [m for m in cfg.compare.methods if m not in METHODS or m == "ce_only"]
    if "sequence_kd" in cfg.compare.methods and d.kind != "ni":
        problems.add("compare.methods names sequence_kd, which needs data.kind=ni (as seq_kd.enabled does)")
    if unknown:
        problems.add(f"compare.methods: unknown method {unknown[0]!r}; choose from "
                     f"{', '.join(m for m in METHODS if m != 'ce_only')} (the CE-only student is compare.ce_only)")
    if not 0 < cfg.compare.lmbda <= 1:
        problems.add(f"compare.lmbda must be in (0, 1], got {cfg.compare.lmbda}")
    if "on_policy" in cfg.compare.methods:
        if d.kind == "text" or cfg.teacher.cache or cfg.train.compile:
            problems.add("compare.methods names on_policy, which needs prompts (data.kind other than text), "
                         "teacher.cache=false and train.compile=false (as kd.lmbda > 0 does)")
    if (kd.lmbda > 0 or "on_policy" in cfg.compare.methods) and kd.alpha == 0:
        problems.add("on-policy steps train on kd.alpha * KD alone (the student's samples have no reference for CE), "
                     "so kd.alpha=0 would train nothing on them; set kd.alpha > 0")
    own = method_of(cfg)
    if own in cfg.compare.methods:
        problems.add(f"compare.methods names {own}, which this run trains itself (output_dir/student); list only "
                     "the other methods to train beside it")
    if kd.sample_temperature < 0:
        problems.add(f"kd.sample_temperature must be >= 0 (0: greedy), got {kd.sample_temperature}")
    if not 0 <= kd.skew_alpha < 1:
        problems.add(f"kd.skew_alpha must be in [0, 1), got {kd.skew_alpha}")
    if cfg.teacher.cache_top_k < 0:
        problems.add(f"teacher.cache_top_k must be >= 0 (0 = whole vocabulary), got {cfg.teacher.cache_top_k}")
    problems.extend((*range_problems("", cfg, {"seed": SEED_RANGE}), *student_sizes,
                     *range_problems("kd.", kd, {"chunk_size": ">= 1", "max_new_tokens": ">= 1"}),
                     *range_problems("data.", d, {"block_size": ">= 2", "val_fraction": "(0, 1)"}),
                     *range_problems("compare.", cfg.compare, {"max_instances_per_task": ">= 1",
                                                               "max_new_tokens": ">= 1", "batch_size": ">= 1"})))
    if d.kind == "text" and (d.corpus is None) == (d.train is None):
        problems.add("data.kind=text reads either data.corpus (.txt files or a directory, in random block_size windows) "
                     "or data.train (rows with a text column); set exactly one")
    if windows(d):
        if not Path(d.corpus).exists():
            problems.add(f"data.corpus={d.corpus} does not exist (a .txt file or directory)")
        if cfg.teacher.cache:
            problems.add("teacher.cache=true needs fixed examples (data.kind=ni, or rows in data.train): random text "
                         "windows have no fixed context to cache the teacher on")
    elif d.corpus is not None:
        problems.add(f"data.corpus applies to data.kind=text; data.kind={d.kind} reads "
                     f"{'data.train_tasks' if d.kind == 'ni' else 'data.train'}")
    elif not (d.kind == "text" and d.train is None):
        check_data_sources(d, problems)
        from data_prep.instructions import chat_template_problem

        if problem := chat_template_problem(d.kind, d.chat_template, cfg.teacher.model, "teacher.model"):
            problems.add(problem)
    check_ni_numbers(d, problems, prompts=not windows(d))
    length_key, length = ("data.block_size", d.block_size) if windows(d) else ("data.max_length", d.max_length)
    if teacher is not None:
        problems.call(check_positions, length_key, length, "teacher.model", cfg.teacher.model)
    if student is not None:
        problems.call(check_positions, length_key, length, "student.model", s.model)
    if s.model is None and s.block_size is not None and length > s.block_size:
        problems.add(f"{length_key}={length} is longer than student.block_size={s.block_size}; set "
                     f"student.block_size >= {length} (or leave it null to use {length_key})")
    inputs = {"data.corpus": d.corpus} if windows(d) else data_inputs(d)
    problems.extend(check_output_dir(cfg.output_dir, {"teacher.model": cfg.teacher.model, "student.model": s.model,
                                                      **inputs}))
    # cross-tokenizer distillation (kd.cross_tokenizer=uld)
    if kd.cross_tokenizer == "uld":
        uld_needs = [(s.model is None, "student.model (an HF directory with its own tokenizer; a fresh "
                                       "student.preset takes the teacher's)"),
                     (d.kind != "ni", "data.kind=ni (responses to align)"),
                     (not d.mask_prompt, "data.mask_prompt=true (the loss aligns the responses)"),
                     (cfg.teacher.cache, "teacher.cache=false (it runs the teacher live)"),
                     (cfg.compare.ce_only or bool(cfg.compare.methods),
                      "compare.ce_only=false and compare.methods=[] (the comparison measures KL token id by id)"),
                     (cfg.seq_kd.enabled, "seq_kd.enabled=false (the teacher's outputs are in its own tokens)"),
                     (kd.lmbda > 0, "kd.lmbda=0 (on-policy samples are scored by the teacher token id by id)")]
        for missing, need in uld_needs:
            if missing:
                problems.add(f"kd.cross_tokenizer=uld needs {need}")
    q = cfg.seq_kd  # sequence-level KD
    problems.extend((*empty_path_problems(cfg, ["seq_kd.cache_dir"]),
                     *check_file_free_dir("seq_kd.cache_dir", q.cache_dir),
                     *range_problems("seq_kd.", q, {"temperature": "> 0", "top_p": "(0, 1]", "max_new_tokens": ">= 1",
                                                    "batch_size": ">= 1"})))
    if q.enabled and d.kind != "ni":
        problems.add("seq_kd.enabled=true needs data.kind=ni: the teacher rewrites the outputs of NI prompts and a "
                     "text corpus has none; set data.kind=ni or seq_kd.enabled=false")
    problems.extend(range_problems("kd.", kd, {"hidden_weight": ">= 0"}))  # hidden-state distillation (kd_hidden)
    if kd.layer_map:
        teacher_layers = _layer_count(cfg.teacher.model) if teacher is not None else None
        student_layers = _layer_count(s.model) if student is not None else native_layers
        problems.extend(_layer_map_problems(kd.layer_map, student_layers, teacher_layers))
        if cfg.teacher.cache:
            problems.add("kd.layer_map needs the live teacher: the teacher cache holds no hidden states; set "
                         "teacher.cache=false or kd.layer_map=[]")
        if kd.cross_tokenizer == "uld":
            problems.add("kd.layer_map needs kd.cross_tokenizer=none: with two tokenizers the positions of the two "
                         "models do not correspond")
    problems.raise_if_any()


def windows(d: DistillDataSection) -> bool:
    """Whether the data is a text corpus read in random windows (data.kind=text with data.corpus) rather than fixed,
    tokenized examples (NI tasks or rows of any kind)."""
    return d.kind == "text" and d.corpus is not None


def make_student(cfg: DistillConfig, vocab_size: int, block_size: int):
    """A fresh native GPT of the configured size, or the HF student (+ LoRA). Deterministic under the global seed."""
    from tune.adapters import add_lora, attention_implementation, load_base_model
    from tune.hf import resolve_dtype
    from tune.models.gpt import GPT, config_from_preset

    s = cfg.student
    if s.model is None:
        return GPT(config_from_preset(s.preset, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                      block_size=s.block_size or block_size, vocab_size=vocab_size))
    attn, _ = attention_implementation(s.model, "dense" if windows(cfg.data) else cfg.data.packed_attention)
    model = load_base_model(s.model, s.method, resolve_dtype(s.dtype), cfg.qlora, cfg.train.gradient_checkpointing,
                            attn_implementation=attn)
    return add_lora(model, cfg.lora) if s.method in ("lora", "qlora") else model


def save_student(cfg: DistillConfig, model, tokenizer, out: Path) -> Path:
    from tune.hf import quiet_third_party
    from tune.kd_hidden import strip_hidden_distillation
    from tune.models.export import export_hf

    strip_hidden_distillation(model)  # kd.layer_map's projections train with the student but are not part of it
    if cfg.student.model is None:
        return export_hf(model.cpu(), out, tokenizer)
    with quiet_third_party():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_checkpoint(cfg: DistillConfig, run_dir: Path, checkpoint: Path, out: Path) -> Path:
    """One checkpoint of the distilled student, saved as the end of the run saves it."""
    from tune.engine import checkpoint_tensor_shape, read_checkpoint_weights
    from tune.hf import load_tokenizer

    tokenizer = (load_tokenizer(cfg.student.model, "student.model") if cfg.kd.cross_tokenizer == "uld"
                 else load_tokenizer(cfg.teacher.model, "teacher.model"))
    # only a fresh native student takes its vocabulary size from here
    vocab_size = checkpoint_tensor_shape(checkpoint, "tok_emb.weight")[0] if cfg.student.model is None else 0
    block_size = cfg.data.block_size if windows(cfg.data) else cfg.data.max_length
    student = make_student(cfg, vocab_size, block_size)
    add_hidden_distillation(cfg, student)  # its projections are in the checkpoint too (save_student drops them)
    student.load_state_dict(read_checkpoint_weights(checkpoint, student), strict=False)
    return save_student(cfg, student.eval(), tokenizer, out)


METHODS = {"ce_only": "CE-only student", "off_policy": "off-policy KD", "on_policy": "on-policy GKD",
           "sequence_kd": "sequence-level KD"}


def method_of(cfg: DistillConfig) -> str:
    """The distillation method a config trains with: sequence_kd (seq_kd.enabled), on_policy (kd.lmbda > 0) or
    off_policy."""
    return "sequence_kd" if cfg.seq_kd.enabled else "on_policy" if cfg.kd.lmbda > 0 else "off_policy"


def method_config(cfg: DistillConfig, method: str) -> DistillConfig:
    """The run's config changed to train `method` (compare.methods): everything else (student, data, steps, the KD
    settings, seq_kd's decoding) stays as configured. on_policy keeps the run's kd.lmbda if it has one, else takes
    compare.lmbda; sequence_kd turns seq_kd on, the others off."""
    from dataclasses import replace

    kd = replace(cfg.kd, lmbda=0.0)
    if method == "on_policy":
        kd = replace(kd, lmbda=cfg.kd.lmbda or cfg.compare.lmbda)
    elif method == "ce_only":
        kd = replace(kd, alpha=0.0)
    return replace(cfg, kd=kd, seq_kd=replace(cfg.seq_kd, enabled=method == "sequence_kd"))


@dataclass
class _Setup:
    """What every student of one run shares: the data, the tokenizer and the (lazily loaded) teacher."""
    cfg: DistillConfig
    accelerator: object
    say: object
    tokenizer: object
    vocab_size: int
    block_size: int
    train_examples: object = None
    val_examples: object = None
    batch_kwargs: dict = field(default_factory=dict)
    plain_source: object = None
    teacher_attn: str = "sdpa"
    live_teacher: object = None
    sequence_examples: object = None  # sequence-level KD's training examples (the teacher's outputs), made on first use
    stop_id: int | None = None  # where the student's on-policy completions end: eos, or a chat template's end-of-turn
    samples: object = None  # the engine's samples callable (train.num_samples), shared by every student

    def teacher(self):
        """The frozen teacher, loaded on first use."""
        from tune.distill import load_teacher
        from tune.hf import resolve_dtype

        t = self.cfg.teacher
        if self.live_teacher is None:
            self.live_teacher = load_teacher(t.model, resolve_dtype(t.dtype), t.quant, self.accelerator.device,
                                             self.teacher_attn)
        return self.live_teacher

    def batch_args(self, train_examples=None) -> tuple:
        train = self.train_examples if train_examples is None else train_examples
        return train, self.val_examples, self.cfg.train.micro_batch_size, self.cfg.train.grad_accum_steps

    def examples(self, cfg: DistillConfig):
        """The training examples a student trains on under `cfg`: the references, or with seq_kd.enabled the
        teacher's outputs (seq_kd_examples; the validation set keeps the references either way)."""
        if not cfg.seq_kd.enabled:
            return self.train_examples
        if self.sequence_examples is None:
            self.sequence_examples = seq_kd_examples(self)
        return self.sequence_examples


def fit_student(setup: _Setup, cfg: DistillConfig, method: str, run_dir: Path, run_config=None):
    """Train one student of the run with `method` (METHODS) under `cfg` into `run_dir`: the engine's FitResult.
    `run_config`: the config the engine saves and checks on resume (the run's own student only)."""
    from tune.distill import (CachedTeacherBatches, OnPolicyBatches, build_teacher_cache, cache_key, kd_loss_fn,
                              load_teacher_cache)
    from tune.engine import Engine
    from tune.hf import resolve_dtype
    from tune.packing import NIBatches

    t, kd, say, accelerator = cfg.teacher, cfg.kd, setup.say, setup.accelerator
    vocab_size, block_size = setup.vocab_size, setup.block_size

    def rebuild():
        return make_student(cfg, vocab_size, block_size)

    if method == "ce_only":  # the baseline: plain cross-entropy on the references, no teacher
        say(f"{METHODS[method]}: the same student trained on the references with CE alone")
        return Engine(cfg.train, run_dir, rebuild(), setup.plain_source, accelerator=accelerator, log=say,
                      rebuild=rebuild, run_config=run_config, samples=setup.samples).fit()
    train = setup.examples(cfg)
    source, teacher = setup.plain_source, None
    if train is not setup.train_examples:
        source = NIBatches(*setup.batch_args(train), **setup.batch_kwargs)
    if t.cache:
        splits = {"train": train, "val": setup.val_examples}
        top_k = t.cache_top_k or vocab_size
        precision = f"{resolve_dtype(t.dtype)}/{t.quant}"
        complete = (Path(t.cache_dir) / cache_key(t.model, top_k, splits, precision) / "meta.json").is_file()
        with accelerator.main_process_first():
            cache = build_teacher_cache(t.model, None if complete else setup.teacher(), splits, t.cache_dir, top_k,
                                        vocab_size, setup.tokenizer.pad_token_id, log=say, precision=precision)
        source = CachedTeacherBatches(*setup.batch_args(train), **setup.batch_kwargs,
                                      train_cache=load_teacher_cache(cache, "train", len(train)),
                                      val_cache=load_teacher_cache(cache, "val", len(setup.val_examples)))
    else:
        teacher = setup.teacher()
    student = rebuild()
    hidden = add_hidden_distillation(cfg, student, teacher)  # kd.layer_map (None without one)
    say(f"{METHODS[method]}: student of {sum(p.numel() for p in student.parameters()):,} parameters "
        f"({sum(p.numel() for p in student.parameters() if p.requires_grad):,} trainable); teacher {t.model}"
        + (" (from its top-k cache)" if t.cache else ""))
    if kd.lmbda > 0:  # GKD: the student completes the prompts of a share of the steps
        source = OnPolicyBatches(*setup.batch_args(train), **setup.batch_kwargs, student=student, lmbda=kd.lmbda,
                                 temperature=kd.sample_temperature, max_new_tokens=kd.max_new_tokens,
                                 eos_id=setup.stop_id, vocab_size=vocab_size,
                                 autocast=accelerator.autocast)
    mixing = kd.skew_alpha if kd.divergence.startswith("skew_") else kd.beta  # divergence()'s beta
    loss_fn = kd_loss_fn(teacher, kd.alpha, kd.temperature, kd.divergence, mixing, vocab_size, kd.chunk_size,
                         t.cache_tail, log_on_policy=kd.lmbda > 0, hidden_kd=hidden)

    def rebuild_kd():  # the student as it trains: with kd.layer_map's projections (save_student drops them)
        model = rebuild()
        add_hidden_distillation(cfg, model)
        return model

    engine = Engine(cfg.train, run_dir, student, source, loss_fn=loss_fn, accelerator=accelerator, log=say,
                    rebuild=rebuild_kd, run_config=run_config, samples=setup.samples)
    engine.prefetch = kd.lmbda == 0  # on-policy batches are sampled from the student as it stands at their step
    engine.val_metrics = lambda extras: extras  # print the KD and CE parts (val_loss mixes them: no perplexity)
    try:
        return engine.fit()
    finally:
        if hidden is not None:  # the teacher serves the next student and the comparison without them
            hidden.remove_hooks()


def run(cfg: DistillConfig):
    from dataclasses import replace

    from accelerate.utils import set_seed

    from tune.adapters import attention_implementation
    from tune.packing import PACKED_ATTENTION, NIBatches
    from recipes.finetune import build_datasets, load_data, sample_fn
    from tune.distill import check_vocabularies
    from tune.engine import check_train_device, make_accelerator
    from tune.hf import load_tokenizer
    from tune.recipe_utils import prepare_output_dir

    validate(cfg)
    if cfg.kd.cross_tokenizer == "uld":  # cross-tokenizer distillation: its own data, loss and save (run_uld)
        return run_uld(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.num_threads)
    check_train_device(cfg.train, accelerator.device)  # before the output directory is touched
    on_policy = cfg.kd.lmbda > 0 or "on_policy" in cfg.compare.methods
    if on_policy and getattr(accelerator.state, "fsdp_plugin", None) is not None:
        from tune.errors import ConfigError

        raise ConfigError("on-policy distillation (kd.lmbda > 0 or compare.methods=[on_policy]) does not run under "
                          "FSDP yet (the student samples outside the sharded model's forward); run it on one process "
                          "or under DDP (tune run --nproc N without the FSDP accelerate config), or set kd.lmbda=0")
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    t, s, d = cfg.teacher, cfg.student, cfg.data
    tokenizer = load_tokenizer(t.model, "teacher.model")  # pads with eos if it has no pad token: padding is masked
    teacher_vocab = _embedding_rows(t.model)
    if s.model is not None:  # before any training step: the two models must share the tokenizer
        vocab_size = check_vocabularies(tokenizer, load_tokenizer(s.model, "student.model"), teacher_vocab,
                                        _embedding_rows(s.model), t.model, s.model)
    else:
        vocab_size = check_vocabularies(tokenizer, tokenizer, teacher_vocab, len(tokenizer), t.model, "(new)")
    data = None if windows(d) else load_data(cfg, tokenizer)
    # rows of the other kinds are rendered as they are tokenized: a bad one is refused before anything is written
    built = build_datasets(d, data, tokenizer, accelerator, say) if data is not None and data.kind != "ni" else None
    run_dir = prepare_output_dir(cfg, accelerator, inputs=[t.model, s.model])
    set_seed(cfg.seed)

    setup = _Setup(cfg, accelerator, say, tokenizer, vocab_size, d.block_size if windows(d) else d.max_length)
    end_of_turn = data.formatter.end_of_turn if data is not None and data.formatter is not None else []
    setup.stop_id = end_of_turn[0] if end_of_turn else tokenizer.eos_token_id
    if data is not None:
        setup.train_examples, setup.val_examples = built or build_datasets(d, data, tokenizer, accelerator, say)
        setup.batch_kwargs = dict(seed=cfg.seed, packing=d.packing, max_length=d.max_length,
                                  pad_id=tokenizer.pad_token_id, mask_mode=PACKED_ATTENTION[d.packed_attention])
        setup.plain_source = NIBatches(*setup.batch_args(), **setup.batch_kwargs)
        setup.samples = sample_fn(tokenizer, data, cfg.train.num_samples, cfg.compare.max_new_tokens, cfg.compare.batch_size,
                                  as_hf=(lambda m: _hf_copy(m, tokenizer)) if s.model is None else None)
    else:
        setup.plain_source = _text_source(cfg, accelerator)
    setup.teacher_attn, why = attention_implementation(t.model, "dense" if windows(d) else d.packed_attention)
    if not windows(d) and d.packing:
        say(f"teacher {why}")

    method = method_of(cfg)
    result = fit_student(setup, cfg, method, run_dir, run_config=cfg)
    students = {METHODS[method]: result}
    if accelerator.is_main_process:
        result.model.eval()  # unsharded (the same module unless FSDP trained it)
        say(f"saved the student to {save_student(cfg, result.model, tokenizer, run_dir / 'student')}")
    others = [m for m in (["ce_only"] if cfg.compare.ce_only else []) + list(cfg.compare.methods) if m != method]
    for other in dict.fromkeys(others):
        set_seed(cfg.seed)  # the same initial student
        other_cfg = replace(method_config(cfg, other), output_dir=str(run_dir / other), compare=CompareSection(
            ce_only=False))
        # its config.yaml (so `tune export` and resume work on it as on any run)
        students[METHODS[other]] = fit_student(setup, other_cfg, other, run_dir / other, run_config=other_cfg)
        if accelerator.is_main_process:
            students[METHODS[other]].model.eval()
            save_student(cfg, students[METHODS[other]].model, tokenizer, run_dir / other / "student")
    if others and accelerator.is_main_process:
        models = {"teacher": setup.teacher(), **{name: r.model for name, r in students.items()}}
        rows = compare(cfg, models, setup.plain_source, tokenizer, data, vocab_size, accelerator.device)
        for name, r in students.items():
            rows[name]["train_steps"] = r.step
        add_gap_closed(rows)
        (run_dir / "comparison.json").write_text(json.dumps(rows, indent=2))
        say(format_comparison(rows))
    accelerator.wait_for_everyone()
    return result


def seq_kd_examples(setup: _Setup):
    """Sequence-level KD: the training examples with the teacher's outputs (followed by the gold ones with
    seq_kd.keep_gold). The outputs come from the cache under seq_kd.cache_dir (built on the main process first,
    reused by the others and by later runs); the teacher is loaded only when they must be decoded."""
    from tune.distill import SequenceKDExamples, SequenceSettings, build_sequence_cache, example_prompts, \
        sequence_cache_key
    from tune.hf import resolve_dtype

    cfg, tokenizer = setup.cfg, setup.tokenizer
    t, q, d = cfg.teacher, cfg.seq_kd, cfg.data
    sample = q.decoding == "sample"  # greedy outputs do not depend on the sampling knobs or the seed
    settings = SequenceSettings(decoding=q.decoding, temperature=q.temperature if sample else 1.0,
                                top_p=q.top_p if sample else 1.0, max_new_tokens=q.max_new_tokens,
                                max_length=d.max_length, batch_size=q.batch_size, seed=cfg.seed if sample else 0,
                                eos_ids=_eos_ids(t.model, tokenizer), pad_id=tokenizer.pad_token_id,
                                precision=f"{resolve_dtype(t.dtype)}/{t.quant}", vocab_size=setup.vocab_size)
    prompts = example_prompts(setup.train_examples)
    complete = (Path(q.cache_dir) / f"seq-{sequence_cache_key(t.model, prompts, settings)}" / "meta.json").is_file()
    with setup.accelerator.main_process_first():
        outputs = build_sequence_cache(t.model, None if complete else setup.teacher(), prompts, q.cache_dir, settings,
                                       log=setup.say)
    return SequenceKDExamples(setup.train_examples, outputs, q.keep_gold, d.mask_prompt)


def _eos_ids(model_dir, tokenizer) -> tuple[int, ...]:
    """The tokenizer's eos first (it ends the NI references), then any other stop id of the model's
    generation_config.json."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    file = Path(model_dir) / "generation_config.json"
    if file.is_file():  # read as JSON: no transformers loader (they all run with trust_remote_code=False)
        from tune.errors import DataError

        try:
            extra = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
        except (ValueError, AttributeError) as e:
            raise DataError(f"{file}: not a JSON object ({e}); fix or delete it (sequence-level KD reads its "
                            "eos_token_id)") from None
        if not all(isinstance(i, int) for i in (extra if isinstance(extra, list) else [extra]) if i is not None):
            raise DataError(f"{file}: eos_token_id must be a token id or a list of them, got {extra!r}")
        ids += [i for i in (extra if isinstance(extra, list) else [extra]) if i is not None and i not in ids]
    return tuple(ids)


def _embedding_rows(model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False).vocab_size


def add_hidden_distillation(cfg: DistillConfig, student, teacher=None):
    """kd.layer_map: a tune.kd_hidden.HiddenStateDistillation attached to `student` as `student.kd_hidden`, so the
    engine trains, checkpoints and resumes its projections with the student, and hooked to both models when the
    `teacher` is given. None (the student unchanged) without a layer map."""
    if not cfg.kd.layer_map:
        return None
    from transformers import AutoConfig

    from tune.kd_hidden import ATTRIBUTE, HiddenStateDistillation, hidden_width

    teacher_width = AutoConfig.from_pretrained(cfg.teacher.model, trust_remote_code=False).hidden_size
    module = HiddenStateDistillation(cfg.kd.layer_map, hidden_width(student), teacher_width, cfg.kd.hidden_loss,
                                     cfg.kd.hidden_weight)
    student.add_module(ATTRIBUTE, module)
    if teacher is not None:
        module.attach(student, teacher)
    return module


def _layer_map_problems(layer_map, student_layers: int | None, teacher_layers: int | None) -> list[str]:
    """One-line problems of kd.layer_map (pairs [student_layer, teacher_layer], 0-based), each index checked against
    its model's number of decoder blocks when known (None: only >= 0)."""
    problems = []
    for pair in layer_map:
        if len(pair) != 2:  # the config loader has checked that each item is a list of integers
            problems.append(f"kd.layer_map: {pair} is not a pair [student_layer, teacher_layer]")
            continue
        for index, count, name in ((pair[0], student_layers, "student"), (pair[1], teacher_layers, "teacher")):
            if index < 0 or (count is not None and index >= count):
                valid = f"0..{count - 1}" if count is not None else ">= 0"
                problems.append(f"kd.layer_map: pair {pair} names {name} layer {index}, but the {name}'s layers are "
                                f"{valid} (0-based decoder blocks)")
    return problems


def _layer_count(model_dir) -> int | None:
    """The number of decoder blocks of an HF model, from its config.json (None when it names none)."""
    from tune.hf import read_model_config

    config = read_model_config(model_dir)
    count = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)
    return count if isinstance(count, int) and count > 0 else None


def _text_source(cfg: DistillConfig, accelerator):
    from data_prep.text import prepare_text_corpus
    from tune.data import TokenWindows
    from tune.hf import unknown_token_warning

    d = cfg.data
    with accelerator.main_process_first():
        data = prepare_text_corpus(d.corpus, d.cache_dir, tokenizer_path=cfg.teacher.model, val_fraction=d.val_fraction,
                                   min_tokens=d.block_size + 1)
    warning = unknown_token_warning(data.unknown_rate, cfg.teacher.model)
    if warning and accelerator.is_main_process:
        print(warning)
    return TokenWindows(data.train_tokens(), data.val_tokens(), d.block_size, cfg.train.micro_batch_size,
                        cfg.train.grad_accum_steps, cfg.seed)


def compare(cfg: DistillConfig, models: dict, source, tokenizer, data, vocab_size: int, device) -> dict:
    """Per model: held-out CE loss, KL(teacher ‖ model) per token, and (fixed examples: `data`, finetune.RunData)
    ROUGE-L / exact match on the held-out examples — NI: instances of the training tasks and (data.eval_tasks) the
    held-out tasks (keys rougeL_tasks, exact_match_tasks); other kinds: the held-out rows."""
    import torch

    from recipes.finetune import evaluate_data
    from tune.distill import kd_loss_fn

    measure = kd_loss_fn(models["teacher"], 1.0, 1.0, "forward_kl", 0.5, vocab_size, cfg.kd.chunk_size)
    rows = {}
    for name, model in models.items():
        if not getattr(model, "is_quantized", False):  # bitsandbytes models stay where they were loaded
            model.to(device)
        model.eval()
        kd = ce = n = 0.0
        with torch.no_grad():
            for batch in source.val_batches(0, 1, cfg.train.eval_batches):
                _, count, parts = measure(model, {k: v.to(device) for k, v in batch.items()})
                kd, ce, n = kd + float(parts["kd"]), ce + float(parts["ce"]), n + float(count)
        # no held-out tokens: no val loss or KL (not the 0.0 of an empty mean)
        rows[name] = {"val_loss": ce / n, "kl_to_teacher": kd / n} if n else {}
        if data is None or data.kind == "text":
            continue
        hf = _as_hf(model, tokenizer)
        results = evaluate_data(data, hf, tokenizer, cfg.compare.max_instances_per_task, cfg.compare.batch_size,
                                cfg.compare.max_new_tokens, device=device)
        for split, res in results.items():
            suffix = "_tasks" if split == "heldout_tasks" else ""
            rows[name].update({f"rougeL{suffix}": res["overall"]["mean_over_instances"]["rougeL"],
                               f"exact_match{suffix}": res["overall"]["mean_over_instances"]["exact_match"],
                               f"n_instances{suffix}": res["n_instances"]})
    return rows


def add_gap_closed(rows: dict) -> None:
    """Each student row's `gap_closed`: the percentage of the CE-only -> teacher val-loss gap it closes,
    100 · (CE-only − student) / (CE-only − teacher) (100: as good as the teacher, 0: no better than CE alone,
    negative: worse). Nothing without a CE-only row, or when the teacher is no better than it."""
    ce, teacher = rows.get(METHODS["ce_only"], {}).get("val_loss"), rows.get("teacher", {}).get("val_loss")
    if ce is None or teacher is None or ce <= teacher:
        return
    for name, row in rows.items():
        if name not in ("teacher", METHODS["ce_only"]):
            row["gap_closed"] = 100 * (ce - row["val_loss"]) / (ce - teacher)


def _as_hf(model, tokenizer):
    """HF generate() needs an HF model: a native student is exported to memory first."""
    if not hasattr(model, "output_embeddings"):
        return model
    import tempfile

    from transformers import AutoModelForCausalLM

    from tune.hf import quiet_third_party
    from tune.models.export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model.cpu(), tmp, tokenizer)
        with quiet_third_party():
            return AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=False).eval()


def _hf_copy(model, tokenizer):
    """An HF model (on the CPU) with a native student's current weights, for generation during training: the
    student itself stays where it trains (unlike _as_hf, which moves it to the CPU)."""
    from tune.models.export import to_hf_model

    return to_hf_model(model, tokenizer).eval()


def format_comparison(rows: dict) -> str:
    """The comparison table, then one line per student: "<method>: closes N% of the gap" (add_gap_closed)."""
    keys = [("val_loss", "val loss"), ("kl_to_teacher", "KL(teacher‖model)"), ("rougeL", "ROUGE-L"),
            ("exact_match", "EM"), ("rougeL_tasks", "ROUGE-L new tasks"), ("exact_match_tasks", "EM new tasks")]
    keys = [(k, label) for k, label in keys if any(k in r for r in rows.values())]
    lines = [f"{'model':<18}" + "".join(f"{label:>19}" for _, label in keys)]
    for name, row in rows.items():
        lines.append(f"{name:<18}" + "".join(f"{row[k]:>19.4f}" if k in row else f"{'-':>19}" for k, _ in keys))
    lines += [f"{name}: closes {round(row['gap_closed']) + 0}% of the gap (val loss, CE-only -> teacher)"
              for name, row in rows.items() if "gap_closed" in row]
    return "\n".join(["held-out comparison (the same student, data and steps for every method):", *lines])


def run_uld(cfg: DistillConfig):
    """Cross-tokenizer distillation (kd.cross_tokenizer=uld, validated): every NI example is tokenized with both
    tokenizers and paired (tune.distill.pair_examples), the student trains on α·ULD + (1 − α)·CE
    (tune.distill.uld_loss_fn) and is saved with its own tokenizer to output_dir/student."""
    from accelerate.utils import set_seed

    from recipes.finetune import RunData, build_ni_datasets, load_splits, sample_fn
    from tune.adapters import attention_implementation
    from tune.distill import CrossTokenizerBatches, load_teacher, pair_examples, uld_loss_fn
    from tune.engine import Engine, check_train_device, make_accelerator
    from tune.errors import DataError
    from tune.hf import load_tokenizer, resolve_dtype
    from tune.packing import PACKED_ATTENTION
    from tune.recipe_utils import prepare_output_dir

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.num_threads)
    check_train_device(cfg.train, accelerator.device)  # before the output directory is touched
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    t, s, d, kd = cfg.teacher, cfg.student, cfg.data, cfg.kd
    teacher_tokenizer = load_tokenizer(t.model, "teacher.model")  # pads with eos if it has none: padding is masked
    student_tokenizer = load_tokenizer(s.model, "student.model")
    vocab = {}  # each model's logits are compared over its own tokenizer's ids; embedding rows beyond are padding
    for key, path, tokenizer in (("teacher.model", t.model, teacher_tokenizer), ("student.model", s.model,
                                                                                  student_tokenizer)):
        if _embedding_rows(path) < len(tokenizer):
            raise DataError(f"{key}={path} embeds {_embedding_rows(path)} tokens but its tokenizer has "
                            f"{len(tokenizer)}; it was not trained with this tokenizer")
        vocab[key] = len(tokenizer)
    splits = load_splits(cfg)
    run_dir = prepare_output_dir(cfg, accelerator, inputs=[t.model, s.model])
    set_seed(cfg.seed)

    student_train, student_val, prompt_cfg = build_ni_datasets(d, splits, student_tokenizer, accelerator,
                                                               lambda m: say(f"student tokenizer, {m}"))
    teacher_train, teacher_val, _ = build_ni_datasets(d, splits, teacher_tokenizer, accelerator,
                                                      lambda m: say(f"teacher tokenizer, {m}"))
    student_train, teacher_train, dropped = pair_examples(student_train, teacher_train, "train")
    student_val, teacher_val, dropped_val = pair_examples(student_val, teacher_val, "held-out")
    say(f"ULD: {len(student_train)} training and {len(student_val)} held-out examples fit data.max_length with both "
        f"tokenizers ({dropped} and {dropped_val} dropped because one tokenization was too long)")
    source = CrossTokenizerBatches(student_train, student_val, cfg.train.micro_batch_size, cfg.train.grad_accum_steps,
                                   seed=cfg.seed, packing=d.packing, max_length=d.max_length,
                                   pad_id=student_tokenizer.pad_token_id,
                                   mask_mode=PACKED_ATTENTION[d.packed_attention],
                                   teacher_train=teacher_train, teacher_val=teacher_val,
                                   teacher_pad_id=teacher_tokenizer.pad_token_id)
    teacher_attn, why = attention_implementation(t.model, d.packed_attention)
    if d.packing:
        say(f"teacher {why}")
    teacher = load_teacher(t.model, resolve_dtype(t.dtype), t.quant, accelerator.device, teacher_attn)
    student = make_student(cfg, 0, d.max_length)  # an HF student: the vocabulary is its own
    say(f"student: {sum(p.numel() for p in student.parameters()):,} parameters "
        f"({sum(p.numel() for p in student.parameters() if p.requires_grad):,} trainable); teacher {t.model}; "
        f"cross-tokenizer ULD ({len(student_tokenizer)} vs {len(teacher_tokenizer)} tokens)")
    loss_fn = uld_loss_fn(teacher, kd.alpha, kd.temperature, vocab["student.model"], vocab["teacher.model"],
                          kd.chunk_size)
    result = Engine(cfg.train, run_dir, student, source, loss_fn=loss_fn, accelerator=accelerator, log=say,
                    rebuild=lambda: make_student(cfg, 0, d.max_length), run_config=cfg,
                    samples=sample_fn(student_tokenizer, RunData("ni", splits=splits, prompt_cfg=prompt_cfg), cfg.train.num_samples,
                                      cfg.compare.max_new_tokens, cfg.compare.batch_size)).fit()
    if accelerator.is_main_process:
        student = result.model  # unsharded (the same module unless FSDP trained it)
        student.eval()
        say(f"saved the student to {save_student(cfg, student, student_tokenizer, run_dir / 'student')}")
    accelerator.wait_for_everyone()
    return result
