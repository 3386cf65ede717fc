"""`tune plan`: parameters, compute and memory of a recipe config, without loading weights or touching data.

Everything here is a pure function of numbers read from the config (a native preset, or an HF config.json read as
JSON): no torch, no weights. Only a config.json of a model_type without an analytic formula below (not llama,
mistral, qwen2, gpt2, openai-gpt, mixtral) builds the architecture on torch's meta device (shapes, no storage) to
count its parameters.

Units are in the names: `_bytes`, `_s`, `_flops`, `tokens_per_step`. Memory is per process. The formulas and
their sources:

  parameters      counted layer by layer from the shapes (tests: exact against the built models)
  FLOPs / token   6·N + 12·L·T·d_attn (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu);
                  Kaplan et al. 2020 (Table 1) count the context term 2·L·T·d_attn per forward token (6·L·T·d_attn
                  to train), half of PaLM's; we keep PaLM's convention, which MFU figures (and bench/) use
  compute         C ≈ 6·N·D (Kaplan et al. 2020, section 2.1); Chinchilla-optimal D ≈ 20·N (Hoffmann et al.
                  2022, Table 3: 1B parameters -> 20.2B tokens, 10B -> 205B)
  peak            weights + optimizer (+ teacher) + the larger of the forward's end (activations + loss chunk)
                  and the backward's (gradients; with checkpointing one recomputed block): MemoryPlan.peak_bytes
  activations     the tensors autograd saves for the backward pass, per layer and token (Korthikanti et al. 2022,
                  "Reducing Activation Recomputation in Large Transformer Models", section 4.1), re-derived for
                  what OUR code keeps: SDPA / flash attention (no T×T scores), the fused chunked cross-entropy of
                  tune/losses.py (one chunk of logits at a time, never (B, T, V)), frozen linears that keep no
                  input (LoRA), peft's dropout copies; checked against torch's saved-tensor hooks in
                  tests/test_plan.py and against measured peaks in bench/bench_plan.py
  bitsandbytes    nf4: 4 bits per weight, one absmax per 64 weights (fp32, or uint8 with double quantisation
                  plus one fp32 per 256 absmax; Dettmers et al. 2023, QLoRA, section 3); int8 (LLM.int8(),
                  Dettmers et al. 2022): 1 byte per weight plus one fp32 scale per output row
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from tune.errors import ConfigError, DataError

GB = 10 ** 9  # "what fits" answers in decimal gigabytes, as model cards and GPU data sheets state sizes
GIB = 2 ** 30  # memory tables in GiB, as torch.cuda and nvidia-smi report memory

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,  # SXM
    "H100": 989.0,  # SXM5; the PCIe card is H100-PCIe
    "H100-PCIe": 756.0,
    "A100": 312.0,  # SXM and PCIe alike
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX4090": 165.0,  # with fp32 accumulation
    "V100": 125.0,  # fp16 (V100 has no bf16)
}

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022
DEFAULT_MFU = 0.4

# bytes per element
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize (transformers' BitsAndBytesConfig default)
NESTED_BLOCK = 256  # blocksize of the double quantisation of the absmax values


# -- the model's shape ----------------------------------------------------------------------------------------
@dataclass
class Linear:
    """One linear layer of a transformer block: name as peft matches it (the module's last name)."""
    name: str
    in_features: int
    out_features: int
    bias: bool = False
    saves_group: str = ""  # linears reading the same input (q, k, v) share a group: the input is saved once


@dataclass
class ModelShape:
    """What the formulas need to know of a decoder-only transformer."""
    source: str  # where the numbers came from, for the output
    family: str  # native | gpt2 | openai-gpt | llama | mixtral | other
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    mlp_hidden: int
    swiglu: bool
    position_table: int  # rows of a learned position table (0: rotary)
    tied: bool
    bias: bool
    norm: str  # layernorm | rmsnorm
    pre_norm: bool = True
    n_experts: int = 0
    top_k: int = 0
    moe_every: int = 1
    activation_saves: int = 1  # tensors of mlp_hidden the MLP activation keeps (F.gelu 1; HF's python gelu_new 4)
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    embd_dropout: float = 0.0
    context: int = 0  # the model's context length (block_size / n_positions / max_position_embeddings)
    meta_params: int | None = None  # parameter count from the meta-device model (family "other")
    fused_qkv: bool = False  # one qkv projection (native, GPT-2) instead of q, k, v
    o_bias: bool | None = None  # HF Llama-like: bias of o_proj (None: `bias`; Qwen2 has q, k, v biases only)
    mlp_bias: bool | None = None  # HF Llama-like: biases of the MLP (None: `bias`)

    @property
    def d_attn(self) -> int:
        return self.n_head * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer % self.moe_every == self.moe_every - 1

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))


def layer_linears(s: ModelShape, moe: bool = False) -> list[Linear]:
    """The linear layers of one block (an MoE block: attention and the router; experts are counted apart)."""
    d, qo, kv = s.d_model, s.d_attn, s.n_kv_head * s.head_dim
    b = s.bias
    if s.family in ("gpt2", "openai-gpt"):
        att = [Linear("c_attn", d, 3 * d, True, "attn"), Linear("c_proj", d, d, True, "proj")]
        mlp = [Linear("c_fc", d, s.mlp_hidden, True, "fc"), Linear("c_proj", s.mlp_hidden, d, True, "down")]
    elif s.family == "native":
        att = [Linear("qkv", d, qo + 2 * kv, b, "attn"), Linear("proj", d, d, b, "proj")]
        mlp = [Linear("fc", d, s.mlp_hidden * (2 if s.swiglu else 1), b, "fc"),
               Linear("proj", s.mlp_hidden, d, b, "down")]
    else:  # llama, mixtral and what is read like them
        ob = b if s.o_bias is None else s.o_bias
        mb = b if s.mlp_bias is None else s.mlp_bias
        att = [Linear("q_proj", d, qo, b, "attn"), Linear("k_proj", d, kv, b, "attn"), Linear("v_proj", d, kv, b, "attn"),
               Linear("o_proj", qo, d, ob, "proj")]
        mlp = [Linear("gate_proj", d, s.mlp_hidden, mb, "fc"), Linear("up_proj", d, s.mlp_hidden, mb, "fc"),
               Linear("down_proj", s.mlp_hidden, d, mb, "down")]
    if moe:
        router = "router" if s.family == "native" else "gate"
        return att + [Linear(router, d, s.n_experts, False, "fc")]
    return att + mlp


def expert_params(s: ModelShape) -> int:
    """Parameters of one MoE layer's experts (stacked: fc (E, m or 2m, d), proj (E, d, m), biases)."""
    fc_out = s.mlp_hidden * (2 if s.swiglu else 1)
    per = fc_out * s.d_model + s.d_model * s.mlp_hidden + (fc_out + s.d_model if s.bias and s.family == "native" else 0)
    return s.n_experts * per


def norm_params(s: ModelShape) -> int:
    return s.d_model * (2 if s.norm == "layernorm" and (s.bias or s.family != "native") else 1)


