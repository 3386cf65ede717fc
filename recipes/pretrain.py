"""Pretrain a native GPT on a text corpus, sample from it, and export a standard HF checkpoint.

    tune run pretrain --config shakespeare_char_cpu [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tune.config import os_errors_as_config_errors
from tune.train_config import TrainConfig


@dataclass
class ModelSection:
    preset: str = "tiny-gpt2"  # gpt1 | gpt2-124m | modern | moe | tiny-gpt1 | tiny-gpt2 | tiny-modern | tiny-moe
    init_from: str | None = None  # an HF GPT-2 / OpenAIGPT / Llama / Mixtral directory to continue pretraining
    block_size: int | None = None  # the keys below override the preset when set
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    n_embd: int | None = None
    mlp_hidden: int | None = None
    dropout: float | None = None
    activation: str | None = None  # gelu_tanh (GPT-1/2) | gelu (exact; faster on CPU, exports to GPT-2)
    tie_embeddings: bool | None = None
    rope_theta: float | None = None
    n_experts: int | None = None  # Mixture of Experts: experts per MoE block (0: dense); see tune.models.gpt.MoE
    moe_top_k: int | None = None  # experts per token
    moe_every: int | None = None  # every k-th block is MoE (HF export: 1)
    router_aux_coef: float | None = None  # load-balancing loss weight
    router_z_coef: float | None = None  # router z-loss weight

    def __post_init__(self):
        from tune.config import check_ranges

        check_ranges("model.", self, {"block_size": ">= 1", "n_layer": ">= 1", "n_head": ">= 1", "n_kv_head": ">= 1",
                                      "n_embd": ">= 1", "mlp_hidden": ">= 1", "dropout": "[0, 1)", "rope_theta": "> 0",
                                      "n_experts": ">= 0", "moe_top_k": ">= 1", "moe_every": ">= 1",
                                      "router_aux_coef": ">= 0", "router_z_coef": ">= 0"})
        if self.init_from is None:  # the preset and its overrides make a valid model (errors name the file)
            self.native_config()

    def native_config(self, vocab_size: int | None = None):
        """The preset with this section's overrides (ConfigError on a bad combination)."""
        from tune.models.config import config_from_preset

        return config_from_preset(self.preset, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                                  n_kv_head=self.n_kv_head, n_embd=self.n_embd, mlp_hidden=self.mlp_hidden,
                                  dropout=self.dropout, activation=self.activation,
                                  tie_embeddings=self.tie_embeddings, rope_theta=self.rope_theta,
                                  n_experts=self.n_experts, moe_top_k=self.moe_top_k, moe_every=self.moe_every,
                                  router_aux_coef=self.router_aux_coef, router_z_coef=self.router_z_coef,
                                  vocab_size=vocab_size)


@dataclass
class TextDataSection:
    corpus: str | list[str] = "builtin:demo"  # .txt file(s), a directory of them, or builtin:demo
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int | None = None  # bpe only: target vocabulary size (GPT-1: 40,000 merges)
    tokenizer_path: str | None = None  # reuse an existing HF tokenizer directory instead of training one
    val_fraction: float = 0.1
    cache_dir: str = ".cache/text"


@dataclass
class SampleSection:
    prompt: str = "\n"
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None


@dataclass
class PretrainConfig:
    recipe: Literal["pretrain"] = "pretrain"
    output_dir: str = "runs/pretrain"
    seed: int = 1337
    overwrite: bool = False  # allow starting afresh in an output_dir that holds checkpoints
    export: bool = True  # write an HF checkpoint + tokenizer to output_dir/hf at the end
    model: ModelSection = field(default_factory=ModelSection)
    data: TextDataSection = field(default_factory=TextDataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleSection = field(default_factory=SampleSection)


CONFIG_CLASS = PretrainConfig


def corpus_paths(data: TextDataSection) -> list[str] | str:
    """Resolve builtin:demo to a generated file; other entries are passed through."""
    from data_prep.demo import write_demo_corpus

    items = data.corpus if isinstance(data.corpus, list) else [data.corpus]
    resolved = [str(write_demo_corpus(Path(data.cache_dir) / "builtin")) if c == "builtin:demo" else c for c in items]
    return resolved if isinstance(data.corpus, list) else resolved[0]


SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "tie_embeddings", "rope_theta", "activation",
              "n_experts", "moe_top_k", "moe_every")


