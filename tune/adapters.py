"""Loading a base causal LM for full / LoRA / QLoRA training, and saving or merging what was trained.

LoRA comes from peft and 4-bit quantization from bitsandbytes; this module only decides the settings
and does the one thing they leave to us: merging a QLoRA adapter into the *dequantized* base.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from tune.errors import ConfigError, TuneError
from tune.hf import bnb_config as hf_bnb_config
from tune.hf import check_model_dir, enable_activation_checkpointing, quiet_third_party, resolve_dtype
from tune.train_config import LoraSection, QuantSection, mutates_base  # noqa: F401 - re-exported

INITIAL_ADAPTER = "initial_adapter"  # a PiSSA / OLoRA run's adapter as initialised, in the run directory
PISSA_NITER_SEED = 0  # pissa_niter_N's randomized SVD draws from this seed, so every rebuild computes one residual


def fsdp_active() -> bool:
    """True when this process trains under FSDP: Accelerate's state says so (once an Accelerator exists), or
    `accelerate launch` with an FSDP config set ACCELERATE_USE_FSDP for it."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, str_to_bool

    state = AcceleratorState._shared_state  # read, not AcceleratorState(): that would re-derive the state
    if state:  # an Accelerator was created: it knows (tests/fsdp_cpu.py switches it to FSDP on CPU)
        return state.get("distributed_type") == DistributedType.FSDP
    return bool(str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")))


def quant_storage(quant: QuantSection, fsdp: bool) -> torch.dtype:
    """The dtype bitsandbytes packs the 4-bit weights into. auto: the compute dtype under FSDP, uint8 otherwise.

    FSDP shards float tensors only, and gathers each group in one dtype: with uint8 storage FSDP2 fails, or
    trains on destroyed 4-bit weights (loss 0, grad norm NaN; huggingface/accelerate#3983; accelerate 1.15
    instead leaves them unsharded, whole on every process); a float storage other than the dtype of the
    model's other parameters (the compute dtype: the 4-bit loading gives them that dtype) is cast, which
    scrambles the packed 4-bit codes. Outside FSDP uint8 is bitsandbytes' default and the path measured on
    one process. Raises ConfigError for a qlora.quant_storage FSDP cannot shard correctly.
    """
    compute = resolve_dtype(quant.compute_dtype)
    if quant.quant_storage == "auto":
        return compute if fsdp else torch.uint8
    storage = resolve_dtype(quant.quant_storage)
    if fsdp and storage != compute:
        name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[compute]
        raise ConfigError(f"qlora.quant_storage={quant.quant_storage} cannot be sharded by FSDP (the 4-bit weights must "
                          f"be stored in the compute dtype, {name} here); set qlora.quant_storage=auto (or {name})")
    return storage


def bnb_config(quant: QuantSection, fsdp: bool = False):
    """transformers' BitsAndBytesConfig for QLoRA's `quant` section (4-bit, through tune.hf.bnb_config); fsdp: the
    model will be sharded (see quant_storage)."""
    return hf_bnb_config(quant.quant_type, resolve_dtype(quant.compute_dtype), quant.double_quant,
                         quant_storage(quant, fsdp))


def attention_implementation(path, packed_attention: str = "dense") -> tuple[str, str]:
    """The attn_implementation to load the HF causal LM in `path` with, and a line saying why.

    flex_attention when data.packed_attention=flex, CUDA is available and the model class supports it
    (`_supports_flex_attn`: Llama yes, GPT-2 and OpenAIGPT not in transformers 5); torch 2.13 has no flex_attention
    backward on CPU and transformers compiles it there (slow, and some shapes fail to build), so on CPU packed
    rows use SDPA with a mask built from their document_ids. Otherwise sdpa, or eager for a class without SDPA
    (OpenAIGPT: it can then train unpacked rows only, tune.losses.check_takes_4d_mask).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    name = cls.__name__ if cls is not None else type(config).__name__
    fallback = "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"
    if packed_attention != "flex":
        return fallback, f"attention: {fallback} (data.packed_attention={packed_attention})"
    if cls is None or not getattr(cls, "_supports_flex_attn", False):
        return fallback, (f"attention: {fallback}; {name} has no flex_attention in this transformers, so packed rows "
                          "use a dense mask built from their document ids")
    if not torch.cuda.is_available():
        return fallback, (f"attention: {fallback}; flex_attention needs CUDA to train (torch has no CPU backward), so "
                          "packed rows use a dense mask built from their document ids")
    return "flex_attention", "attention: flex_attention (document-id BlockMask per packed row)"


def load_base_model(path, method: str, dtype: torch.dtype, quant: QuantSection | None = None,
                    gradient_checkpointing: bool = False, attn_implementation: str = "sdpa"):
    """The HF model to train. full: trainable weights in `dtype`; lora: frozen base in `dtype`;
    qlora: frozen 4-bit base prepared for k-bit training.

    SDPA attention by default: dense packed batches carry a 4D block-diagonal bool mask, which SDPA applies
    as given (tune/packing.py); attention_implementation() picks flex_attention for document_ids batches.
    """
    from transformers import AutoModelForCausalLM

    check_model_dir(path, "base_model")
    if method == "qlora":
        with quiet_third_party():
            from peft import prepare_model_for_kbit_training

            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(quant, fsdp_active()),
                                                         dtype=resolve_dtype(quant.compute_dtype),
                                                         device_map=device_map, attn_implementation=attn_implementation,
                                                         trust_remote_code=False)
            keep_4bit_training_kernel(model)
            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                   gradient_checkpointing_kwargs={"use_reentrant": False})
    with quiet_third_party():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=False)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
        if method == "lora":
            model.enable_input_require_grads()
    return model


def keep_4bit_training_kernel(model) -> int:
    """Keep every 4-bit layer of a model being trained on bitsandbytes' fp32 dequantize-then-matmul path.

    bitsandbytes >= 0.49, on CPUs with AVX512-BF16, repacks a `Linear4bit`'s weights in place the first time
    it runs in eval mode without gradients (our validation passes), and from then on computes it with a bf16
    inference kernel: logits move by ~1e-2 against the dequantized weights the adapter trains on, and the
    next training step fails ("a view of a leaf Variable ... in-place operation"), as the packed kernel has no
    backward. A frozen inference-only model (a 4-bit teacher) may keep the fast kernel. Returns the number of
    layers switched (0 when bitsandbytes has no such switch).
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def token_indices(lora: LoraSection, extra: list[int] | None = None) -> list[int] | dict[str, list[int]] | None:
    """peft's trainable_token_indices: lora.trainable_token_indices with the `extra` ids (a recipe's own new tokens)
    added to the list; ConfigError when both are given and lora's is a mapping (the recipe cannot tell its module)."""
    own = lora.trainable_token_indices
    if not extra:
        return own
    if isinstance(own, dict):
        raise ConfigError("lora.trainable_token_indices must be a list of token ids here (this recipe adds its own "
                          "tokens to the input embedding), not a mapping of modules")
    return sorted(set(own or []) | set(extra))


def add_lora(model, lora: LoraSection, trainable_token_indices: list[int] | None = None):
    """Wrap `model` with trainable LoRA adapters (base weights frozen). `trainable_token_indices`: rows of the input
    embedding trained as well (peft's TrainableTokens, which follows a tied output head), e.g. newly added tokens,
    beside those of lora.trainable_token_indices.

    lora.init: peft's init_lora_weights, except loftq (see loftq_init; needs a 4-bit base). PiSSA / OLoRA change
    the base weights: save the adapter with save_adapter (converted to one of the original base). ConfigError for
    an init that does not suit the base (loftq without 4-bit weights, PiSSA / OLoRA with them) or token ids outside
    the embedding."""
    import warnings

    with quiet_third_party():
        from peft import LoraConfig, get_peft_model

    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if lora.init == "loftq" and not quantized:
        raise ConfigError("lora.init=loftq fits the adapter to the error of a 4-bit base and is for method=qlora only; "
                          "use lora.init=default, gaussian, pissa or olora")
    if quantized and mutates_base(lora):
        raise ConfigError(f"lora.init={lora.init} moves part of each base weight into the adapter, which a 4-bit base "
                          "cannot hold exactly; use method=lora for it, or lora.init=loftq with method=qlora")
    tokens = token_indices(lora, trainable_token_indices)
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokens and any(i >= vocab for ids in (tokens.values() if isinstance(tokens, dict) else [tokens]) for i in ids):
        raise ConfigError(f"lora.trainable_token_indices: token ids must be below the input embedding's {vocab} rows, "
                          f"got {tokens!r}")
    check_lora_names(model, lora)
    init = {"default": True, "loftq": True}.get(lora.init, lora.init)  # loftq: loftq_init after get_peft_model
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                        target_modules=lora.target_modules, target_parameters=lora.target_parameters,
                        use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                        layers_to_transform=list(lora.layers_to_transform) if lora.layers_to_transform else None,
                        exclude_modules=list(lora.exclude_modules) if lora.exclude_modules else None,
                        init_lora_weights=init, rank_pattern=dict(lora.rank_pattern or {}),
                        alpha_pattern=dict(lora.alpha_pattern or {}), task_type="CAUSAL_LM",
                        trainable_token_indices=tokens or None)
    with quiet_third_party(), warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself, warns
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        # a tied head / embedding in target_modules: peft adapts that module's output only (right), and
        # merge_adapter unties it on merge, so its warning about merging does not apply
        warnings.filterwarnings("ignore", message=".*tied layer is part of the adapter.*")
        # peft's own MoE target mapping (Mixtral + all-linear) sets rank/alpha patterns for expert parameters and then
        # warns that they match no module: they are applied to the parameters (checked in tests/test_moe.py)
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
        try:
            niter = lora.init.startswith("pissa_niter_")  # its random SVD: the same residual at every rebuild
            with torch.random.fork_rng(devices=[]) if niter else contextlib.nullcontext():
                if niter:
                    torch.manual_seed(PISSA_NITER_SEED)
                wrapped = get_peft_model(model, config)
        except ValueError as e:
            if "lora_dropout" in str(e):  # peft adapts fused MoE expert weights (nn.Parameter) without dropout only
                raise ConfigError(f"lora.dropout={lora.dropout}: LoRA on this model's expert weights (an MoE, e.g. "
                                  "Mixtral) takes no dropout in peft; set lora.dropout=0") from None
            raise ConfigError(f"lora.target_modules={lora.target_modules!r}: {str(e).splitlines()[0]}") from None
    check_lora_targets(wrapped, lora)
    check_lora_patterns(wrapped, lora)
    conv1d = [n for n, m in wrapped.named_modules() if getattr(m, "fan_in_fan_out", False) and hasattr(m, "lora_A")]
    if lora.init == "olora" and conv1d:  # peft's olora_init ignores fan_in_fan_out: A and B get transposed shapes
        raise ConfigError(f"lora.init=olora: peft builds it wrongly for Conv1D layers (GPT-2 style, e.g. "
                          f"{conv1d[0].rpartition('.')[2]}); use lora.init=pissa (or default) with this model")
    if mutates_base(lora) and (shared := untie_adapted_weights(wrapped, dry_run=True)):
        raise ConfigError(f"lora.init={lora.init} would change {shared[0]}, whose weight the model shares with another "
                          "module (tied embeddings); leave it out of lora.target_modules or use lora.init=default")
    if lora.init == "loftq":
        loftq_init(wrapped, model.name_or_path)
    return wrapped