@dataclass
class ParamCounts:
    total: int  # unique parameters (a tied matrix once)
    embedding: int  # token table (+ position table)
    head: int  # the output projection's own parameters (0 when tied)
    linear: int  # weights + biases of the blocks' linear layers (+ experts)
    expert: int  # of which in MoE experts
    active: int  # per token: experts not routed to excluded (Mixtral's 12.9B "active" of 46.7B)
    per_layer: list[int] = field(default_factory=list)
    embedding_token: int = 0  # the token table alone


def param_counts(s: ModelShape) -> ParamCounts:
    """Exact parameter counts of the architecture `s` describes (tests: against the built models)."""
    token = s.vocab_size * s.d_model
    embedding = token + s.position_table * s.d_model
    head = 0 if s.tied else s.vocab_size * s.d_model
    per_layer, linear, expert, inactive = [], 0, 0, 0
    for i in range(s.n_layer):
        moe = s.is_moe_layer(i)
        lin = sum(l.in_features * l.out_features + (l.out_features if l.bias else 0) for l in layer_linears(s, moe))
        exp = expert_params(s) if moe else 0
        per_layer.append(lin + exp + 2 * norm_params(s))
        linear += lin + exp
        expert += exp
        if moe:
            inactive += exp * (s.n_experts - s.top_k) // s.n_experts
    final_norm = norm_params(s) if s.pre_norm else 0
    total = embedding + head + sum(per_layer) + final_norm
    if s.meta_params is not None:
        total = s.meta_params
    return ParamCounts(total=total, embedding=embedding, head=head, linear=linear, expert=expert,
                       active=total - inactive, per_layer=per_layer, embedding_token=token)


def flops_params(s: ModelShape) -> int:
    """N for the FLOPs formula: the parameters a token is multiplied by (active ones), i.e. without the input
    lookup tables, but with the output projection (which is the token table when tied)."""
    c = param_counts(s)
    return c.active - c.embedding + (c.embedding_token if s.tied else 0)


def transformer_flops_per_token(n_params: int, n_layer: int, seq_len: int, width: int) -> float:
    """Training FLOPs per token, forward + backward (PaLM appendix B, Chowdhery et al. 2022; nanoGPT's
    estimate_mfu): 6N for the matmuls, plus 12·L·T·d_attn for the attention scores and weighted sums (2 matmuls
    of T·d_attn per token and layer, 2 FLOPs per multiply-add, 3x for forward + backward; Kaplan et al. 2020
    Table 1 count 6·L·T·d_attn, as if halved by the causal mask). N excludes input lookup tables (token and
    position embeddings) and includes the output projection (the token table when tied)."""
    return 6 * n_params + 12 * n_layer * seq_len * width


def lora_flops_per_token(n_params: int, n_adapter: int, n_layer: int, seq_len: int, width: int) -> float:
    """Training FLOPs per token with a frozen base: the base's matmuls run forward (2N) and backward for the
    input gradient only (2N: no weight gradient), the adapter's fully (6·N_adapter), attention as in
    transformer_flops_per_token (it has no weights: its backward costs twice its forward either way)."""
    return 4 * n_params + 6 * n_adapter + 12 * n_layer * seq_len * width


def chinchilla_tokens(n_params: int) -> int:
    """Compute-optimal training tokens for N parameters: ~20 per parameter (Hoffmann et al. 2022, Table 3)."""
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


def parse_size(text: str) -> int:
    """'70B' -> 70e9, '1.1b', '350M', '7e9', '124000000' -> parameters; ConfigError if it is not a size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--model-size {text!r} is not a parameter count; write e.g. 70B, 7b, 350M or 124000000")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    if not m.group(2) and value < 1e3:  # "1.5" is a size in billions to most people, not 2 parameters
        raise ConfigError(f"--model-size {text!r} has no unit; write e.g. {m.group(1)}B (billions) or {m.group(1)}M")
    if not 1 <= value < 1e15:
        raise ConfigError(f"--model-size {text!r} is out of range (1 to 10^15 parameters)")
    return int(round(value))


def inference_weight_bytes(n_params: int) -> dict[str, int]:
    """The weights alone at 16 / 8 / 4 bits per parameter (fp16 or bf16 / int8 / int4): 2N, N, N/2 bytes
    (70B -> 140 / 70 / 35 GB). KV cache, activations and quantisation scales come on top (see nf4_bytes)."""
    return {"fp16": 2 * n_params, "int8": n_params, "int4": n_params // 2}


# -- reading a model from a config ------------------------------------------------------------------------------
def shape_from_native(config, source: str) -> ModelShape:
    """A native GPTConfig (tune/models/config.py)."""
    return ModelShape(source=source, family="native", vocab_size=config.vocab_size, n_layer=config.n_layer,
                      d_model=config.n_embd, n_head=config.n_head, n_kv_head=config.n_kv_head,
                      head_dim=config.head_dim, mlp_hidden=config.mlp_hidden, swiglu=config.mlp == "swiglu",
                      position_table=config.block_size if config.position == "learned" else 0,
                      tied=config.tie_embeddings, bias=config.bias, norm=config.norm,
                      pre_norm=config.norm_placement == "pre", n_experts=config.n_experts,
                      top_k=config.moe_top_k if config.n_experts else 0, moe_every=config.moe_every,
                      resid_dropout=config.dropout, attn_dropout=config.dropout, embd_dropout=config.dropout,
                      context=config.block_size, fused_qkv=True)


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral")


def shape_from_hf(config: dict, source: str) -> ModelShape:
    """An HF config.json (read as JSON), with transformers' defaults for absent keys: llama, mistral, qwen2,
    mixtral, gpt2, openai-gpt analytically; other model_types on torch's meta device (parameters only; the
    memory formulas then read the usual key names and assume a Llama-like block, said in `source`)."""
    c = config
    kind = c.get("model_type")
    if kind in ("gpt2", "openai-gpt"):
        d = c.get("n_embd", 768)
        act = c.get("activation_function" if kind == "gpt2" else "afn", "gelu_new" if kind == "gpt2" else "gelu")
        heads = c.get("n_head", 12)
        return ModelShape(source=source, family=kind,
                          vocab_size=c.get("vocab_size", 50257 if kind == "gpt2" else 40478),
                          n_layer=c.get("n_layer", 12), d_model=d, n_head=heads, n_kv_head=heads,
                          head_dim=d // heads, mlp_hidden=c.get("n_inner") or 4 * d, swiglu=False,
                          position_table=c.get("n_positions", 1024 if kind == "gpt2" else 512),
                          tied=bool(c.get("tie_word_embeddings", True)), bias=True, norm="layernorm",
                          pre_norm=kind == "gpt2", activation_saves=4 if act == "gelu_new" else 1,
                          resid_dropout=c.get("resid_pdrop", 0.1), attn_dropout=c.get("attn_pdrop", 0.1),
                          embd_dropout=c.get("embd_pdrop", 0.1),
                          context=c.get("n_positions", 1024 if kind == "gpt2" else 512), fused_qkv=True)
    d = c.get("hidden_size", 4096)
    heads = c.get("num_attention_heads", 32)
    shape = ModelShape(source=source, family=kind if kind in _LLAMA_LIKE else "other",
                       vocab_size=c.get("vocab_size", 32000), n_layer=c.get("num_hidden_layers", 32), d_model=d,
                       n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads,
                       head_dim=c.get("head_dim") or d // heads,
                       mlp_hidden=c.get("intermediate_size", 14336 if kind == "mixtral" else 11008),
                       swiglu=True, position_table=0, tied=bool(c.get("tie_word_embeddings", False)),
                       bias=bool(c.get("attention_bias", kind == "qwen2")), norm="rmsnorm",
                       o_bias=False if kind == "qwen2" else None, mlp_bias=bool(c.get("mlp_bias", False)),
                       attn_dropout=c.get("attention_dropout", 0.0),
                       context=c.get("max_position_embeddings", 2048))
    if kind == "qwen2":  # biases on q, k, v only
        shape = replace(shape, family="qwen2")
    if kind == "mixtral":
        shape = replace(shape, n_experts=c.get("num_local_experts", 8), top_k=c.get("num_experts_per_tok", 2))
    if kind not in _LLAMA_LIKE:
        shape = replace(shape, meta_params=meta_param_count(c),
                        source=f"{source}; model_type {kind!r} has no formula here: parameters counted on torch's meta "
                               "device; memory and the LoRA count assume a Llama-like block (q/k/v/o, gate/up/down)")
    return shape


def meta_param_count(config: dict) -> int:
    """Parameters of the HF architecture of `config`, instantiated on torch's meta device (no memory, no weights);
    tied parameters once. Imports torch and transformers (only this fallback does)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure of an unknown architecture: one line
        raise DataError(f"model_type {config.get('model_type')!r}: cannot build it on the meta device to count its "
                        f"parameters ({str(e).splitlines()[0][:160]})") from None
    return sum(p.numel() for p in model.parameters())


