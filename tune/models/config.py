"""GPTConfig and the presets of the native GPT (tune/models/gpt.py), without torch: validating a
config (`tune validate`) needs only these."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from tune.errors import ConfigError

_CHOICES = {
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_placement": ("pre", "post"),
    "mlp": ("gelu", "swiglu"),
    "activation": ("gelu_tanh", "gelu"),
}


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: same as n_head
    mlp_hidden: int | None = None  # None: 4*n_embd (gelu) or 8/3*n_embd rounded up to 64 (swiglu)
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"
    mlp: str = "gelu"
    activation: str = "gelu_tanh"  # of the GELU MLP: tanh approximation (GPT-1/2) or exact erf (faster on CPU)
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches
    # Mixture of Experts (0: dense). n_experts MLPs (each of mlp_hidden, the configured mlp kind) per MoE block, a
    # top-k softmax router with the chosen gates renormalised (Mixtral), dropless; every moe_every-th block is MoE
    n_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    router_aux_coef: float = 0.01  # Switch-Transformer load-balancing loss weight
    router_z_coef: float = 0.0  # ST-MoE router z-loss weight

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("model.position=rope needs an even head size (n_embd / n_head)")
        if self.n_experts < 0 or self.n_experts == 1:
            raise ConfigError(f"model.n_experts must be 0 (dense) or >= 2, got {self.n_experts}")
        if self.moe_top_k < 1 or (self.n_experts and self.moe_top_k > self.n_experts):
            limit = f", at most model.n_experts={self.n_experts}" if self.n_experts else ""
            raise ConfigError(f"model.moe_top_k must be >= 1{limit}, got {self.moe_top_k}")
        if self.moe_every < 1:
            raise ConfigError(f"model.moe_every must be >= 1, got {self.moe_every}")
        if self.n_experts and self.moe_every > self.n_layer:
            raise ConfigError(f"model.moe_every={self.moe_every} > model.n_layer={self.n_layer}: no block would be MoE; "
                              f"use moe_every <= {self.n_layer} (1: every block) or model.n_experts=0 for a dense model")
        if self.n_experts and self.moe_top_k == 1:
            # Mixtral's gates are renormalised over the chosen k: with k=1 the gate is always 1, so the router gets
            # no gradient from the language-model loss (Switch's top-1 uses the raw probability instead)
            raise ConfigError("model.moe_top_k=1: with gates renormalised over the chosen experts (Mixtral, which the "
                              "export matches) a top-1 gate is always 1 and the router learns from the balancing loss "
                              "alone; use moe_top_k >= 2")
        for name in ("router_aux_coef", "router_z_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


_TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=256)
_GPT1 = dict(position="learned", norm="layernorm", norm_placement="post", mlp="gelu", bias=True)
_GPT2 = dict(position="learned", norm="layernorm", norm_placement="pre", mlp="gelu", bias=True)
_MODERN = dict(position="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu", bias=False)

PRESETS: dict[str, dict] = {
    # GPT-1 (Radford et al. 2018): 12 x 768, 512 context, 40,478-token BPE vocabulary, dropout 0.1.
    "gpt1": dict(_GPT1, n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=40478, dropout=0.1),
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "modern": dict(_MODERN, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=2048, vocab_size=32000),
    "tiny-gpt1": dict(_GPT1, **_TINY),
    "tiny-gpt2": dict(_GPT2, **_TINY),
    "tiny-modern": dict(_MODERN, **_TINY, n_kv_head=2),
    # Mixtral-style: the modern layout with 8 SwiGLU experts per block, top-2 routing
    "moe": dict(_MODERN, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=2048, vocab_size=32000,
                n_experts=8, moe_top_k=2),
    "tiny-moe": dict(_MODERN, **_TINY, n_kv_head=2, n_experts=4, moe_top_k=2),
}


def config_from_preset(preset: str, **overrides) -> GPTConfig:
    """The preset's config with `overrides` (None values ignored) applied on top."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)}")
    valid = {f.name for f in fields(GPTConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ConfigError(f"unknown model option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return GPTConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


def hf_layout(config: GPTConfig) -> str:
    """Which HF architecture can hold this config exactly; a ConfigError naming the mismatch otherwise."""
    gpt_like = config.position == "learned" and config.norm == "layernorm" and config.mlp == "gelu" and config.bias
    llama_like = config.position == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu"
    if config.n_experts:
        mixtral = (("position", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"), ("norm_placement", "pre"),
                   ("bias", False), ("moe_every", 1))
        wrong = [f"{key}={getattr(config, key)}" for key, want in mixtral if getattr(config, key) != want]
        if not wrong:
            return "mixtral"
        raise ConfigError("an MoE model exports to HF Mixtral only (rope, rmsnorm, swiglu, pre-norm, no bias, experts in "
                          f"every block: moe_every=1); this one has {', '.join(wrong)}")
    if gpt_like and config.n_kv_head == config.n_head:
        if config.norm_placement == "pre":
            return "gpt2"
        if config.mlp_hidden == 4 * config.n_embd and config.tie_embeddings and config.activation == "gelu_tanh":
            return "openai-gpt"
    if llama_like and config.norm_placement == "pre" and not config.bias:
        return "llama"
    raise ConfigError(
        "this model combination has no standard HF layout: use learned/layernorm/gelu/bias (post-LN -> OpenAIGPT with "
        "tied embeddings, gelu_tanh and mlp_hidden=4*n_embd, pre-LN -> GPT-2) or rope/rmsnorm/swiglu/pre-norm without bias (Llama); "
        f"got {_layout_keys(config)}"
    )


def _layout_keys(config: GPTConfig) -> str:
    keys = ("position", "norm", "mlp", "activation", "norm_placement", "bias", "n_head", "n_kv_head", "tie_embeddings")
    return ", ".join(f"{key}={getattr(config, key)}" for key in keys)