def check_lora_names(model, lora: LoraSection) -> None:
    """ConfigError, before peft wraps `model`, for the lora.* settings that name parts of it and would otherwise fail
    in peft under another key's name or be ignored: a layers_to_transform index past the model's decoder layers, an
    exclude_modules entry that is no module of the model (peft only warns), a trainable_token_indices module that
    does not exist."""
    import re

    names = [name for name, _ in model.named_modules() if name]
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if lora.layers_to_transform and isinstance(layers, int) and max(lora.layers_to_transform) >= layers:
        raise ConfigError(f"lora.layers_to_transform={lora.layers_to_transform}: the model has {layers} decoder layers "
                          f"(indices 0 to {layers - 1}); give indices below {layers}")
    for name in lora.exclude_modules or []:
        if not any(n == name or n.endswith("." + name) for n in names):
            raise ConfigError(f"lora.exclude_modules: {name!r} is no module of the model, so it excludes nothing; "
                              "check the name (e.g. o_proj, down_proj)")
    tokens = lora.trainable_token_indices
    for name in tokens if isinstance(tokens, dict) else []:
        if not any(n == name or n.endswith("." + name) or re.fullmatch(name, n) for n in names):
            raise ConfigError(f"lora.trainable_token_indices: {name!r} is no module of the model; name its input "
                              "embedding (e.g. embed_tokens, wte) or give a plain list of token ids")