def read_hf_shape(path, key: str) -> ModelShape:
    """The shape of the HF model directory `path` (config `key` names it in errors), from its config.json only."""
    from tune.hf import read_model_config

    directory = Path(path)
    if not directory.exists():
        raise ConfigError(f"{key}={path} does not exist; tune plan reads its config.json (no weights), so point "
                          f"{key} at an HF model directory (override: {key}=DIR)")
    if not (directory / "config.json").is_file():
        raise DataError(f"{key}={path} has no config.json; tune plan reads the model's shape from it")
    return shape_from_hf(read_model_config(directory), f"{directory / 'config.json'}")


# -- bitsandbytes storage ----------------------------------------------------------------------------------------
def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one 4-bit (nf4 / fp4) bitsandbytes weight of n elements, as stored on the device and in a
    safetensors file: n/2 packed bytes, the absmax of each 64-block (fp32; with double quantisation uint8 plus
    one fp32 absmax per 256 blocks, an fp32 offset and the 256-entry fp32 code), the 16-entry fp32 quant map.
    Per parameter: 0.5 + 4/64 = 0.5625 bytes, or 0.5 + 1/64 + 4/(64·256) ≈ 0.5157 with double quantisation.
    (The saved file also holds a small JSON quant_state blob per weight: quant_state_json_bytes.)"""
    blocks = math.ceil(n / NF4_BLOCK)
    packed = math.ceil(n / 2)
    quant_map = 16 * 4
    if not double_quant:
        return packed + 4 * blocks + quant_map
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + quant_map


def int8_bytes(n_in: int, n_out: int) -> int:
    """Bytes of one LLM.int8() weight (bitsandbytes Linear8bitLt): 1 byte per weight + an fp32 scale per row."""
    return n_in * n_out + 4 * n_out


def checkpoint_tensor_bytes(s: ModelShape, storage: str, double_quant: bool = True, rest_dtype: str = "fp32") -> int:
    """Bytes of the tensors of an HF safetensors checkpoint of `s` (the file minus its 8-byte length and JSON
    header), a tied matrix stored once. storage: fp32 | bf16 | fp16 (every tensor), or int8 / nf4 / fp4 as
    transformers' save_pretrained writes a bitsandbytes model: the block linears quantised (int8: weight, fp32 SCB
    per row, a 1-byte weight_format; 4-bit: nf4_bytes) and every other tensor in `rest_dtype`. The 4-bit files also
    hold one small JSON `quant_state` tensor per weight (its length varies with the float it records), not counted
    here."""
    counts = param_counts(s)
    if storage in DTYPE_BYTES and storage != "int8":
        return counts.total * DTYPE_BYTES[storage]
    q_bytes = q_params = 0
    for i in range(s.n_layer):
        for lin in layer_linears(s, s.is_moe_layer(i)):
            n = lin.in_features * lin.out_features
            q_params += n
            q_bytes += int8_bytes(lin.in_features, lin.out_features) + 1 if storage == "int8" else \
                nf4_bytes(n, double_quant)
    return q_bytes + (counts.total - q_params) * DTYPE_BYTES[rest_dtype]


# -- the run's settings -------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What the memory formulas need of a run: one model, one process."""
    method: str  # full | lora | qlora | inference
    micro_batch_size: int
    seq_len: int
    weights_dtype: str  # of the frozen or trained weights (fp32 / bf16)
    compute_dtype: str  # of the activations (autocast dtype, or weights_dtype without autocast)
    autocast: bool  # mixed precision over fp32 master weights (autocast caches bf16 copies of trainable weights)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    lora_r: int = 16
    lora_dropout: float = 0.05
    lora_targets: str | list[str] = "all-linear"
    lora_bias: str = "none"
    lora_target_parameters: list[str] | None = None  # an MoE's stacked expert tensors (gate_up_proj, down_proj)
    quant: str = "nf4"  # qlora: nf4 | fp4 (same storage)
    double_quant: bool = True
    processes: int = 1
    fsdp: bool = False
    device: str = "cuda"
    targets_per_row: float = 1.0  # share of positions that carry a loss target (1: pretraining windows)
    ce_chunk: int | None = None  # positions per fused cross-entropy chunk (None: tune.losses.default_chunk_size)
    teacher: ModelShape | None = None  # distillation: the frozen teacher (None: none, or read from a cache)
    teacher_dtype: str = "fp32"
    teacher_quant: str = "none"  # none | 8bit | 4bit
    kd_chunk: int = 4096  # kd.chunk_size
    distill: bool = False  # the KD loss (chunked_kd_sums) instead of the fused cross-entropy
    inference_quant: str | None = None  # inference: int8 | nf4 | fp4 weights (the evaluate recipe's `quant`)


