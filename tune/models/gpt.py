"""The native GPT: one readable decoder-only transformer covering GPT-1, GPT-2 and a modern layout.

Switches (all in GPTConfig):
  position        learned absolute table (GPT-1/2) | rope (rotary, Llama convention)
  norm            layernorm (with bias) | rmsnorm
  norm_placement  post: x = norm(x + f(x)), no final norm (GPT-1)
                  pre:  x = x + f(norm(x)), plus a final norm (GPT-2, Llama)
  mlp             gelu | swiglu;  activation: gelu_tanh (GPT-1/2) | gelu (exact erf)
  n_kv_head       fewer key/value heads than query heads (grouped-query attention)
  tie_embeddings  output projection shares the token embedding matrix

models/export.py maps the supported combinations to OpenAIGPT, GPT-2, Llama and (MoE) Mixtral checkpoints.

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
import torch.utils.checkpoint
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

    def forward(self, x, rope=None, mask=None, cache=None):
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
        if cache is not None:  # generation: cache = [k, v] of the earlier positions (None at first), extended here
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
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


class MoE(nn.Module):
    """Mixture of Experts in place of the MLP (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral,
    Jiang et al. 2024): a linear router scores the n_experts experts per token, the top-k are kept and their softmax
    probabilities renormalised to sum to 1 (Mixtral's gates), and the token's output is the gate-weighted sum of those
    experts' MLPs (each an MLP of mlp_hidden, SwiGLU or GELU as the config says). Dropless: no capacity limit, every
    token reaches all k of its experts.

    Dispatch: the N·k (token, expert) assignments are sorted by expert, and each expert runs one matmul on its
    contiguous slice of tokens (gather, expert MLP, gate-weighted index_add back): a loop over experts, never over
    tokens, so the work is N·k expert-MLP rows whatever n_experts is (plus an O(N·k log N·k) sort).

    After each forward: `aux_loss`, the load-balancing loss n_experts · Σ_i f_i · P_i with f_i the fraction of tokens
    that have expert i among their top k (Σ_i f_i = k) and P_i the mean router probability of expert i (the Switch
    loss; for k > 1 the form of transformers' load_balancing_loss_func, per layer; k at perfect balance);
    `z_loss`, the router z-loss mean(logsumexp(logits)²) (ST-MoE, Zoph et al. 2022); `expert_fraction` (n_experts,),
    the share of the N·k assignments each expert got (1/n_experts each when balanced).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        E, d, h = config.n_experts, config.n_embd, config.mlp_hidden
        self.n_experts, self.top_k = E, config.moe_top_k
        self.swiglu = config.mlp == "swiglu"
        self.gelu_approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.router = nn.Linear(d, E, bias=False)
        # experts' weights stacked, nn.Linear layout (out x in): fc is [gate; up] for SwiGLU
        self.fc = nn.Parameter(torch.empty(E, h * (2 if self.swiglu else 1), d))
        self.proj = nn.Parameter(torch.empty(E, d, h))
        self.fc_bias = nn.Parameter(torch.zeros(E, self.fc.shape[1])) if config.bias else None
        self.proj_bias = nn.Parameter(torch.zeros(E, d)) if config.bias else None
        nn.init.normal_(self.fc, std=0.02)
        nn.init.normal_(self.proj, std=0.02 / math.sqrt(2 * config.n_layer))  # GPT-2's scaled residual init
        self.drop = nn.Dropout(config.dropout)
        self.aux_loss = self.z_loss = self.expert_fraction = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E) in fp32, and each token's k experts (N, k) with their renormalised gates (N, k)."""
        logits = self.router(x).float()
        top, experts = logits.softmax(-1).topk(self.top_k, dim=-1)
        return logits, experts, top / top.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d), N = B·T tokens
        logits, experts, gates = self.route(x)  # (N, E), (N, k), (N, k)
        out, counts = self.dispatch(x, experts, gates)  # (N, d), (E,)
        n_tokens = x.shape[0]
        fraction = counts.float() / n_tokens  # f_i: tokens with expert i among their top k
        probs = logits.softmax(-1)
        self.aux_loss = self.n_experts * (fraction * probs.mean(0)).sum()
        self.z_loss = logits.logsumexp(-1).pow(2).mean()
        self.expert_fraction = (fraction / self.top_k).detach()
        return self.drop(out.view(shape))

    # Eager under torch.compile (train.compile compiles each block): the tokens per expert change every step, so a
    # compiled dispatch would recompile per step until dynamo's recompile limit; attention and the router compile.
    @torch.compiler.disable
    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over each token's k experts of gate · expert_MLP(x): x (N, d), experts and gates (N, k) -> (N, d), and
        the assignments per expert (E,)."""
        flat = experts.flatten()  # (N*k,): assignment a is token a // k
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        out = None
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            assignments = order[start:start + n]
            start += n
            tokens = assignments // self.top_k
            h = F.linear(x[tokens], self.fc[e], None if self.fc_bias is None else self.fc_bias[e])
            if self.swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h, approximate=self.gelu_approximate)
            y = F.linear(h, self.proj[e], None if self.proj_bias is None else self.proj_bias[e])
            y = y * gates.flatten()[assignments, None].to(y.dtype)
            if out is None:
                out = torch.zeros_like(x, dtype=y.dtype)
            out = out.index_add(0, tokens, y)
        return out, counts


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm1, self.attn = make_norm(config), CausalSelfAttention(config)
        moe = config.n_experts > 0 and layer % config.moe_every == config.moe_every - 1
        self.norm2, self.mlp = make_norm(config), (MoE(config) if moe else MLP(config))

    def forward(self, x, rope=None, mask=None, cache=None):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, mask, cache)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, mask, cache))
        return self.norm2(x + self.mlp(x))


class GPT(nn.Module):
    _no_split_modules = ["Block"]  # what FSDP's transformer-based auto-wrap shards as a unit (as in HF models)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # train.gradient_checkpointing: see gradient_checkpointing_enable
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        """Keep only each block's input in training and recompute the block in the backward pass (torch's
        non-reentrant activation checkpointing; dropout masks are replayed from the saved RNG state), as
        transformers' method of this name does: activation memory of n_layer block inputs plus one block."""
        self.activation_checkpointing = True
        self._checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

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

    def num_active_parameters(self) -> int:
        """Parameters a token passes through: every parameter except the experts it is not routed to (an MoE layer's
        experts count top_k / n_experts); num_parameters() for a dense model."""
        inactive = sum(sum(p.numel() for p in (m.fc, m.proj, m.fc_bias, m.proj_bias) if p is not None)
                       * (m.n_experts - m.top_k) / m.n_experts for m in self.moe_layers())
        return self.num_parameters() - int(inactive)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, kv_cache: list | None = None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd), before the output projection.

        position_ids (B, T) index the position table / rotary tables (default 0..T-1; packed rows restart them
        per example). document_ids (B, T) int keep packed examples apart (flex_attention on CUDA, else a dense
        mask; see the module docstring); attention_mask (B, 1, T, T) bool, True = may attend, does the same
        densely. With neither, attention is plainly causal. Only one of the two may be given (ValueError).
        kv_cache (generation, tune.generate.sample_completions): one [k, v] list per block holding the S earlier
        positions' keys and values, extended in place; the input then continues those positions, and attention_mask
        (B, 1, T, S + T) and position_ids are required.
        """
        T = input_ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if document_ids is not None and attention_mask is not None:
            raise ValueError("pass document_ids or attention_mask, not both")
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.dtype != torch.bool):
            raise ValueError(f"the native GPT takes a 4D bool attention_mask (B, 1, T, T), got "
                             f"{attention_mask.dim()}D {attention_mask.dtype}")
        if kv_cache is not None and (attention_mask is None or position_ids is None):
            raise ValueError("kv_cache needs attention_mask (B, 1, T, S + T) and position_ids")
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
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, **self._checkpoint_kwargs)
            else:
                x = block(x, rope, mask, None if kv_cache is None else kv_cache[i])
        return self.norm_f(x) if self.norm_f is not None else x

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **_ignored) -> torch.Tensor:
        """Logits (B, T, vocab_size); the keyword arguments as in hidden_states, others (use_cache, ...) ignored."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, document_ids, attention_mask))

    def output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def router_losses(self) -> dict[str, torch.Tensor] | None:
        """After a forward: the load-balancing loss and z-loss averaged over the MoE layers, each expert's share of
        the assignments averaged over them (`expert_fraction` (n_experts,)) and the config's weights for the two
        losses (`aux_coef`, `z_coef`); None for a dense model."""
        layers = self.moe_layers()
        if not layers or layers[0].aux_loss is None:
            return None
        return {"aux": torch.stack([m.aux_loss for m in layers]).mean(),
                "z": torch.stack([m.z_loss for m in layers]).mean(),
                "expert_fraction": torch.stack([m.expert_fraction for m in layers]).mean(0),
                "aux_coef": self.config.router_aux_coef, "z_coef": self.config.router_z_coef}

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
        f"{config.position}/{config.norm}-{config.norm_placement}/{config.mlp}"
        + (f", MoE {config.n_experts} experts top-{config.moe_top_k}" if config.n_experts else "")
        + f": {model.num_parameters() / 1e6:.2f}M parameters"
        + (f" ({model.num_active_parameters() / 1e6:.2f}M active per token)" if config.n_experts else "")
    )


def with_vocab(config: GPTConfig, vocab_size: int) -> GPTConfig:
    return replace(config, vocab_size=vocab_size)
