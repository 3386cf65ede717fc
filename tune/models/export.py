"""Native GPT <-> standard Hugging Face checkpoints (no remote code).

  post-LN, learned positions, LayerNorm, GELU  -> OpenAIGPTLMHeadModel ("openai-gpt")
  pre-LN,  learned positions, LayerNorm, GELU  -> GPT2LMHeadModel      ("gpt2")
  pre-norm, RoPE, RMSNorm, SwiGLU, no biases    -> LlamaForCausalLM     ("llama")
  the same with SwiGLU experts in every block   -> MixtralForCausalLM   ("mixtral")

Each layout is a table of (native name, HF name, how the tensor changes). GPT-1/2 store their
linear layers as Conv1D, i.e. transposed; the native fused qkv / gate-up matrices are split for Llama.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tune.errors import ConfigError, DataError
from tune.hf import quiet_third_party
from tune.models.config import hf_layout  # noqa: F401 - re-exported: callers import it from here
from tune.models.gpt import GPT, GPTConfig


def hf_config(config: GPTConfig, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """The transformers config object for the native config."""
    from transformers import GPT2Config, LlamaConfig, MixtralConfig, OpenAIGPTConfig

    layout = hf_layout(config)
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    drop = dict(resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout)
    if layout == "openai-gpt":
        return OpenAIGPTConfig(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                               n_layer=config.n_layer, n_head=config.n_head, afn="gelu",
                               layer_norm_epsilon=config.norm_eps, **drop, **ids)
    if layout == "gpt2":
        return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                          n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_hidden,
                          activation_function="gelu_new" if config.activation == "gelu_tanh" else "gelu",
                          layer_norm_epsilon=config.norm_eps,
                          tie_word_embeddings=config.tie_embeddings, **drop, **ids)
    if layout == "mixtral":
        return MixtralConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd,
                             intermediate_size=config.mlp_hidden, num_hidden_layers=config.n_layer,
                             num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                             max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                             rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                             num_local_experts=config.n_experts, num_experts_per_tok=config.moe_top_k,
                             router_aux_loss_coef=config.router_aux_coef, sliding_window=None,
                             attention_dropout=config.dropout, tie_word_embeddings=config.tie_embeddings,
                             hidden_act="silu", **ids)
    # Llama has no embedding/residual dropout; only attention dropout carries over.
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.mlp_hidden,
                       num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                       num_key_value_heads=config.n_kv_head, max_position_embeddings=config.block_size,
                       rms_norm_eps=config.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                       attention_bias=False, mlp_bias=False, attention_dropout=config.dropout,
                       tie_word_embeddings=config.tie_embeddings, hidden_act="silu", **ids)


def native_config_from_hf(hf) -> GPTConfig:
    """Read a transformers config of one of the three layouts back into a GPTConfig."""
    kind = hf.model_type
    if kind in ("gpt2", "openai-gpt"):
        act = hf.activation_function if kind == "gpt2" else "gelu_new"
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"GPT-2 checkpoint uses activation {act!r}; only GELU (tanh or exact) imports")
        if kind == "openai-gpt" and hf.afn != "gelu":
            raise ConfigError(f"OpenAIGPT checkpoint uses afn {hf.afn!r}; only 'gelu' imports")
        return GPTConfig(
            vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head,
            n_embd=hf.n_embd, mlp_hidden=getattr(hf, "n_inner", None) or 4 * hf.n_embd, position="learned",
            norm="layernorm", norm_eps=hf.layer_norm_epsilon, norm_placement="pre" if kind == "gpt2" else "post",
            mlp="gelu", activation="gelu" if act == "gelu" else "gelu_tanh", bias=True, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            dropout=hf.resid_pdrop,
        )
    if kind in ("llama", "mixtral"):
        name = kind.capitalize()
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False) or hf.hidden_act != "silu":
            raise ConfigError(f"{name} checkpoint with biases or a non-SiLU activation cannot be imported")
        rope = hf.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{name} checkpoint uses rope_type {rope.get('rope_type')!r}; only 'default' imports")
        if getattr(hf, "sliding_window", None):
            raise ConfigError(f"{name} checkpoint with a sliding window cannot be imported")
        if getattr(hf, "head_dim", None) not in (None, hf.hidden_size // hf.num_attention_heads):
            raise ConfigError(f"{name} checkpoint with head_dim != hidden_size / num_attention_heads cannot be imported")
        experts = dict(n_experts=hf.num_local_experts, moe_top_k=hf.num_experts_per_tok,
                       router_aux_coef=hf.router_aux_loss_coef) if kind == "mixtral" else {}
        return GPTConfig(
            vocab_size=hf.vocab_size, block_size=hf.max_position_embeddings, n_layer=hf.num_hidden_layers,
            n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads, n_embd=hf.hidden_size,
            mlp_hidden=hf.intermediate_size, position="rope", rope_theta=rope.get("rope_theta", 10000.0),
            norm="rmsnorm", norm_eps=hf.rms_norm_eps, norm_placement="pre", mlp="swiglu", bias=False,
            tie_embeddings=bool(hf.tie_word_embeddings), dropout=hf.attention_dropout, **experts,
        )
    raise ConfigError(f"cannot import model_type {kind!r} into the native GPT; supported: gpt2, openai-gpt, llama, "
                      "mixtral")


def _name_map(config: GPTConfig) -> list[tuple[str, str]]:
    """(native name, HF name) pairs; split/transposed tensors are handled in _to_hf/_from_hf."""
    layout = hf_layout(config)
    pairs = []
    if layout in ("gpt2", "openai-gpt"):
        t = "transformer"
        emb, pos = ("wte", "wpe") if layout == "gpt2" else ("tokens_embed", "positions_embed")
        pairs += [("tok_emb.weight", f"{t}.{emb}.weight"), ("pos_emb.weight", f"{t}.{pos}.weight")]
        for i in range(config.n_layer):
            n, h = f"blocks.{i}", f"{t}.h.{i}"
            for native, hf in [("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"),
                               ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
                pairs += [(f"{n}.{native}.weight", f"{h}.{hf}.weight"), (f"{n}.{native}.bias", f"{h}.{hf}.bias")]
        if layout == "gpt2":
            pairs += [("norm_f.weight", f"{t}.ln_f.weight"), ("norm_f.bias", f"{t}.ln_f.bias")]
    else:
        pairs += [("tok_emb.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
        for i in range(config.n_layer):
            n, h = f"blocks.{i}", f"model.layers.{i}"
            pairs += [(f"{n}.norm1.weight", f"{h}.input_layernorm.weight"),
                      (f"{n}.norm2.weight", f"{h}.post_attention_layernorm.weight"),
                      (f"{n}.attn.proj.weight", f"{h}.self_attn.o_proj.weight")]
            if layout == "mixtral":  # stacked experts: the same (E, out, in) layout and [gate; up] order as ours
                pairs += [(f"{n}.mlp.router.weight", f"{h}.mlp.gate.weight"),
                          (f"{n}.mlp.fc", f"{h}.mlp.experts.gate_up_proj"),
                          (f"{n}.mlp.proj", f"{h}.mlp.experts.down_proj")]
            else:
                pairs.append((f"{n}.mlp.proj.weight", f"{h}.mlp.down_proj.weight"))
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The native weights under HF names and shapes (tied output weight omitted when tied)."""
    config, sd = model.config, model.state_dict()
    layout = hf_layout(config)
    conv1d = layout in ("gpt2", "openai-gpt")
    out = {}
    for native, hf in _name_map(config):
        w = sd[native]
        out[hf] = w.t().contiguous() if conv1d and w.ndim == 2 and native.startswith("blocks.") else w.clone()
    if layout in ("llama", "mixtral"):
        q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        for i in range(config.n_layer):
            qw, kw, vw = sd[f"blocks.{i}.attn.qkv.weight"].split([q, kv, kv])
            h = f"model.layers.{i}"
            out.update({f"{h}.self_attn.q_proj.weight": qw.clone(), f"{h}.self_attn.k_proj.weight": kw.clone(),
                        f"{h}.self_attn.v_proj.weight": vw.clone()})
            if layout == "llama":
                gate, up = sd[f"blocks.{i}.mlp.fc.weight"].chunk(2)
                out.update({f"{h}.mlp.gate_proj.weight": gate.clone(), f"{h}.mlp.up_proj.weight": up.clone()})
    return out