def default_chunk_size(vocab_size: int) -> int:
    """tune.losses.default_chunk_size, without importing torch (the test checks they agree)."""
    return max(256, 2 ** 26 // vocab_size)


def adapted(s: ModelShape, st: Settings, lin: Linear) -> bool:
    """Whether peft puts LoRA on this linear (all-linear: every block linear; a list: peft's name matching)."""
    if st.method not in ("lora", "qlora"):
        return False
    targets = st.lora_targets
    if targets == "all-linear":
        return True
    names = [targets] if isinstance(targets, str) else list(targets)
    return lin.name in names


def lora_params(s: ModelShape, st: Settings) -> int:
    """Trainable parameters of LoRA: r·(in + out) per adapted linear (peft's lora_A, lora_B); with
    lora.bias=all every bias of the model, lora_only the adapted layers' biases."""
    n = 0
    for i in range(s.n_layer):
        for lin in layer_linears(s, s.is_moe_layer(i)):
            if adapted(s, st, lin):
                n += st.lora_r * (lin.in_features + lin.out_features)
                if st.lora_bias == "lora_only" and lin.bias:
                    n += lin.out_features
            if st.lora_bias == "all" and lin.bias:
                n += lin.out_features
    if s.family == "mixtral":
        # peft (0.21) adapts the stacked expert tensors per expert: with all-linear gate_up_proj at rank 2r (it
        # holds two matrices) and down_proj at rank r; named in lora.target_parameters, each at rank r
        d, m = s.d_model, s.mlp_hidden
        per_expert = {"gate_up_proj": st.lora_r * (d + 2 * m), "down_proj": st.lora_r * (m + d)}
        if st.lora_target_parameters:
            n += s.n_moe_layers * s.n_experts * sum(per_expert.get(name, 0) for name in st.lora_target_parameters)
        elif st.lora_targets == "all-linear":
            n += s.n_moe_layers * s.n_experts * (2 * per_expert["gate_up_proj"] + per_expert["down_proj"])
    if st.lora_bias == "all" and s.norm == "layernorm":  # LayerNorm biases are biases too
        n += (2 * s.n_layer + (1 if s.pre_norm else 0)) * s.d_model
    return n


def quantized_weight_bytes(s: ModelShape, st: Settings) -> tuple[int, int]:
    """(bytes of the 4-bit linear weights, parameters left unquantised) of a QLoRA base: transformers quantises
    every block linear (GPT-2's Conv1D included) and keeps embeddings, norms, biases, the output head and MoE
    expert tensors (nn.Parameters, not nn.Linear) in their dtype."""
    q_bytes = q_params = 0
    for i in range(s.n_layer):
        for lin in layer_linears(s, s.is_moe_layer(i)):
            q_bytes += nf4_bytes(lin.in_features * lin.out_features, st.double_quant)
            q_params += lin.in_features * lin.out_features
    return q_bytes, param_counts(s).total - q_params


def activation_bytes_per_token_layer(s: ModelShape, st: Settings, moe: bool = False) -> float:
    """Bytes autograd keeps for the backward pass per token in one block (see the module docstring).

    Per block, in elements of the activation dtype (h = d_model, m = mlp_hidden, a = d_attn, kv = n_kv·head_dim):
      norm      its input (LayerNorm also mean/rstd, O(1)); RMSNorm with a trainable gain also its normalised input
      linears   the input of a trainable linear, or of a LoRA-adapted one (lora_A reads it): once per shared input;
                with lora.dropout > 0 each adapted linear keeps its own dropped-out copy + a 1-byte mask; lora_A's
                output (r) for lora_B
      attention SDPA keeps q, k, v and its output (flash / efficient kernels: no T×T scores): the qkv output
                (a + 2kv; q and k again after RoPE), the output a (which the projection reads as a view)
      MLP       the activation's input (F.gelu: m; HF's python gelu_new: 4m) and output m for the down projection;
                SwiGLU: gate and up (2m), silu(gate) m, their product m
      MoE       each of the k experts a token goes to: its gathered input h, the expert MLP as above, its output h
      dropout   a 1-byte mask per dropped element (residual dropout after attention and MLP)
    """
    h, m, a, kv = s.d_model, s.mlp_hidden, s.d_attn, s.n_kv_head * s.head_dim
    act = DTYPE_BYTES[st.compute_dtype]
    # the residual stream: fp32 under autocast (fp32 master weights) and in QLoRA (prepare_model_for_kbit_training
    # casts the embeddings and norms to fp32), else the weights' dtype
    resid = DTYPE_BYTES["fp32"] if st.autocast or st.method == "qlora" else DTYPE_BYTES[st.weights_dtype]
    full = st.method == "full"
    lins = layer_linears(s, moe)
    elements = 0.0  # in the activation dtype
    resid_elements = 0.0  # in the residual stream's dtype
    mask_bytes = 0.0

    def input_saved(group: str, size: int) -> None:
        nonlocal elements, mask_bytes
        members = [l for l in lins if l.saves_group == group]
        ad = [l for l in members if adapted(s, st, l)]
        if full or (ad and st.lora_dropout == 0):
            elements += size
        if st.lora_dropout > 0:
            elements += size * len(ad)
            mask_bytes += size * len(ad)
        elements += st.lora_r * len(ad)

    # the two norms: their inputs are the residual stream
    for _ in range(2):
        resid_elements += h
        if s.norm == "rmsnorm" and full:
            resid_elements += h
    input_saved("attn", h)
    if s.fused_qkv:
        elements += a + 2 * kv  # one qkv output holds q, k, v
    else:
        elements += kv  # v; q and k are saved after RoPE below
    if s.position_table == 0:  # RoPE: rotated q and k are new tensors
        elements += a + kv
    elements += a  # attention output
    input_saved("proj", 0)  # a view of the attention output: only LoRA's dropout copies and lora_A outputs
    if st.lora_dropout > 0:
        elements += a * sum(adapted(s, st, l) for l in lins if l.saves_group == "proj")
        mask_bytes += a * sum(adapted(s, st, l) for l in lins if l.saves_group == "proj")
    if s.attn_dropout > 0 and st.device == "cpu":  # CPU SDPA with dropout takes the math path: T×T scores
        elements += 3 * s.n_head * st.seq_len
        mask_bytes += s.n_head * st.seq_len
    input_saved("fc", h)
    down_saved = full or any(adapted(s, st, l) for l in lins if l.saves_group == "down")
    if moe:
        per_expert = h + (4 * m if s.swiglu else (1 + s.activation_saves) * m) + h
        elements += s.top_k * per_expert
    elif s.swiglu:
        elements += 3 * m + (m if down_saved else 0)
    else:
        elements += s.activation_saves * m + (m if down_saved else 0)
    if not moe:  # the down projection's dropout copy / lora_A output (its input counted above)
        down = [l for l in lins if l.saves_group == "down" and adapted(s, st, l)]
        if st.lora_dropout > 0:
            elements += m * len(down)
            mask_bytes += m * len(down)
        elements += st.lora_r * len(down)
    if s.resid_dropout > 0:
        mask_bytes += 2 * h
    return elements * act + resid_elements * resid + mask_bytes


@dataclass
class MemoryPlan:
    """Per-process bytes of one training (or inference) setup; `peak_bytes` is the estimated high-water mark."""
    method: str
    weights_bytes: int
    weights_note: str
    grads_bytes: int
    optimizer_bytes: int
    adapter_bytes: int  # LoRA weights + their gradients + AdamW state (not in the weights / grads / AdamW rows)
    activations_bytes: int
    logits_bytes: int
    autocast_copies_bytes: int = 0
    teacher_bytes: int = 0
    transient_bytes: int = 0
    trainable_params: int = 0
    fsdp_gather_bytes: int = 0  # FSDP: the blocks gathered whole at a time (the current one and the prefetched next)
    kv_cache_bytes: int = 0  # inference
    recompute_bytes: int = 0  # gradient checkpointing: one block's activations, recomputed during the backward

    @property
    def peak_bytes(self) -> int:
        """Weights, optimizer state and teacher stay all step; the activations (with the loss's saved gradients
        and one chunk of logits) peak at the end of the forward pass, while the gradients are complete only at the
        end of the backward (each layer's gradients appear as its activations are freed), so the two overlap
        little: the peak takes the larger of them, not their sum. With gradient checkpointing the forward keeps
        only each block's input, and the backward holds one recomputed block while the gradients fill up.
        (Checked against measurements: bench/bench_plan.py.)"""
        kept = self.activations_bytes + self.autocast_copies_bytes
        forward = kept + self.logits_bytes + self.transient_bytes  # the loss's chunk, at the end of the forward
        # the backward: with checkpointing, one block recomputed (and the gradients of its MLP's hidden tensors,
        # which exist together during its backward) while the gradients fill up (all there by the end); the loss's
        # saved gradients are used up first
        backward = kept + self.recompute_bytes + self.grads_bytes if self.recompute_bytes else self.grads_bytes
        during_step = max(forward, backward) + self.kv_cache_bytes
        return (self.weights_bytes + self.optimizer_bytes + self.adapter_bytes + self.teacher_bytes
                + self.fsdp_gather_bytes + during_step)

    def rows(self) -> dict[str, int]:
        """The table's rows, bytes."""
        return {"weights": self.weights_bytes, "gradients": self.grads_bytes, "AdamW state": self.optimizer_bytes,
                "LoRA adapter + grads + AdamW": self.adapter_bytes, "activations": self.activations_bytes,
                "KV cache": self.kv_cache_bytes, "recomputed block (checkpointing)": self.recompute_bytes,
                ("last position's logits" if self.method == "inference" else "loss: logits chunk + saved grads"):
                self.logits_bytes + self.transient_bytes,
                "autocast bf16 weight copies": self.autocast_copies_bytes, "teacher": self.teacher_bytes,
                "FSDP gathered blocks": self.fsdp_gather_bytes, "peak (estimate)": self.peak_bytes}


def optimizer_bytes_per_param(optimizer: str, param_bytes: int) -> float:
    """AdamW's two moments: in the parameter's dtype for torch's AdamW (2 × 4 bytes for fp32 parameters);
    bitsandbytes' 8-bit AdamW: 2 × 1 byte (+ a small per-block absmax, ignored)."""
    return 2 * param_bytes if optimizer in ("adamw", "paged_adamw") else 2


def memory_plan(s: ModelShape, st: Settings) -> MemoryPlan:
    """The per-process memory of training (or running) model `s` as `st` says."""
    counts = param_counts(s)
    n = counts.total
    wb = DTYPE_BYTES[st.weights_dtype]
    act = DTYPE_BYTES[st.compute_dtype]
    world = st.processes if st.fsdp else 1
    tokens = st.micro_batch_size * st.seq_len
    targets = int(tokens * st.targets_per_row)
    chunk = min(st.ce_chunk or default_chunk_size(s.vocab_size), max(targets, 1))

    # weights
    if st.method == "qlora":
        q_bytes, rest = quantized_weight_bytes(s, st)
        # prepare_model_for_kbit_training casts every non-4-bit parameter to fp32
        weights = q_bytes + 4 * rest
        note = (f"nf4{'+dq' if st.double_quant else ''} {q_bytes / max(1, n - rest):.4f} B/param for block linears, "
                f"fp32 for the other {rest:,}")
    else:
        weights = wb * n
        note = f"{st.weights_dtype} {wb} B/param"
    weights //= world
    trainable = n if st.method == "full" else (lora_params(s, st) if st.method in ("lora", "qlora") else 0)
    grads = optimizer = adapter = 0
    if st.method == "full":
        grads = wb * n // world
        optimizer = int(optimizer_bytes_per_param(st.optimizer, wb) * n) // world
    elif st.method in ("lora", "qlora"):
        # peft keeps adapters in fp32 (autocast_adapter_dtype) whatever the base dtype
        adapter = int(trainable * (4 + 4 + optimizer_bytes_per_param(st.optimizer, 4))) // world
    autocast_copies = 0
    if st.autocast and st.method == "full":
        # autocast caches the bf16 copy of every trainable weight a linear casts, for the forward and backward (the
        # head is cast by the fused loss itself, transiently)
        autocast_copies = act * counts.linear

    if st.method == "inference":
        if st.inference_quant in ("int8", "nf4", "fp4"):  # bitsandbytes: block linears quantised (double quant)
            weights = checkpoint_tensor_bytes(s, "int8" if st.inference_quant == "int8" else "nf4", True,
                                              st.weights_dtype)
            note = f"{st.inference_quant} block linears, {st.weights_dtype} for the rest"
        # generation: keys and values of every layer for the batch at full length; the logits of the last position
        # only (fp32); one block's activations of the prompt's forward at a time
        kv_bytes = 2 * s.n_layer * s.n_kv_head * s.head_dim * tokens * act
        block = tokens * activation_bytes_per_token_layer(s, replace(st, method="lora", lora_dropout=0.0))
        return MemoryPlan("inference", weights, note, 0, 0, 0, int(block), st.micro_batch_size * s.vocab_size * 4,
                          trainable_params=0, kv_cache_bytes=int(kv_bytes))

    # activations kept for backward
    recompute = 0
    if st.gradient_checkpointing:
        # each block keeps only its input; one block's activations exist at a time (recomputed in backward)
        per_layer_input = s.d_model * (4 if st.autocast or st.method == "qlora" else wb)
        recompute = tokens * max(activation_bytes_per_token_layer(s, st, s.is_moe_layer(i)) for i in range(s.n_layer))
        mlp_tensors = 4 if s.swiglu else s.activation_saves + 1  # the MLP's saved (tokens, mlp_hidden) tensors
        recompute += tokens * mlp_tensors * s.mlp_hidden * act * (s.top_k if s.n_experts else 1)
        activations = tokens * s.n_layer * per_layer_input
    else:
        activations = tokens * sum(activation_bytes_per_token_layer(s, st, s.is_moe_layer(i)) for i in range(s.n_layer))
    resid = 4 if st.autocast or st.method == "qlora" else wb
    activations += tokens * s.d_model * resid * (1 if s.pre_norm else 0)  # the final norm's input
    if s.embd_dropout > 0:
        activations += tokens * s.d_model  # its mask

    # the fused chunked cross-entropy (tune/losses.py): holds d loss / d hidden (targets x h) and, for a trainable
    # head, d loss / d W (V x h, fp32) from the forward to the backward; one chunk of fp32 logits at a time
    head_trainable = st.method == "full"
    logits = targets * s.d_model * act + (s.vocab_size * s.d_model * 4 if head_trainable else 0)
    # one chunk: its fp32 logits and the same-sized temporary of torch.logsumexp (x - max(x)), 8 bytes per logit
    # (in bf16 the bf16 logits are freed by then); the gathered hidden states of the target positions
    transient = 8 * chunk * s.vocab_size + targets * s.d_model * act
    if DTYPE_BYTES[st.compute_dtype] != DTYPE_BYTES[st.weights_dtype if st.method != "qlora" else "fp32"]:
        transient += s.vocab_size * s.d_model * act  # the fused loss's cast of the head weight
    if st.method == "qlora":  # one block linear dequantised at a time
        transient += max(l.in_features * l.out_features for l in layer_linears(s)) * act
    gather = 0
    if st.fsdp and st.processes > 1:  # FSDP2 all-gathers one block before it runs and prefetches the next
        block = max(param_counts(s).per_layer)
        gather = 2 * block * (wb if st.method != "qlora" else 1)
    teacher = teacher_bytes(st, targets) if st.teacher is not None else 0
    if st.distill:
        # chunked_kd_sums (tune/losses.py) recomputes each chunk in the backward (checkpointed), so nothing of the
        # loss is kept; per chunk: both models' logits, their log-softmaxes and probabilities (fp32)
        vocab_t = st.teacher.vocab_size if st.teacher is not None else 0
        logits = 0
        transient = 3 * 4 * min(st.kd_chunk, max(targets, 1)) * (s.vocab_size + vocab_t) + targets * s.d_model * act
    return MemoryPlan(st.method, int(weights), note, int(grads), int(optimizer), int(adapter), int(activations),
                      int(logits), int(autocast_copies), int(teacher), int(transient), trainable_params=trainable,
                      fsdp_gather_bytes=int(gather), recompute_bytes=int(recompute))


def teacher_bytes(st: Settings, targets: int) -> int:
    """A frozen distillation teacher: its weights (teacher.dtype; 8bit: LLM.int8() block linears; 4bit: nf4 with
    double quantisation, as tune.distill.load_teacher loads it) and its final hidden states of the target positions,
    kept for the chunked KD loss (its forward runs without grad: one block's activations at a time)."""
    t = st.teacher
    counts = param_counts(t)
    dtype_bytes = DTYPE_BYTES[st.teacher_dtype]
    if st.teacher_quant == "none":
        weights = counts.total * dtype_bytes
    else:
        q_bytes = q_params = 0
        for i in range(t.n_layer):
            for lin in layer_linears(t, t.is_moe_layer(i)):
                n = lin.in_features * lin.out_features
                q_bytes += int8_bytes(lin.in_features, lin.out_features) if st.teacher_quant == "8bit" else \
                    nf4_bytes(n, True)
                q_params += n
        weights = q_bytes + (counts.total - q_params) * (2 if st.teacher_quant == "8bit" else dtype_bytes)
    return weights + targets * t.d_model * DTYPE_BYTES[st.compute_dtype]


# -- a recipe config -> the plan -------------------------------------------------------------------------------------
METHODS = ("full", "lora", "qlora")


@dataclass
class RunFacts:
    """What a recipe config says about the run, read without torch."""
    recipe: str
    shape: ModelShape
    method: str  # full | lora | qlora | inference
    seq_len: int
    micro_batch_size: int
    grad_accum_steps: int
    max_steps: int
    weights_dtype: str
    compute_dtype: str
    autocast: bool
    settings: Settings
    notes: list[str] = field(default_factory=list)


def _dtype(name: str, device: str) -> str:
    """tune.hf.resolve_dtype without torch: auto is bf16 on a GPU (assumed to have bf16), fp32 on a CPU."""
    return ("bf16" if device == "cuda" else "fp32") if name == "auto" else name


def _precision(train, device: str) -> str:
    """tune.engine.make_accelerator's mixed precision: auto is bf16 on a GPU, none on a CPU."""
    mp = train.mixed_precision
    return ("bf16" if device == "cuda" else "no") if mp == "auto" else mp


def run_facts(recipe: str, cfg, device: str = "cuda", processes: int = 1, fsdp: bool = False) -> RunFacts:
    """The model, method, sizes and precisions a validated recipe config trains with (on `device`, over
    `processes` processes). Reads a native preset or an HF config.json; never weights or data."""
    notes: list[str] = []
    teacher = None
    teacher_dtype, teacher_quant = "fp32", "none"
    distill = False
    lora = getattr(cfg, "lora", None)
    quant = getattr(cfg, "qlora", None)
    if recipe == "pretrain":
        m = cfg.model
        if m.init_from:
            shape = read_hf_shape(m.init_from, "model.init_from")
        else:
            vocab = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" and cfg.data.vocab_size else None
            shape = shape_from_native(m.native_config(vocab), f"preset {m.preset}")
            if vocab is None:
                notes.append(f"vocabulary: the preset's {shape.vocab_size:,} (the run sizes it to the tokenizer it "
                             f"trains: set data.vocab_size for a BPE tokenizer)")
        method, seq_len = "full", m.block_size or shape.context
        weights = "fp32"  # the native GPT trains fp32 master weights; autocast computes in bf16
    elif recipe in ("finetune", "classify"):
        shape = read_hf_shape(cfg.base_model, "base_model")
        method, seq_len = cfg.method, cfg.data.max_length
        weights = _dtype(cfg.dtype, device)
        if recipe == "finetune" and method != "full":
            from tune.hf import check_moe_lora_dropout

            try:
                check_moe_lora_dropout(cfg.lora, Path(cfg.base_model))
            except ConfigError as e:  # planned as given; the run itself refuses it
                notes.append(f"{e} (tune run refuses this config)")
        if recipe == "classify":
            notes.append("classify: the task head (n_embd x labels) is not counted; its loss reads one position per "
                         "example")
    elif recipe == "distill":
        t, s = cfg.teacher, cfg.student
        teacher_shape = read_hf_shape(t.model, "teacher.model")
        if s.model is not None:
            shape = read_hf_shape(s.model, "student.model")
        else:
            from tune.models.config import config_from_preset

            seq = cfg.data.block_size if cfg.data.kind == "text" and cfg.data.corpus else cfg.data.max_length
            native = config_from_preset(s.preset, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                        block_size=s.block_size or seq, vocab_size=teacher_shape.vocab_size)
            shape = shape_from_native(native, f"preset {s.preset} (teacher's vocabulary)")
        method = s.method
        seq_len = cfg.data.block_size if cfg.data.kind == "text" and cfg.data.corpus else cfg.data.max_length
        weights = _dtype(s.dtype, device) if s.model is not None else "fp32"
        distill = True
        if t.cache:
            notes.append("teacher.cache=true: the teacher runs once before training and is not in memory during it")
        methods = list(cfg.compare.methods)
        students = 1 + bool(cfg.compare.ce_only) + len(methods)
        if students > 1:
            notes.append(f"compute and wall time are the run's own student's: compare.ce_only / compare.methods train "
                         f"{students - 1} more of the same size for as many steps ({students}x in all)")
        if cfg.kd.lmbda > 0 or "on_policy" in methods:
            notes.append(f"on-policy steps also sample up to kd.max_new_tokens={cfg.kd.max_new_tokens} tokens per "
                         "prompt with the student (KV cache; not counted)")
        if cfg.seq_kd.enabled or "sequence_kd" in methods:
            notes.append("sequence-level KD: the teacher first decodes every training prompt once (not counted)")
        if cfg.kd.layer_map:
            notes.append("kd.layer_map: the projections and the teacher's mapped hidden states are not counted")
        else:
            teacher, teacher_dtype, teacher_quant = teacher_shape, _dtype(t.dtype, device), t.quant
        lora = cfg.lora
    elif recipe == "evaluate":
        shape = read_hf_shape(cfg.model, "model")
        method, weights = "inference", _dtype(cfg.dtype, device)
        seq_len = min(shape.context, (cfg.generation.max_prompt_tokens or shape.context)
                      + cfg.generation.max_new_tokens)
        compute = weights
        from tune.hf import stored_quant

        quant = getattr(cfg, "quant", None) or stored_quant(cfg.model)
        st = Settings(method="inference", micro_batch_size=cfg.generation.batch_size, seq_len=seq_len,
                      weights_dtype=weights, compute_dtype=compute, autocast=False, device=device,
                      inference_quant=quant if quant in ("int8", "nf4", "fp4") else None)
        notes.append("evaluate: inference only (weights + KV cache of a batch at full context)"
                     + (f"; weights loaded {quant}" if quant else ""))
        return RunFacts(recipe, shape, "inference", seq_len, cfg.generation.batch_size, 1, 0, weights, compute,
                        False, st, notes)
    else:
        raise ConfigError(f"tune plan does not know recipe {recipe!r}")
    if shape.position_table and seq_len > shape.position_table:
        notes.append(f"sequence length {seq_len} is longer than the model's learned position table "
                     f"({shape.position_table}): tune validate / tune run refuse this config")
    precision = _precision(cfg.train, device)
    autocast = precision in ("bf16", "fp16")
    compute = precision if autocast else weights
    if method == "qlora":
        compute = _dtype(quant.compute_dtype, device) if quant.compute_dtype != "auto" else \
            ("bf16" if device == "cuda" else "fp32")
    train = cfg.train
    if fsdp and processes == 1:
        fsdp = False
    st = Settings(method=method, micro_batch_size=train.micro_batch_size, seq_len=seq_len, weights_dtype=weights,
                  compute_dtype=compute, autocast=autocast and weights == "fp32",
                  gradient_checkpointing=train.gradient_checkpointing,
                  optimizer=train.optimizer, lora_r=lora.r if lora else 16, lora_dropout=lora.dropout if lora else 0.0,
                  lora_targets=lora.target_modules if lora else "all-linear", lora_bias=lora.bias if lora else "none",
                  lora_target_parameters=getattr(lora, "target_parameters", None) if lora else None,
                  quant=quant.quant_type if quant else "nf4", double_quant=quant.double_quant if quant else True,
                  processes=processes, fsdp=fsdp, device=device, teacher=teacher, teacher_dtype=teacher_dtype,
                  teacher_quant=teacher_quant, kd_chunk=cfg.kd.chunk_size if distill else 4096, distill=distill)
    extras = [k for k in ("use_dora", "layers_to_transform", "exclude_modules", "rank_pattern", "alpha_pattern",
                          "trainable_token_indices") if lora and getattr(lora, k, None)]
    if lora and getattr(lora, "init", "default") not in ("default", "gaussian"):
        extras.append(f"init={lora.init}")
    if extras and method in ("lora", "qlora"):
        notes.append(f"lora.{', lora.'.join(extras)}: not modelled; LoRA parameters are counted on every targeted "
                     "layer at rank lora.r, without DoRA's magnitudes (one per output feature of each adapted layer) "
                     "or trainable token rows, and the init's one-off SVD / QR / LoftQ pass is not timed")
    if recipe in ("finetune", "distill") and getattr(cfg.data, "mask_prompt", False):
        notes.append("activations and loss assume every position is a target (prompt masking only lowers the loss "
                     "part) and rows packed full to the sequence length: an upper bound")
    return RunFacts(recipe, shape, method, seq_len, train.micro_batch_size, train.grad_accum_steps, train.max_steps,
                    weights, compute, st.autocast, st, notes)


def gpu_peak_tflops(gpu: str | None, peak_tflops: float | None) -> tuple[str, float]:
    """(name, dense bf16 TFLOP/s) of --gpu (GPU_PEAK_TFLOPS, case-insensitive) or --peak-tflops; ConfigError for an
    unknown name or a peak that is not > 0."""
    if peak_tflops is not None:
        if not (peak_tflops > 0 and math.isfinite(peak_tflops)):
            raise ConfigError(f"--peak-tflops must be > 0 (TFLOP/s of one device), got {peak_tflops}")
        return (gpu or "custom"), float(peak_tflops)
    name = gpu or "H100"
    for known, value in GPU_PEAK_TFLOPS.items():
        if known.lower() == name.lower().replace(" ", ""):
            return known, value
    raise ConfigError(f"--gpu {name!r} is unknown; choose one of {', '.join(GPU_PEAK_TFLOPS)} or give "
                      "--peak-tflops X (dense bf16 TFLOP/s)")


def check_mfu(mfu: float) -> float:
    if not (0 < mfu <= 1):
        raise ConfigError(f"--mfu must be in (0, 1] (model FLOPs utilisation, e.g. 0.4), got {mfu}")
    return mfu


def plan_run(facts: RunFacts, gpu: str | None = None, peak_tflops: float | None = None, mfu: float = DEFAULT_MFU
             ) -> dict:
    """The whole plan of a run as a JSON-ready dict (bytes, FLOPs, seconds): parameters, compute, memory per
    method (full / lora / qlora side by side for HF models; the configured one first-class) and what fits."""
    s, st = facts.shape, facts.settings
    counts = param_counts(s)
    gpu_name, peak = gpu_peak_tflops(gpu, peak_tflops)
    check_mfu(mfu)
    n_flops = flops_params(s)
    attn = 12 * s.n_layer * facts.seq_len * s.d_attn
    world = st.processes
    tokens_per_step = facts.micro_batch_size * facts.grad_accum_steps * world * facts.seq_len
    tokens = tokens_per_step * facts.max_steps
    methods = [facts.method] if facts.method == "inference" else \
        (["full"] if s.family == "native" else list(METHODS))
    memory = {}
    for method in methods:
        plan = memory_plan(s, replace(st, method=method, fsdp=False, processes=1))
        memory[method] = {**plan.rows(), "trainable_params": plan.trainable_params, "weights_note": plan.weights_note}
    if world > 1 and facts.method != "inference":
        plan = memory_plan(s, replace(st, fsdp=True))
        memory[f"{facts.method} FSDP x{world}"] = {**plan.rows(), "trainable_params": plan.trainable_params,
                                                   "weights_note": plan.weights_note}
    configured = memory_plan(s, replace(st, fsdp=False, processes=1)) if facts.method != "inference" else None
    trainable = configured.trainable_params if configured else 0
    if facts.method in ("lora", "qlora"):
        flops_per_token = lora_flops_per_token(n_flops, trainable, s.n_layer, facts.seq_len, s.d_attn)
    else:
        flops_per_token = transformer_flops_per_token(n_flops, s.n_layer, facts.seq_len, s.d_attn)
    total_flops = flops_per_token * tokens
    result = {
        "recipe": facts.recipe, "model": s.source, "family": s.family, "method": facts.method,
        "params": {"total": counts.total, "trainable": trainable, "active": counts.active,
                   "embedding": counts.embedding, "non_embedding": counts.total - counts.embedding,
                   "flops_params": n_flops},
        "shape": {"n_layer": s.n_layer, "d_model": s.d_model, "n_head": s.n_head, "n_kv_head": s.n_kv_head,
                  "mlp_hidden": s.mlp_hidden, "vocab_size": s.vocab_size, "n_experts": s.n_experts,
                  "top_k": s.top_k},
        "run": {"seq_len": facts.seq_len, "micro_batch_size": facts.micro_batch_size,
                "grad_accum_steps": facts.grad_accum_steps, "processes": world, "steps": facts.max_steps,
                "tokens_per_step": tokens_per_step, "tokens": tokens, "weights_dtype": facts.weights_dtype,
                "compute_dtype": facts.compute_dtype, "device": st.device,
                "gradient_checkpointing": st.gradient_checkpointing},
        "compute": {"flops_per_token": flops_per_token, "flops_per_token_6n": 6 * n_flops,
                    "attention_flops_per_token": attn, "c_6nd_flops": 6 * n_flops * tokens,
                    "total_flops": total_flops, "chinchilla_tokens": chinchilla_tokens(counts.active),
                    "gpu": gpu_name, "peak_tflops": peak, "mfu": mfu,
                    "wall_time_s": total_flops / (peak * 1e12 * mfu * world) if tokens else 0.0},
        "memory_bytes": memory,
        "what_fits": what_fits(counts.total),
        "notes": facts.notes + (["LoRA adapts nothing: no linear layer matches lora.target_modules (tune run refuses "
                                 "such a config: check the names)"]
                                if facts.method in ("lora", "qlora") and trainable == 0 else []),
    }
    return result


def what_fits(n_params: int) -> dict:
    """Inference weight memory of n_params at 16 / 8 / 4 bits (bytes), and with nf4 + double quantisation."""
    out = inference_weight_bytes(n_params)
    out["nf4+dq"] = int(n_params * (0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NESTED_BLOCK)))
    return out