def init_from_shape(hf_config: dict) -> dict:
    """The native shape (SHAPE_KEYS, plus `block_size` and `position`) of an HF model's config.json, read as JSON
    (no torch), with transformers' defaults for absent keys; a key that does not apply to the layout (rope_theta
    of a GPT-2, activation of a Llama) is None. Mirrors tune.models.export.native_config_from_hf."""
    c = hf_config
    kind = c.get("model_type")
    if kind in ("llama", "mixtral"):
        heads = c.get("num_attention_heads", 32)
        rope = c.get("rope_parameters") or {}
        experts = {"n_experts": c.get("num_local_experts", 8), "moe_top_k": c.get("num_experts_per_tok", 2),
                   "moe_every": 1} if kind == "mixtral" else {"n_experts": 0, "moe_top_k": None, "moe_every": None}
        return {**experts, "n_layer": c.get("num_hidden_layers", 32), "n_head": heads,
                "n_kv_head": c.get("num_key_value_heads") or heads, "n_embd": c.get("hidden_size", 4096),
                "mlp_hidden": c.get("intermediate_size", 14336 if kind == "mixtral" else 11008),  # HF defaults
                "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
                "rope_theta": rope.get("rope_theta", c.get("rope_theta", 10000.0)), "activation": None,
                "block_size": c.get("max_position_embeddings", 2048), "position": "rope"}
    n_embd = c.get("n_embd", 768)
    heads = c.get("n_head", 12)
    activation = "gelu" if kind == "gpt2" and c.get("activation_function", "gelu_new") == "gelu" else "gelu_tanh"
    return {"n_experts": 0, "moe_top_k": None, "moe_every": None, "n_layer": c.get("n_layer", 12), "n_head": heads, "n_kv_head": heads,
            "n_embd": n_embd,
            "mlp_hidden": c.get("n_inner") or 4 * n_embd, "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
            "rope_theta": None, "activation": activation,
            "block_size": c.get("n_positions", 1024 if kind == "gpt2" else 512),
            "position": "learned"}


def init_from_problems(m: ModelSection, shape: dict) -> list[str]:
    """One line per model.* key that would change the shape of init_from (its own value, or a key that does not
    apply to its layout, passes: a preset's n_layer equal to the checkpoint's is no change), and for a block_size
    larger than its learned position table."""
    problems = []
    for key in SHAPE_KEYS:
        value, own = getattr(m, key), shape[key]
        if value is not None and own is not None and value != own:
            problems.append(f"model.{key}={value} would change the shape of init_from={m.init_from} (its {key} is "
                            f"{own}); set model.{key}={own} or model.{key}=null")
    if m.block_size is not None and shape["position"] == "learned" and m.block_size > shape["block_size"]:
        problems.append(f"model.block_size={m.block_size} is larger than the position table ({shape['block_size']}) "
                        f"of init_from={m.init_from}; use block_size <= {shape['block_size']}")
    return problems


def load_init_checkpoint(cfg: PretrainConfig):
    """The native model imported from model.init_from, with block_size and dropout checked/applied and the router
    loss weights (training settings, not shape: HF Mixtral keeps router_aux_loss_coef and no z-loss) set when given."""
    from tune.errors import ConfigError
    from tune.hf import read_model_config
    from tune.models.export import import_hf

    m = cfg.model
    problems = init_from_problems(m, init_from_shape(read_model_config(m.init_from)))
    if problems:
        raise ConfigError(problems[0])
    model = import_hf(m.init_from)
    for key in ("router_aux_coef", "router_z_coef"):
        if getattr(m, key) is not None:
            setattr(model.config, key, getattr(m, key))
    if m.dropout is not None:
        import torch

        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = m.dropout
        model.config.dropout = m.dropout
        for block in model.blocks:
            block.attn.dropout = m.dropout
    return model