def check_lora_patterns(model, lora: LoraSection) -> None:
    """ConfigError naming the first key of lora.rank_pattern / lora.alpha_pattern that matches no adapted module or
    parameter: peft ignores it (with a warning), so the rank or alpha it sets would silently not apply. Matching is
    peft's (peft.utils.other.get_pattern_key): the key, a regex, matches a name's end at a dot."""
    import re

    adapted = list(model.targeted_module_names) + list(getattr(model, "targeted_parameter_names", []))
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(lora, key) or {}:
            if not any(re.match(rf"(.*\.)?({pattern})$", name) for name in adapted):  # (LoraSection checked the regex)
                raise ConfigError(f"lora.{key}: {pattern!r} matches no module LoRA adapts (lora.target_modules); "
                                  "name one of them (e.g. q_proj, or a regex such as layers\\.0\\..*q_proj)")


def check_lora_targets(model, lora: LoraSection) -> None:
    """ConfigError naming the first entry of lora.target_modules / lora.target_parameters that adapted nothing (peft
    only fails when no entry matches at all), with the fix: an MoE's 3-D expert weights are parameters, not modules."""
    modules, parameters = model.targeted_module_names, getattr(model, "targeted_parameter_names", [])
    param_names = [name for name, _ in model.named_parameters()]
    for key, wanted, adapted in (("target_modules", lora.target_modules, modules),
                                 ("target_parameters", lora.target_parameters, parameters)):
        for name in wanted if isinstance(wanted, list) else []:
            if any(a == name or a.endswith("." + name) for a in adapted):
                continue
            if key == "target_modules" and any(p.endswith("." + name) for p in param_names):
                raise ConfigError(f"lora.target_modules: {name!r} is a parameter (an MoE's expert weights), not a "
                                  f"linear layer; put it in lora.target_parameters")
            raise ConfigError(f"lora.{key}: {name!r} matches no {'linear layer' if key == 'target_modules' else 'parameter'}"
                              f" of the model; check the names (e.g. q_proj, v_proj) or use target_modules=all-linear")