def from_hf_state_dict(config: GPTConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict."""
    layout = hf_layout(config)
    conv1d = layout in ("gpt2", "openai-gpt")
    sd = {}
    for native, hf in _name_map(config):
        if hf not in hf_sd:
            raise DataError(f"checkpoint is missing tensor {hf!r} expected for a {layout} model")
        w = hf_sd[hf]
        sd[native] = w.t().contiguous() if conv1d and w.ndim == 2 and native.startswith("blocks.") else w
    if layout in ("llama", "mixtral"):
        for i in range(config.n_layer):
            h = f"model.layers.{i}"
            sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
                [hf_sd[f"{h}.self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
            if layout == "llama":
                sd[f"blocks.{i}.mlp.fc.weight"] = torch.cat([hf_sd[f"{h}.mlp.gate_proj.weight"],
                                                             hf_sd[f"{h}.mlp.up_proj.weight"]], dim=0)
    if config.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


def export_hf(model: GPT, out_dir, tokenizer=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` (and its tokenizer) as a standard HF checkpoint that AutoModelForCausalLM loads."""
    out_dir = Path(out_dir)
    hf_model = to_hf_model(model, tokenizer, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_third_party():
        hf_model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "native_gpt.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    return out_dir


def to_hf_model(model: GPT, tokenizer=None, dtype: torch.dtype = torch.float32):
    """The HF causal LM (on the CPU, in `dtype`) holding a copy of `model`'s weights, the special token ids of
    `tokenizer` in its config; `model` itself is left as it is (device, training mode)."""
    from transformers import AutoModelForCausalLM

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = hf_config(model.config, **ids)
    config.dtype = dtype
    hf_model = AutoModelForCausalLM.from_config(config)
    weights = {k: v.detach().cpu() for k, v in to_hf_state_dict(model).items()}  # copies (to_hf_state_dict clones)
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing={missing} unexpected={unexpected}")
    hf_model.tie_weights()
    return hf_model.to(dtype)


def import_hf(model_dir) -> GPT:
    """Load an HF GPT-2 / OpenAIGPT / Llama checkpoint into the native module (for continued pretraining)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: no config.json; expected an HF model directory (e.g. a pretrain export)")
    with quiet_third_party():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    config = native_config_from_hf(AutoConfig.from_pretrained(model_dir, trust_remote_code=False))
    model = GPT(config)
    model.load_state_dict(from_hf_state_dict(config, hf.state_dict()), strict=True)
    return model