def model_config(cfg: PretrainConfig, vocab_size: int | None = None):
    """The preset with the config's overrides (validated; raises ConfigError on a bad combination)."""
    return cfg.model.native_config(vocab_size)


def run(cfg: PretrainConfig):
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from data_prep.text import prepare_text_corpus
    from tune.data import TokenWindows
    from tune.engine import Engine, check_train_device, make_accelerator
    from tune.errors import ConfigError
    from tune.hf import unknown_token_warning
    from tune.models.export import export_hf
    from tune.models.gpt import GPT, describe
    from tune.recipe_utils import prepare_output_dir, sample_text

    validate(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.num_threads)
    check_train_device(cfg.train, accelerator.device)  # before the output directory is touched
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    run_dir = prepare_output_dir(cfg, accelerator, inputs=[cfg.model.init_from, cfg.data.tokenizer_path])
    set_seed(cfg.seed)

    if cfg.model.init_from:
        model = load_init_checkpoint(cfg)
        block_size = cfg.model.block_size or model.config.block_size
    else:
        block_size = model_config(cfg).block_size  # validates preset and overrides before any data work
    with accelerator.main_process_first():
        data = prepare_text_corpus(corpus_paths(cfg.data), cfg.data.cache_dir, tokenizer=cfg.data.tokenizer,
                                   vocab_size=cfg.data.vocab_size, val_fraction=cfg.data.val_fraction,
                                   min_tokens=block_size + 1, tokenizer_path=cfg.data.tokenizer_path)
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir, trust_remote_code=False)
    tokenizer_name = cfg.data.tokenizer_path or cfg.data.tokenizer
    say(f"data: {data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens, vocab {data.vocab_size} "
        f"({tokenizer_name}), " + (f"{data.unknown_rate:.2%} unknown tokens, " if data.unknown_tokens is not None else "")
        + f"cache {data.out_dir}")
    warning = unknown_token_warning(data.unknown_rate, tokenizer_name)
    if warning:
        say(warning)
    if cfg.model.init_from:
        if model.config.vocab_size < data.vocab_size:
            raise ConfigError(f"init_from={cfg.model.init_from} has vocab_size {model.config.vocab_size} but the "
                              f"tokenizer has {data.vocab_size} tokens; set data.tokenizer_path={cfg.model.init_from}")
        rebuild = lambda: load_init_checkpoint(cfg)  # noqa: E731
    else:
        rebuild = lambda: GPT(model_config(cfg, data.vocab_size))  # noqa: E731
        model = rebuild()
    say(describe(model.config, model))

    source = TokenWindows(data.train_tokens(), data.val_tokens(), block_size, cfg.train.micro_batch_size,
                          cfg.train.grad_accum_steps, cfg.seed)
    if accelerator.is_main_process:  # with the run, so `tune export` can turn any checkpoint into an HF model
        from tune.run_lock import lock_run_dir

        lock_run_dir(run_dir)  # before the first write into a new run directory (Engine.fit keeps holding it)
        tokenizer.save_pretrained(run_dir / "tokenizer")
    result = Engine(cfg.train, run_dir, model, source, accelerator=accelerator, log=say, rebuild=rebuild,
                    run_config=cfg).fit()

    if accelerator.is_main_process:
        model = result.model  # unsharded (the same module unless FSDP trained it)
        model.eval()
        samples = sample_text(model, tokenizer, cfg.sample, accelerator.device)
        (run_dir / "samples.txt").write_text("\n\n---\n\n".join(samples), encoding="utf-8")
        if cfg.export:
            out = export_hf(model.cpu(), run_dir / "hf", tokenizer)
            say(f"exported HF checkpoint to {out} (AutoModelForCausalLM.from_pretrained loads it)")
    accelerator.wait_for_everyone()
    return result