def format_size_answer(n_params: int) -> str:
    """The "what fits" answer for a bare parameter count (tune plan --model-size)."""
    fits = what_fits(n_params)
    lines = [f"{_count(n_params)} parameters: inference weight memory (weights only; KV cache and activations extra)"]
    for name, label in (("fp16", "fp16 / bf16   2 bytes/param"), ("int8", "int8          1 byte/param"),
                        ("int4", "int4          0.5 bytes/param"),
                        ("nf4+dq", "nf4 + dq      0.5 + 1/64 + 4/16384 bytes/param (bitsandbytes)")):
        lines.append(f"  {label:<62} {fits[name] / GB:>10,.1f} GB  ({fits[name] / GIB:,.1f} GiB)")
    return "\n".join(lines)


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: dict) -> str:
    """The plan as readable text: parameters, compute, the memory table (GiB per process), what fits."""
    p, r, c, s = plan["params"], plan["run"], plan["compute"], plan["shape"]
    out = [f"model      {plan['model']}",
           f"           {s['n_layer']} layers, d_model {s['d_model']}, {s['n_head']} heads ({s['n_kv_head']} kv), "
           f"mlp {s['mlp_hidden']}, vocab {s['vocab_size']:,}"
           + (f", {s['n_experts']} experts top-{s['top_k']}" if s["n_experts"] else ""),
           f"recipe     {plan['recipe']}, method {plan['method']}; {r['device']}, weights {r['weights_dtype']}, "
           f"compute {r['compute_dtype']}"
           + (", gradient checkpointing" if r["gradient_checkpointing"] else ""),
           "",
           "parameters",
           f"  total            {p['total']:>16,}  ({_count(p['total'])})",
           f"  trainable        {p['trainable']:>16,}  ({100 * p['trainable'] / p['total']:.2f}%)",
           f"  active per token {p['active']:>16,}" + ("  (MoE: experts not routed to excluded)"
                                                       if p["active"] != p["total"] else ""),
           f"  non-embedding    {p['non_embedding']:>16,}"]
    if plan["method"] != "inference":
        out += ["",
                f"compute (global batch {r['micro_batch_size']} x {r['grad_accum_steps']} accum x {r['processes']} "
                f"proc x {r['seq_len']} tokens)",
                f"  FLOPs/token      {c['flops_per_token']:>16,.0f}  (6N = {c['flops_per_token_6n']:,.0f} + attention "
                f"12·L·T·d = {c['attention_flops_per_token']:,.0f}"
                + ("; frozen base: 4N + 6·N_lora" if plan["method"] in ("lora", "qlora") else "") + ")",
                f"  tokens/step      {r['tokens_per_step']:>16,}",
                f"  tokens (run)     {r['tokens']:>16,}  = {r['steps']:,} steps",
                f"  C = 6·N·D        {c['c_6nd_flops']:>16.3e}  FLOPs   (N = {_count(p['flops_params'])} matmul "
                f"params; with attention{' and the frozen base' if plan['method'] in ('lora', 'qlora') else ''}: "
                f"{c['total_flops']:.3e})",
                f"  Chinchilla D     {c['chinchilla_tokens']:>16,}  tokens (20 per parameter; this run: "
                f"{r['tokens'] / max(1, c['chinchilla_tokens']):.3g}x)",
                f"  wall time        {_duration(c['wall_time_s']):>16}  on {r['processes']} x {c['gpu']} "
                f"({c['peak_tflops']:g} TFLOP/s bf16 dense) at MFU {c['mfu']:g}"]
    mem = plan["memory_bytes"]
    cols = list(mem)
    header = [f"{col}{' *' if col == plan['method'] else ''}" for col in cols]
    rows = [k for k in next(iter(mem.values())) if k not in ("trainable_params", "weights_note")]
    unit, scale = ("GiB (2^30 bytes)", GIB) if max(m["peak (estimate)"] for m in mem.values()) >= GIB else \
        ("MiB (2^20 bytes)", 2 ** 20)
    out += ["", f"memory per process, {unit}{'; * = configured method' if len(cols) > 1 else ''}",
            "  " + f"{'':<34}" + "".join(f"{h:>16}" for h in header)]
    for row in rows:
        if all(mem[col][row] == 0 for col in cols):
            continue
        if row == "peak (estimate)":
            out.append("  " + "-" * (34 + 16 * len(cols)))
        out.append("  " + f"{row:<34}" + "".join(f"{mem[col][row] / scale:>16.2f}" for col in cols))
    for col in cols:
        out.append(f"  {col}: weights {mem[col]['weights_note']}")
    out.append("  peak = weights + KV cache + one block's activations + logits: see MemoryPlan.peak_bytes in tune/plan.py"
               if plan["method"] == "inference" else
               "  peak = weights + optimizer + teacher + max(activations + loss, gradients [+ recomputed block with "
               "checkpointing]): see MemoryPlan.peak_bytes in tune/plan.py")
    fits = plan["what_fits"]
    unit, scale = ("GB", GB) if fits["fp16"] >= GB else ("MB", 10 ** 6)
    out += ["", f"what fits: inference weights of {_count(p['total'])} parameters: "
            + ", ".join(f"{k} {fits[k] / scale:,.2f} {unit}" for k in ("fp16", "int8", "int4", "nf4+dq"))
            + f" ({unit} = 10^{9 if unit == 'GB' else 6} bytes; KV cache and activations extra)"]
    out += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(out)


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=2)