def full_precision_weight(model_dir, name: str) -> torch.Tensor:
    """The weight `name` (a state-dict key, e.g. model.layers.0.self_attn.q_proj.weight) as stored in the
    safetensors file(s) of the HF model in `model_dir`, read alone (lazily, whatever the model's size).
    TuneError when the model has no safetensors weights or no such tensor."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    except (OSError, ValueError, KeyError) as e:
        raise TuneError(f"{index}: unreadable safetensors index ({e})") from None
    file = model_dir / (weight_map.get(name, "") if weight_map else "model.safetensors")
    if not file.is_file():
        raise TuneError(f"lora.init=loftq reads the base's full-precision weights from its safetensors files, and "
                        f"{model_dir} has none holding {name}; save the base with safetensors")
    with safe_open(file, framework="pt", device="cpu") as f:
        if name not in f.keys():
            raise TuneError(f"lora.init=loftq: {file} has no tensor {name}")
        return f.get_tensor(name)


@torch.no_grad()
def loftq_init(model, base_dir) -> int:
    """LoftQ (Li et al. 2023, one iteration) for a LoRA model on a bitsandbytes 4-bit base: each 4-bit layer's
    lora_A / lora_B are set so that Q + scaling·B·A is the best rank-r approximation of its full-precision weight
    W (read from `base_dir`'s safetensors) that Q, its 4-bit weight, allows: B·A = SVD_r(W - dequant(Q)) / scaling,
    split as B = U·sqrt(S), A = sqrt(S)·Vh. The 4-bit weights are not touched, so the adapter applies to the plain
    4-bit base (resume, export and merge as for default QLoRA).

    peft's replace_lora_weights_loftq does this step but only on CUDA / XPU (its compute device is fixed) and
    without the LoRA scaling (huggingface/peft#1982: with alpha != r it overshoots); this one runs on the layer's
    device, in fp32. Returns the number of layers initialised; TuneError when there is none.
    """
    with quiet_third_party():
        from bitsandbytes.functional import dequantize_4bit
        from peft.tuners.lora import Linear4bit as LoraLinear4bit
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # the module classes of the full-precision model (GPT-2's Conv1D stores its weight transposed), built weightless
    with torch.device("meta"):
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
        plain = dict(AutoModelForCausalLM.from_config(config, trust_remote_code=False).named_modules())
    done = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear4bit) or "default" not in layer.lora_A:
            continue
        key = name.removeprefix("base_model.model.")
        weight = full_precision_weight(base_dir, key + ".weight").float()
        if isinstance(plain.get(key), Conv1D):
            weight = weight.t()
        base = layer.get_base_layer().weight
        error = weight.to(base.device) - dequantize_4bit(base.data, base.quant_state).float()
        U, S, Vh = torch.linalg.svd(error, full_matrices=False)
        r, scaling = layer.r["default"], layer.scaling["default"]
        root = (S[:r] / scaling).sqrt()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.data = (root[:, None] * Vh[:r]).to(a.dtype).contiguous()
        b.data = (U[:, :r] * root).to(b.dtype).contiguous()
        done += 1
    if not done:
        raise TuneError("lora.init=loftq: the model has no 4-bit LoRA layer to initialise")
    return done


def prepare_initial_adapter(model, lora: LoraSection, run_dir, resume: bool = False) -> Path | None:
    """For a PiSSA / OLoRA run: `run_dir`/initial_adapter, the adapter as `model` (just built, untrained) starts,
    written when the run starts afresh (peft's documented first step: saved with init_lora_weights=True), and when
    it `resume`s compared with the rebuilt model's, so the base residual it trains on is the one the run started
    with. None for the other inits. TuneError when a rebuild differs from the saved start."""
    if not mutates_base(lora):
        return None
    from safetensors.torch import load_file

    directory = Path(run_dir) / INITIAL_ADAPTER
    if resume and (directory / "adapter_model.safetensors").is_file():
        from peft import get_peft_model_state_dict

        saved = load_file(directory / "adapter_model.safetensors")
        now = get_peft_model_state_dict(model)
        if saved.keys() != now.keys() or any(not torch.equal(saved[k], now[k].cpu()) for k in saved):
            raise TuneError(f"{directory}: this rebuild of the lora.init={lora.init} model starts from other weights "
                            "than the run did (a different base, or another SVD result on this machine), so it would "
                            "train on another base residual; resume where the run started, or start a new run")
        return directory
    config = model.peft_config["default"]
    init = config.init_lora_weights
    try:
        config.init_lora_weights = True  # loaded back (for the conversion) as a plain adapter: no second SVD
        model.save_pretrained(directory)
    finally:
        config.init_lora_weights = init
    return directory


def save_adapter(model, out, initial: Path | None = None) -> Path:
    """Save the PEFT adapter of `model` to `out`. `initial` (a PiSSA / OLoRA run's initial_adapter): the trained
    adapter is converted to one of the original, untouched base (peft's path_initial_model_for_weight_conversion:
    [A | A0] and [B | -B0], rank 2r, alpha 2·alpha), which plain peft loads on that base and merge_adapter merges."""
    import shutil
    import tempfile
    import warnings

    out = Path(out)
    if initial is None:
        model.save_pretrained(out)
        return out
    if not (Path(initial) / "adapter_model.safetensors").is_file():
        raise TuneError(f"{initial} is missing: a lora.init=pissa / olora run keeps its starting adapter there, and "
                        "without it the trained adapter cannot be converted for the original base")
    # peft rewrites the initial adapter's config and loads it by its folder name as a second adapter: a copy
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "initial_adapter"
        shutil.copytree(initial, start)
        with warnings.catch_warnings():  # loading the start beside the trained adapter: the very conversion it advises
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
            model.save_pretrained(out, path_initial_model_for_weight_conversion=str(start))
    return out


def dequantized_weights(model) -> dict[str, torch.Tensor]:
    """Module name -> the dequantized weight (Linear layout, out x in) of every 4-bit layer of `model`."""
    with quiet_third_party():
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name] = dequantize_4bit(module.weight.data, module.weight.quant_state).float().cpu()
    return out


def untie_adapted_weights(model, dry_run: bool = False) -> list[str]:
    """Give every LoRA-adapted layer of a PeftModel whose weight it shares with another module (a tied output
    head: `lm_head` and the input embedding are one tensor) its own copy of that weight, so merging the adapter
    changes that layer only, as the adapter model does: peft adds LoRA's delta to the layer's output, never
    to the shared tensor, but `merge_and_unload` adds it to the weight in place, which would move the tied
    module too. Sharing is found by tensor address (`data_ptr()`), whatever the modules are called.

    Unties the config (`tie_word_embeddings=False`, in every sub-model's config) when something was untied,
    and copies every other tied weight too, so the saved checkpoint holds each of them under its own key.
    Returns the names of the adapted layers that were given their own weight (empty: nothing shared); `dry_run`:
    only those names, nothing changed.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import PreTrainedModel

    def address(tensor):  # tied parameters are one tensor: same object, same address
        return tensor.data_ptr()

    users: dict[int, set[str]] = {}  # address -> the modules holding a parameter there
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(address(param), set()).add(name.rpartition(".")[0])
    module_names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    untied = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and users[address(weight)] - {module_names[id(base)]}:
            if not dry_run:
                base.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied.append(name.removeprefix("base_model.model."))
    if untied and not dry_run:
        # Untied in the config, every other shared weight must also be saved under each of its names.
        seen = set()
        for module in model.modules():
            for key, param in list(module.named_parameters(recurse=False)):
                if address(param) in seen:
                    setattr(module, key, torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
                seen.add(address(param))
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and getattr(module.config, "tie_word_embeddings", False):
                module.config.tie_word_embeddings = False
    return untied


def merge_adapter(base_path, adapter_dir, out_dir, dtype: torch.dtype = torch.float32,
                  quant: QuantSection | None = None, tokenizer=None, vocab_size: int | None = None) -> Path:
    """Merge a LoRA adapter into its base and save a full HF checkpoint.

    For QLoRA (`quant` given) the adapter was trained on the 4-bit weights, so it is merged into those
    weights dequantized (not into the original full-precision ones, and never re-quantized): the
    merged model computes what the adapter model computed.

    A tied base (`tie_word_embeddings=True`) whose tied output head (or input embedding) was adapted is
    saved untied: the adapted module gets its own merged weight, the other keeps the base's exactly,
    and the config says `tie_word_embeddings=False` (`merge_info.json` lists the modules under
    "untied"). Otherwise the checkpoint keeps the base's tying.

    `vocab_size`: the base's embeddings are first grown to it as the run grew them (tune.task_heads.resize_embeddings:
    tokens the run added, whose trained rows the adapter holds).
    """
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with quiet_third_party():
        from peft import PeftModel

    with quiet_third_party():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=False)
    if vocab_size is not None:
        from tune.task_heads import resize_embeddings

        resize_embeddings(base, vocab_size)
    if quant is not None:
        with quiet_third_party():
            quantized = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=bnb_config(quant),
                                                             dtype=resolve_dtype(quant.compute_dtype),
                                                             trust_remote_code=False)
        modules = dict(base.named_modules())
        for name, weight in dequantized_weights(quantized).items():
            target = modules[name]
            target.weight.data = (weight.t() if isinstance(target, Conv1D) else weight).contiguous()
        del quantized
    # peft warns about adapting and merging tied modules: untie_adapted_weights handles them
    with quiet_third_party(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*no longer tied after merging.*")
        adapted = PeftModel.from_pretrained(base, adapter_dir)
        untied = untie_adapted_weights(adapted)
        merged = adapted.merge_and_unload()
    merged.to(dtype)
    out_dir = Path(out_dir)
    with quiet_third_party():
        merged.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "merge_info.json").write_text(json.dumps(
        {"base_model": str(base_path), "adapter": str(adapter_dir), "dequantized_4bit_base": quant is not None,
         "dtype": str(dtype).replace("torch.", ""), "untied": untied}, indent=2))
    return out_dir


COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_COMBINATIONS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # keep a fraction of each adapter
SAME_RANK_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # combine A and B as is
COMBINED = "combined"  # the adapter name add_weighted_adapter writes into


def check_combination(adapters: list, weights: list[float] | None, combination: str, density: float | None,
                      svd_rank: int | None) -> list[float]:
    """The weights of combine_adapters (1.0 each when None), after ConfigErrors for its arguments: fewer than two
    adapters, a weights count that differs, a combination peft does not know, a density missing, out of (0, 1] or
    given where it means nothing, an svd_rank outside svd. No torch, no files read."""
    if len(adapters) < 2:
        raise ConfigError("tune merge-adapters combines two or more adapters; give their directories")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise ConfigError(f"--weights gives {len(weights)} weights for {len(adapters)} adapters; give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"--weights must be finite numbers, got {weights}")
    if combination not in COMBINATIONS:
        raise ConfigError(f"--combination {combination!r} is not one of {', '.join(COMBINATIONS)}")
    if combination in DENSITY_COMBINATIONS and density is None:
        raise ConfigError(f"--combination {combination} needs --density D (the fraction of each adapter's values kept, "
                          "e.g. 0.5)")
    if combination not in DENSITY_COMBINATIONS and density is not None:
        raise ConfigError(f"--density applies to {', '.join(DENSITY_COMBINATIONS)}, not to {combination}")
    if density is not None and not 0 < density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {density}")
    if svd_rank is not None and (combination != "svd" or svd_rank < 1):
        raise ConfigError(f"--svd-rank applies to --combination svd and must be >= 1, got {svd_rank} with {combination}")
    return weights


def adapter_settings(adapter) -> dict:
    """adapter_config.json of the PEFT adapter directory `adapter`; ConfigError when there is none (or unreadable)."""
    path = Path(adapter) / "adapter_config.json"
    if not Path(adapter).is_dir():
        raise ConfigError(f"adapter {adapter} does not exist (paths are relative to where you run tune)")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapter {adapter}: no readable adapter_config.json ({e.__class__.__name__}); give a PEFT "
                          "adapter directory (e.g. a finetune run's adapter/)") from None
    if not isinstance(settings, dict) or settings.get("peft_type") != "LORA":
        raise ConfigError(f"adapter {adapter}: not a LoRA adapter (peft_type {settings.get('peft_type')!r})")
    return settings


def combination_base(adapters: list, base=None) -> Path:
    """The base model every adapter was trained on: `base`, else the one they record (base_model_name_or_path).
    ConfigError when they record different local bases, `base` differs from what one records, or none is known."""
    recorded = {}
    for adapter in adapters:
        path = adapter_settings(adapter).get("base_model_name_or_path")
        if isinstance(path, str) and path and Path(path).is_dir():
            recorded[str(adapter)] = Path(path).resolve()
    if base is not None:
        wrong = {a: p for a, p in recorded.items() if p != Path(base).resolve()}
        if wrong:
            adapter, path = next(iter(wrong.items()))
            raise ConfigError(f"adapter {adapter} was trained on {path}, not --base {base}: adapters combine only on "
                              "their own base")
        return Path(base)
    if len(set(recorded.values())) > 1:
        (first, path), *others = recorded.items()
        other, other_path = next((a, p) for a, p in others if p != path)
        raise ConfigError(f"adapters of different bases: {first} was trained on {path}, {other} on {other_path}; "
                          "combine adapters of one base")
    if not recorded:
        raise ConfigError("the adapters record no base model directory that exists here; give it with --base DIR")
    return next(iter(recorded.values()))


def check_outputs(adapters: list, base, out, merged=None) -> None:
    """ConfigError when merge-adapters' outputs would overwrite what it reads or each other: --out and --merge one
    directory (the merged checkpoint would replace the combined adapter), or either of them the base, one of the
    adapters or a directory holding one (with --force they would be deleted)."""
    outputs = [("--out", Path(out))] + ([("--merge", Path(merged))] if merged is not None else [])
    if merged is not None and Path(out).resolve() == Path(merged).resolve():
        raise ConfigError(f"--out and --merge are both {out}: the merged checkpoint would replace the combined "
                          "adapter; give --merge another directory")
    inputs = [("--base", Path(base))] + [("adapter", Path(a)) for a in adapters]
    for flag, path in outputs:
        for what, source in inputs:
            if source.resolve().is_relative_to(path.resolve()):
                raise ConfigError(f"{flag} {path} would replace {what} {source}, which merge-adapters reads; write to "
                                  "another directory")


def combine_adapters(adapters: list, out, weights: list[float] | None = None, combination: str = "linear",
                     density: float | None = None, svd_rank: int | None = None, base=None, merged=None,
                     quant: QuantSection | None = None):
    """Combine LoRA adapters of one base into one with peft's add_weighted_adapter and save it to `out` as a plain
    PEFT adapter directory (rank: the adapters' for linear / ties / dare_* / magnitude_prune, their sum for cat,
    `svd_rank` or their largest for svd; lora_alpha = rank, the adapters' scalings being folded into A and B).

    linear: A = Σ sign(wᵢ)·sqrt(|wᵢ·sᵢ|)·Aᵢ and B = Σ sqrt(|wᵢ·sᵢ|)·Bᵢ (sᵢ: adapter i's alpha / r), so B·A is not
    Σ wᵢ·sᵢ·Bᵢ·Aᵢ (cross terms); cat and svd give that sum exactly (svd: truncated to its rank). ties, dare_*,
    magnitude_prune keep `density` of each adapter's A and B values (dare: at random, rescaled) before summing.
    `merged`: also write the base with the combined adapter merged in (merge_adapter) there. `quant`: QLoRA
    adapters (trained under that section): the base is loaded 4-bit, and merged into its dequantized weights.

    Returns the PeftModel (fp32, or the 4-bit base for `quant`) with the combined adapter active. ConfigError for what
    check_combination refuses, missing adapter directories, adapters of different bases, unequal ranks where the
    combination needs one rank, and adapters whose extra parts peft cannot combine (DoRA, rsLoRA, trainable
    tokens, modules_to_save, target_parameters, rank patterns with a one-rank combination)."""
    weights = check_combination(adapters, weights, combination, density, svd_rank)
    settings = [adapter_settings(a) for a in adapters]
    base = combination_base(adapters, base)
    check_model_dir(base, "--base")
    check_outputs(adapters, base, out, merged)
    for adapter, s in zip(adapters, settings):
        for key, what in (("use_dora", "DoRA magnitudes"), ("use_rslora", "rank-stabilised scaling (use_rslora)"),
                          ("trainable_token_indices", "trainable tokens"), ("modules_to_save", "modules_to_save"),
                          ("target_parameters", "target_parameters")):
            if s.get(key):
                raise ConfigError(f"adapter {adapter} has {what}, which peft's add_weighted_adapter cannot combine; "
                                  "combine plain LoRA adapters")
        if s.get("rank_pattern") and combination in SAME_RANK_COMBINATIONS:
            raise ConfigError(f"adapter {adapter} has a lora.rank_pattern: --combination {combination} needs one rank "
                              "in every layer; use cat or svd")
    ranks = {str(a): s.get("r") for a, s in zip(adapters, settings)}
    if combination in SAME_RANK_COMBINATIONS and len(set(ranks.values())) > 1:
        raise ConfigError(f"--combination {combination} needs adapters of one rank, got "
                          f"{', '.join(f'{a} r={r}' for a, r in ranks.items())}; use cat or svd (or retrain)")
    import transformers.utils.logging  # noqa: F401 - loaded first, so quiet_third_party hides its progress bars

    with quiet_third_party():
        return _combine(adapters, out, weights, combination, density, svd_rank, base, merged, quant)


def explicit_targets(model, names: list[str]) -> bool:
    """When the loaded adapters `names` of a PeftModel restrict their targets differently (layers_to_transform,
    layers_pattern, exclude_modules), give each the set of full names of the modules it adapted as target_modules and
    drop those restrictions. add_weighted_adapter builds the combined adapter with the union of the target_modules but
    the first adapter's restrictions, so the others' layers outside them were silently left out. Returns whether the
    configs were rewritten."""
    from peft.tuners.lora import LoraLayer

    keys = ("layers_to_transform", "layers_pattern", "exclude_modules")
    restrictions = [tuple(str(getattr(model.peft_config[n], k, None)) for k in keys) for n in names]
    if len(set(restrictions)) == 1:
        return False
    for name in names:
        config = model.peft_config[name]
        config.target_modules = {m.removeprefix("base_model.model.") for m, layer in model.named_modules()
                                 if isinstance(layer, LoraLayer) and (name in layer.lora_A or name in
                                                                      layer.lora_embedding_A)}
        config.layers_to_transform = config.layers_pattern = config.exclude_modules = None
    return True


def _combine(adapters, out, weights, combination, density, svd_rank, base, merged, quant):
    """combine_adapters' work once its arguments are checked (called inside quiet_third_party)."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tune.files import directory_written_aside

    names = [f"adapter{i}" for i in range(len(adapters))]
    if quant is not None:
        model = load_base_model(base, "qlora", torch.float32, quant)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=False)
    try:
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:]):
            model.load_adapter(adapter, adapter_name=name)
    except RuntimeError as e:  # load_state_dict: the adapter's shapes are another model's
        raise ConfigError(f"the adapters do not fit --base {base} ({str(e).splitlines()[0][:160]}); give the base "
                          "model they were trained on") from None
    explicit_targets(model, names)
    if svd_rank is not None:  # peft's SVD cannot give more directions than a layer has (it fails on the shapes)
        from peft.tuners.lora import LoraLayer

        smallest = min((min(m.in_features, m.out_features), n) for n, m in model.named_modules()
                       if isinstance(m, LoraLayer))
        if svd_rank > smallest[0]:
            raise ConfigError(f"--svd-rank {svd_rank} is more than the {smallest[0]} dimensions of the adapted layer "
                              f"{smallest[1].removeprefix('base_model.model.')}; give --svd-rank {smallest[0]} or less")
    try:
        model.add_weighted_adapter(names, weights, COMBINED, combination_type=combination, density=density,
                                   svd_rank=svd_rank)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"peft cannot combine these adapters: {str(e).splitlines()[0]}") from None
    model.set_adapter(COMBINED)
    for name in names:
        model.delete_adapter(name)
    tokenizer = None  # the first adapter's (a finetune run saves it there), else the base's; saved beside the result
    for source in (Path(adapters[0]), Path(base)):
        if (source / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            break
    with directory_written_aside(Path(out)) as tmp:
        model.save_pretrained(tmp, selected_adapters=[COMBINED])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for item in (tmp / COMBINED).iterdir():  # peft saves a non-default adapter in a folder of its name
            shutil.move(str(item), tmp / item.name)
        (tmp / COMBINED).rmdir()
        (tmp / "combine_info.json").write_text(json.dumps(
            {"base_model": str(base), "adapters": [str(a) for a in adapters], "weights": weights,
             "combination": combination, "density": density, "svd_rank": svd_rank}, indent=2))
    if merged is not None:
        with directory_written_aside(Path(merged)) as tmp:
            merge_adapter(base, out, tmp, quant=quant, tokenizer=tokenizer)
    return model.eval()