def export_checkpoint(cfg: PretrainConfig, run_dir: Path, checkpoint: Path, out: Path) -> Path:
    """One checkpoint of a pretraining run as an HF checkpoint, as the end of the run exports it."""
    from transformers import AutoTokenizer

    from tune.engine import checkpoint_tensor_shape, read_checkpoint_weights
    from tune.errors import ConfigError
    from tune.models.export import export_hf
    from tune.models.gpt import GPT

    if not (run_dir / "tokenizer").is_dir():
        raise ConfigError(f"{run_dir}/tokenizer is missing (runs before `tune export` existed did not keep it); "
                          "copy the tokenizer directory from the data cache there")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer", trust_remote_code=False)
    if cfg.model.init_from:
        model = load_init_checkpoint(cfg)
    else:
        model = GPT(model_config(cfg, checkpoint_tensor_shape(checkpoint, "tok_emb.weight")[0]))
    model.load_state_dict(read_checkpoint_weights(checkpoint, model), strict=False)
    return export_hf(model.eval(), out, tokenizer)


@os_errors_as_config_errors
def validate(cfg: PretrainConfig) -> None:
    """Cheap checks run by `tune validate` and before any heavy work; every problem in one ConfigError."""
    from tune.config import SEED_RANGE, range_problems
    from tune.errors import Problems
    from tune.hf import check_model_dir, check_no_custom_code, read_model_config
    from tune.recipe_utils import check_file_free_dir, check_output_dir, empty_path_problems

    problems = Problems()
    problems.extend((*empty_path_problems(cfg, ["output_dir", "data.corpus", "data.cache_dir",
                                                "data.tokenizer_path", "model.init_from"]),
                     *check_file_free_dir("data.cache_dir", cfg.data.cache_dir)))
    corpus = [c for c in (cfg.data.corpus if isinstance(cfg.data.corpus, list) else [cfg.data.corpus])
              if c != "builtin:demo"]
    problems.extend(check_output_dir(cfg.output_dir, {"data.corpus": corpus, "model.init_from": cfg.model.init_from,
                                                      "data.tokenizer_path": cfg.data.tokenizer_path}))
    if cfg.export and cfg.model.init_from is None:  # the end of the run writes an HF checkpoint: its layout must exist
        from tune.models.config import hf_layout  # without torch: tune validate stays light

        config = problems.call(cfg.model.native_config)
        if config is not None and problems.call(hf_layout, config) is None:
            problems.errors[-1] = type(problems.errors[-1])(f"{problems.errors[-1]}; or set export=false")
    if cfg.model.init_from is not None and cfg.model.init_from.strip() and \
            problems.call(check_model_dir, cfg.model.init_from, "model.init_from") is not None:
        problems.extend(init_from_problems(cfg.model, init_from_shape(read_model_config(cfg.model.init_from))))
    items = cfg.data.corpus if isinstance(cfg.data.corpus, list) else [cfg.data.corpus]
    for item in items:
        if item != "builtin:demo" and not Path(item).exists():
            problems.add(f"data.corpus: {item} does not exist (paths are relative to where you run tune)")
    if cfg.data.tokenizer_path and not Path(cfg.data.tokenizer_path).is_dir():
        problems.add(f"data.tokenizer_path={cfg.data.tokenizer_path} is not a directory")
    elif cfg.data.tokenizer_path:
        problems.call(check_no_custom_code, cfg.data.tokenizer_path, "data.tokenizer_path")
    if cfg.data.tokenizer == "bpe" and cfg.data.vocab_size is None and not cfg.data.tokenizer_path:
        problems.add("data.vocab_size is required with data.tokenizer=bpe (e.g. 40000 as in GPT-1)")
    problems.extend((*range_problems("", cfg, {"seed": SEED_RANGE}),
                     *range_problems("data.", cfg.data, {"vocab_size": ">= 1", "val_fraction": "(0, 1)"}),
                     *range_problems("sample.", cfg.sample, {"num_samples": ">= 0", "max_new_tokens": ">= 1",
                                                             "temperature": ">= 0", "top_k": ">= 0",
                                                             "top_p": "(0, 1]"})))
    problems.raise_if_any()
