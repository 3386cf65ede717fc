"""The native GPT: one readable decoder-only transformer covering GPT-1, GPT-2 and a modern layout.

Switches (all in GPTConfig):
  position        learned absolute table (GPT-1/2) | rope (rotary, Llama convention)
  norm            layernorm (with bias) | rmsnorm
  norm_placement  post: x = norm(x + f(x)), no final norm (GPT-1)
                  pre:  x = x + f(norm(x)), plus a final norm (GPT-2, Llama)
  mlp             gelu | swiglu;  activation: gelu_tanh (GPT-1/2) | gelu (exact erf)
  n_kv_head       fewer key/value heads than query heads (grouped-query attention)
  tie_embeddings  output projection shares the token embedding matrix

models/export.py maps the three supported combinations to OpenAIGPT, GPT-2 and Llama checkpoints.

Attention (chosen once per forward, shared by the blocks):
  neither mask     SDPA is_causal=True (pretraining windows, one example per row: the fast kernels)
  attention_mask   a 4D bool mask (B, 1, T, T), True = may attend: SDPA with attn_mask (dense packed rows)
  document_ids     (B, T) ints, one id per packed example: causal within an example, never across. On CUDA,
                   torch's flex_attention with a BlockMask (compiled once, lazily, as the torch docs require
                   for a fused kernel). torch 2.13's flex_attention has no backward on CPU, and its eager
                   form materializes the scores anyway, so on other devices the same mask is built densely
                   for SDPA (same result; FLEX_DEVICES lists where flex runs).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tune.models.config import PRESETS, GPTConfig, config_from_preset  # noqa: F401 - re-exported


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics, as Llama does, so exported and native logits agree under bf16 too
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_dim) in the rotate-half layout that HF Llama uses."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


FLEX_DEVICES = {"cuda"}  # device types where document_ids run through flex_attention (see the module docstring)
_compiled_flex = _compiled_block_mask = None  # torch.compile'd on first use on CUDA


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """flex_attention's BlockMask for packed rows: query q sees key k iff k <= q and both hold the same document id.
    document_ids (B, T) int on the attention's device."""
    def same_document_causal(b, h, q, k):
        return (q >= k) & (document_ids[b, q] == document_ids[b, k])

    global _compiled_block_mask
    B, T = document_ids.shape
    make = create_block_mask
    if document_ids.device.type == "cuda":  # compiled, it never materializes the (B, T, T) mask
        if _compiled_block_mask is None:
            _compiled_block_mask = torch.compile(create_block_mask)
        make = _compiled_block_mask
    return make(same_document_causal, B, None, T, T, device=document_ids.device)


def document_dense_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The same mask as document_block_mask, dense: (B, 1, T, T) bool, True = may attend."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]


def attend(q, k, v, mask, dropout_p: float, enable_gqa: bool):
    """Causal attention over (B, H, T, head_dim) tensors: mask None (causal), a 4D bool tensor or a BlockMask
    (flex_attention has no attention dropout: ValueError if dropout_p > 0)."""
    if isinstance(mask, BlockMask):
        global _compiled_flex
        if dropout_p:
            raise ValueError("flex_attention has no attention dropout; use a dense mask when training with dropout")
        flex = flex_attention
        if q.device.type == "cuda" and not torch.compiler.is_compiling():  # inside a compiled region: traced as is
            if _compiled_flex is None:
                _compiled_flex = torch.compile(flex_attention)
            flex = _compiled_flex
        return flex(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p,
                                          enable_gqa=enable_gqa)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)
        self.rope = config.position == "rope"

    def forward(self, x, rope=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0,
                   enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.gelu_approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        # swiglu: one matrix computes [gate; up] side by side
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden * (2 if self.swiglu else 1), bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm1, self.attn = make_norm(config), CausalSelfAttention(config)
        self.norm2, self.mlp = make_norm(config), MLP(config)

    def forward(self, x, rope=None, mask=None):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, mask))
        return self.norm2(x + self.mlp(x))


class GPT(nn.Module):
    _no_split_modules = ["Block"]  # what FSDP's transformer-based auto-wrap shards as a unit (as in HF models)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config) if config.norm_placement == "pre" else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        if config.position == "rope":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self):
        """Share the output matrix with the token embedding (HF's name: Accelerate calls it after moving
        a model to and from the meta device, which unties shared parameters)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd), before the output projection.

        position_ids (B, T) index the position table / rotary tables (default 0..T-1; packed rows restart them
        per example). document_ids (B, T) int keep packed examples apart (flex_attention on CUDA, else a dense
        mask; see the module docstring); attention_mask (B, 1, T, T) bool, True = may attend, does the same
        densely. With neither, attention is plainly causal. Only one of the two may be given (ValueError).
        """
        T = input_ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if document_ids is not None and attention_mask is not None:
            raise ValueError("pass document_ids or attention_mask, not both")
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.dtype != torch.bool):
            raise ValueError(f"the native GPT takes a 4D bool attention_mask (B, 1, T, T), got "
                             f"{attention_mask.dim()}D {attention_mask.dtype}")
        positions = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = None
        if self.config.position == "rope":
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if position_ids is not None:  # (B, T, head_dim) -> (B, 1, T, head_dim), broadcast over heads
                rope = (rope[0][:, None], rope[1][:, None])
        mask = attention_mask
        if document_ids is not None:
            # flex has no attention dropout: training with it takes the dense mask
            flex = document_ids.device.type in FLEX_DEVICES and not (self.training and self.config.dropout)
            mask = document_block_mask(document_ids) if flex else document_dense_mask(document_ids)
        for block in self.blocks:
            x = block(x, rope, mask)
        return self.norm_f(x) if self.norm_f is not None else x

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **_ignored) -> torch.Tensor:
        """Logits (B, T, vocab_size); the keyword arguments as in hidden_states, others (use_cache, ...) ignored."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, document_ids, attention_mask))

    def output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None):
        """Sample continuations; yields one (B, 1) tensor of new token ids per step."""
        from tune.generate import sample_next_token

        for _ in range(max_new_tokens):
            context = input_ids[:, -self.config.block_size:]
            logits = self(context)[:, -1, :]
            next_id = sample_next_token(logits, temperature, top_k, top_p)
            input_ids = torch.cat([input_ids, next_id], dim=1)
            yield next_id
            if eos_token_id is not None and bool((next_id == eos_token_id).all()):
                return


def describe(config: GPTConfig, model: GPT) -> str:
    """One line for logs: the architecture and its parameter count."""
    return (
        f"GPT {config.n_layer}L/{config.n_head}H/{config.n_embd}d ctx={config.block_size} vocab={config.vocab_size} "
        f"{config.position}/{config.norm}-{config.norm_placement}/{config.mlp}: "
        f"{model.num_parameters() / 1e6:.2f}M parameters"
    )


def with_vocab(config: GPTConfig, vocab_size: int) -> GPTConfig:
    return replace(config, vocab_size=vocab_size)
