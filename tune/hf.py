"""Loading Hugging Face models, adapters and tokenizers from local directories, with clear errors.

Every recipe and `tune generate` load through here, so a wrong path, a directory that is not a causal
LM, or a tokenizer that cannot pad fails the same way: one line naming the key, the path and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
import logging
import sys
import warnings
from pathlib import Path

from tune.errors import ConfigError, DataError

# torch and transformers are imported inside the functions that need them: `tune validate` checks model
# directories through the json helpers here and stays free of both (about 3 s of imports).

class _DropKernelsHint(logging.Filter):
    """bitsandbytes' CPU backend logs at import that it could not fetch an optional kernel from the Hub
    ("pip install kernels"): nothing our LoRA, generation or fp32 runs use. Its LLM.int8 matmul logs on every
    call that it casts fp32/bf16 inputs to fp16, which is how LLM.int8 works (tune.hf.bnb_config says so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "pip install kernels" not in message and "during quantization" not in message


@contextlib.contextmanager
def quiet_third_party():
    """Around our own calls into peft / transformers / datasets, silence their messages that ask nothing of
    the user: bitsandbytes' "pip install kernels" hint (logged when peft imports bitsandbytes), transformers'
    FutureWarning about `is_gradient_checkpointing` (peft reads that deprecated property), peft's note that it
    set `fan_in_fan_out` for GPT-2's Conv1D, datasets' "Saving the dataset" and transformers' "Loading weights"
    / "Writing model shards" progress bars. Everything else they say still shows, and the settings are restored
    on exit."""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    hint_filter = _DropKernelsHint()
    bnb_logger.addFilter(hint_filter)
    datasets = sys.modules.get("datasets")  # only if the caller uses it: importing datasets is not free
    bars_were_on = datasets is not None and not datasets.are_progress_bars_disabled()
    if bars_were_on:
        datasets.disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")  # "Loading weights" / "Writing model shards" bars
    hf_bars_were_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if hf_bars_were_on:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself, and says so on every load and merge
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            yield
    finally:
        bnb_logger.removeFilter(hint_filter)
        if bars_were_on:
            datasets.enable_progress_bars()
        if hf_bars_were_on:
            hf_logging.enable_progress_bar()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _named(field: str, path) -> str:
    """How messages name an input: `base_model=DIR` for a config key, `--model DIR` for a command-line option."""
    return f"{field} {path}" if field.startswith("-") else f"{field}={path}"


def read_model_config(path) -> dict:
    """config.json of an HF model directory as a dict (json only, no transformers); a DataError if unreadable."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: not a valid transformers config ({_first_line(e)})") from None
    except RecursionError:
        raise DataError(f"{file}: not a valid transformers config (JSON nested too deeply)") from None
    if not isinstance(config, dict):
        raise DataError(f"{file}: not a valid transformers config (not a JSON object)")
    return config


def position_table_size(path) -> int | None:
    """The size of the learned position table of the HF model in `path` (GPT-2 / OpenAIGPT `n_positions`),
    read from its config.json; None for models without one.

    Only learned tables are a hard limit: a longer input indexes past the table (IndexError in the
    embedding). RoPE models (Llama) compute positions, so their `max_position_embeddings` is the trained
    context, not a table; longer inputs run (with degrading quality), so it is not enforced here.
    """
    value = read_model_config(path).get("n_positions")
    return value if isinstance(value, int) and value > 0 else None


# causal-LM heads by class-name suffix (GPT2LMHeadModel, OpenAIGPTLMHeadModel, LlamaForCausalLM, ...): accepted
# from config.json alone; any other architecture is judged by transformers' own model mappings
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_model_dir(path, field: str = "model") -> Path:
    """A ConfigError if `path` does not exist; a DataError unless it is an HF causal-LM directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{_named(field, path)} does not exist (paths are relative to where you run tune)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DataError(f"{_named(field, path)} is not a Hugging Face model directory (no config.json); point it at a "
                        "directory written by save_pretrained")
    config = read_model_config(path)
    check_no_custom_code(path, field, config)
    architectures = config.get("architectures") or []
    causal_by_name = (isinstance(architectures, list) and architectures and "model_type" in config
                      and not config.get("is_encoder_decoder")
                      and all(isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in architectures))
    if not causal_by_name:
        _check_causal_with_transformers(path, field)
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise DataError(
                f"{_named(field, path)} holds only pickle weights ({', '.join(pickles[:3])}), which are never loaded "
                "(unpickling can run code); convert once, on a trusted copy: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{path}', use_safetensors=False).save_pretrained("
                f"'{path}')\"")
        raise DataError(f"{_named(field, path)}: no weights (*.safetensors) in the directory")
    return path


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files: pytorch_model.bin, ...


def check_no_custom_code(path, field: str, config: dict | None = None) -> None:
    """A DataError if the model (or tokenizer) directory asks for code of its own: `auto_map` in config.json or
    tokenizer_config.json (transformers would import Python files from the directory, after a y/N prompt).
    We never run such code (every from_pretrained here passes trust_remote_code=False)."""
    path = Path(path)
    if config is None:
        config = read_model_config(path) if (path / "config.json").is_file() else {}
    files = {"config.json": config}
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            files["tokenizer_config.json"] = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            reason = "JSON nested too deeply" if isinstance(e, RecursionError) else _first_line(e)
            raise DataError(f"{tokenizer_config}: not a valid tokenizer config ({reason})") from None
    for name, data in files.items():
        if isinstance(data, dict) and "auto_map" in data:
            raise DataError(f"{_named(field, path)}: {path / name} has auto_map: it needs custom Python code from its "
                            "directory, which tune never runs; use a model transformers supports natively (if this "
                            "one is, delete auto_map from the file)")


def _check_causal_with_transformers(path: Path, field: str) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                           MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES)

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise DataError(f"{path}/config.json: not a valid transformers config ({_first_line(e)})") from None
    causal_classes = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    architectures = list(getattr(config, "architectures", None) or [])
    base_class = MODEL_MAPPING_NAMES.get(config.model_type)
    causal_names = set(causal_classes if isinstance(causal_classes, (list, tuple)) else [causal_classes])
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if (causal_classes is None or getattr(config, "is_encoder_decoder", False) or encoder
            or (architectures and not any(a in causal_names or a == base_class for a in architectures))):
        kind = f"architectures {architectures}" if architectures else f"model_type {config.model_type!r}"
        raise DataError(f"{_named(field, path)}: {kind} is not a causal language model (AutoModelForCausalLM cannot "
                        "load it); point it at a decoder-only LM such as GPT-2 or Llama")


def check_adapter_dir(path, field: str = "adapter") -> Path:
    """A ConfigError if `path` does not exist; a DataError unless it is a peft adapter directory with safetensors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{_named(field, path)} does not exist (paths are relative to where you run tune)")
    if not (path / "adapter_config.json").is_file():
        raise DataError(f"{_named(field, path)} is not a peft adapter directory (no adapter_config.json); point it at "
                        "the adapter a LoRA run saved (e.g. runs/lora_ni/adapter)")
    try:
        json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "JSON nested too deeply" if isinstance(e, RecursionError) else _first_line(e)
        raise DataError(f"{path / 'adapter_config.json'}: not a valid adapter config ({reason})") from None
    if not any(path.glob("*.safetensors")) and any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
        raise DataError(f"{_named(field, path)} holds only pickle weights (adapter_model.bin), which are never loaded "
                        "(unpickling can run code); save the adapter again with save_pretrained (safetensors)")
    return path


_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "uint8": "uint8"}


def resolve_dtype(name: str):
    """The torch dtype of a config name (bf16, fp32, fp16, uint8); auto: bf16 on a GPU that supports it, else fp32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, _DTYPES[name])


def check_moe_lora_dropout(lora, base) -> None:
    """ConfigError when LoRA would reach the expert weights of an MoE base (all-linear or lora.target_parameters)
    with lora.dropout > 0, which peft does not support there (config.json read as JSON)."""
    config = read_model_config(base)
    experts = (lora.target_modules == "all-linear" or lora.target_parameters) and \
        (config.get("num_local_experts") or config.get("num_experts"))
    if experts and lora.dropout > 0:
        raise ConfigError(f"lora.dropout={lora.dropout}: LoRA on the expert weights of base_model (an MoE, "
                          f"{config.get('model_type')}) takes no dropout in peft; set lora.dropout=0")


def quantize_info(model_dir) -> dict:
    """`tune quantize`'s record in `model_dir` (quantize_info.json: source, adapter merged, settings), or {}."""
    try:
        info = json.loads((Path(model_dir) / "quantize_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


def adapter_base_mismatch(adapter, model_dir) -> str | None:
    """The base model path an adapter records (`base_model_name_or_path` in adapter_config.json) when it is a
    local directory other than `model_dir` (compared resolved); None when they agree or the adapter says nothing
    usable (e.g. a hub name, or a base that was moved away)."""
    try:
        recorded = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(recorded, str) or not recorded or not Path(recorded).is_dir():
        return None
    return None if Path(recorded).resolve() == Path(model_dir).resolve() else recorded


QUANT_KINDS = ("int8", "nf4", "fp4")  # bitsandbytes' LLM.int8 and its two 4-bit data types


def check_quant(quant, field: str = "quant") -> None:
    """A ConfigError unless `quant` is None or one of QUANT_KINDS (no torch: `tune validate` calls it)."""
    if quant is not None and quant not in QUANT_KINDS:
        raise ConfigError(f"{field}={quant!r} is not one of {list(QUANT_KINDS)}; int8 is LLM.int8 (about half the "
                          "memory of bf16), nf4 / fp4 are 4-bit (about a quarter)")


def bnb_config(kind: str, compute_dtype=None, double_quant: bool = True, quant_storage=None):
    """The one place transformers' BitsAndBytesConfig is built (inference, QLoRA, a quantized teacher).

    kind: "int8" (LLM.int8: row-wise absmax int8 weights, activation outlier columns above 6.0 in fp16),
    "nf4" or "fp4" (4-bit blocks of 64 with an absmax each; double_quant also quantizes those absmaxes).
    compute_dtype: the dtype 4-bit layers dequantize to and multiply in (default bf16 on a GPU that has it,
    fp32 otherwise); int8 computes in fp16 (bitsandbytes casts the inputs). quant_storage: the dtype the 4-bit
    codes are packed into (default uint8; FSDP needs a float one, see tune.adapters.quant_storage).
    Raises ConfigError for another kind.
    """
    from transformers import BitsAndBytesConfig

    check_quant(kind)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = compute_dtype if compute_dtype is not None else resolve_dtype("auto")
    extra = {} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, **extra)


def stored_quant(model_dir) -> str | None:
    """The QUANT_KINDS name of a checkpoint saved quantized (its config.json has a bitsandbytes
    quantization_config: `tune quantize` output), "other" for another quantization method, None if not quantized."""
    config = read_model_config(model_dir).get("quantization_config")
    if not isinstance(config, dict):
        return None
    if config.get("quant_method") != "bitsandbytes":
        return "other"
    if config.get("load_in_8bit"):
        return "int8"
    if config.get("load_in_4bit"):
        return str(config.get("bnb_4bit_quant_type", "fp4"))
    return "other"


def unquantized_experts(model) -> tuple[int, int]:
    """(count, elements) of the fused MoE expert weights left in full precision by a bitsandbytes load.

    transformers 5's Mixtral (and our MoE export) stores each layer's experts as stacked 3-D parameters
    (`experts.gate_up_proj`, `experts.down_proj`), not nn.Linear layers, and bitsandbytes replaces only linear
    layers: those weights, most of an MoE's parameters, stay in the load dtype."""
    count = elements = 0
    for name, param in model.named_parameters():
        if param.dim() == 3 and ".experts." in f".{name}":
            count, elements = count + 1, elements + param.numel()
    return count, elements


def experts_note(model, quant: str) -> str | None:
    """A `note:` line when `quant` left MoE expert weights unquantized (see unquantized_experts), else None."""
    count, elements = unquantized_experts(model)
    if not count:
        return None
    # a packed 4-bit weight holds 2 parameters per byte (its quant_state has the real shape)
    total = sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
                for p in model.parameters())
    return (f"note: quant={quant} leaves this MoE's {count} fused expert weights ({elements / max(total, 1):.0%} of "
            "the parameters) unquantized: bitsandbytes replaces nn.Linear layers only (here the attention "
            "projections), so the experts take as much memory as without quant")


def silence_int8_cast_message() -> None:
    """bitsandbytes' LLM.int8 matmul logs "inputs will be cast from ... to float16" on every call (every layer of
    every generated token): how LLM.int8 works, not a problem. Dropped for the process once an int8 model loads."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropKernelsHint) for f in logger.filters):
        logger.addFilter(_DropKernelsHint())


def fit_cpu_4bit_kernel(model) -> int:
    """Keep the 4-bit layers bitsandbytes' CPU inference kernel cannot take on its dequantize-then-matmul path.

    bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks a Linear4bit the first time it runs in eval mode without
    gradients; the repacking needs in_features to be a multiple of the 4-bit block (64) and out_features of 32, and
    otherwise fails inside the forward (RuntimeError from a reshape), e.g. on a model 32 wide. Returns the number
    of layers switched."""
    import bitsandbytes as bnb

    switched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            state = module.weight.quant_state
            if state is None or state.shape[1] % state.blocksize or state.shape[0] % 32:
                module.support_avx512bf16_for_cpu = False
                switched += 1
    return switched


def load_model(model_dir, adapter: str | None = None, dtype: str = "auto", device=None, quant: str | None = None,
               quant_field: str = "quant"):
    """AutoModelForCausalLM from `model_dir` (+ a peft adapter), in eval mode on `device` (default: cuda if any).

    quant ("int8" | "nf4" | "fp4"): the base is loaded through bitsandbytes (tune.hf.bnb_config, 4-bit computing
    in `dtype`) and the adapter applied on top of the quantized layers, as QLoRA trains it. A checkpoint saved
    quantized (`tune quantize`) loads as saved, with or without the same quant; asking for another one is a
    ConfigError naming `quant_field` (the config key, or `--quant` on the command line). MoE expert weights
    stay unquantized (a note says so, see unquantized_experts).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    check_model_dir(model_dir)
    check_quant(quant, quant_field)
    stored = stored_quant(model_dir)
    if stored is not None and quant is not None and quant != stored:
        raise ConfigError(f"{_named(quant_field, quant)}: model={model_dir} is already quantized ({stored}, its "
                          f"config.json has quantization_config); drop {quant_field} to load it as saved, or quantize "
                          "the full-precision model")
    if adapter:
        check_adapter_dir(adapter)
        made = quantize_info(model_dir)
        if made.get("adapter") and Path(made["adapter"]).resolve() == Path(adapter).resolve():
            raise ConfigError(f"adapter={adapter} is already merged into model={model_dir} (its quantize_info.json); "
                              "drop the adapter")
        trained_on = adapter_base_mismatch(adapter, made.get("source") or model_dir)
        if trained_on:
            print(f"note: adapter={adapter} was trained on {trained_on}, not on model={model_dir}; applying it anyway "
                  "(same shapes), which is right only if the two hold the same weights", file=sys.stderr)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = {}
    if quant is not None and stored is None:
        kwargs["quantization_config"] = bnb_config(quant, resolve_dtype(dtype))
    if (quant is not None or stored is not None) and device.type == "cuda":
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes while it moves the weights to the GPU
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar between the prompt and the streamed text
    try:
        with quiet_third_party():
            # a checkpoint saved quantized keeps the dtypes it was saved with (its 4-bit compute dtype and the
            # unquantized layers' must agree): transformers' "auto" reads them from its config.json
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype="auto" if stored is not None else resolve_dtype(dtype), trust_remote_code=False,
                use_safetensors=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"model={model_dir}: AutoModelForCausalLM cannot load it ({_first_line(e)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if "int8" in (quant, stored):
        silence_int8_cast_message()
    elif (quant or stored) in ("nf4", "fp4"):
        fit_cpu_4bit_kernel(model)
    note = experts_note(model, quant or stored) if (quant or stored) else None
    if note:
        print(note, file=sys.stderr)
    if adapter:
        with quiet_third_party():
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, adapter)
            except Exception as e:  # noqa: BLE001 - e.g. an adapter trained on another base model
                raise DataError(f"adapter={adapter}: cannot apply it to model={model_dir} ({_first_line(e)}); "
                                "was it trained on this base model?") from None
    if not kwargs.get("device_map") and not getattr(model, "is_quantized", False):
        model = model.to(device)
    return model.eval()


# what a saved HF tokenizer leaves in its directory (one is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt", "merges.txt", "sentencepiece.bpe.model", "tekken.json")


def load_tokenizer(path, field: str = "tokenizer", pad_token: str | None = None, pad_with_eos: bool = True):
    """An HF tokenizer that can pad.

    `pad_token` (an existing token) is set as the pad token. Otherwise a tokenizer without one pads with
    its eos token when `pad_with_eos` (generation: padding is masked and sits left of the prompt);
    training asks for an explicit choice instead, a DataError naming the directory and the fix.
    """
    from transformers import AutoTokenizer

    name = _named(field, path)
    if not Path(path).exists():
        raise ConfigError(f"{name} does not exist (paths are relative to where you run tune)")
    if Path(path).is_dir():
        check_no_custom_code(path, field)
        if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            # transformers 5 would build an empty tokenizer here, and generation would print nothing
            raise DataError(f"{name} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); point it at "
                            "the model's own export (which saves its tokenizer beside it), save the tokenizer there "
                            "(tokenizer.save_pretrained), or name the tokenizer's directory (tune generate: --tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{name}: cannot load a tokenizer ({_first_line(e)})") from None
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise DataError(f"{name}: pad_token={pad_token!r} is not in the tokenizer's vocabulary; use an "
                            f"existing token such as the eos token {tokenizer.eos_token!r}")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"{name}: the tokenizer has neither a pad nor an eos token, so sequences cannot be "
                            "batched; set pad_token or eos_token in its tokenizer_config.json")
        if not pad_with_eos:
            raise DataError(f"{name}: the tokenizer has no pad token; set pad_token={tokenizer.eos_token!r} "
                            "in the config to pad with its eos token (padding is masked out of the loss)")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


UNKNOWN_WARN_RATE = 0.01  # above this fraction of unknown tokens, data preparation prints a warning


def unknown_token_id(tokenizer) -> int | None:
    """The id text maps to when the tokenizer cannot represent it, or None when nothing can be unknown: no unk
    token, or one that doubles as eos/bos (GPT-2's `<|endoftext|>`; its byte-level BPE encodes any text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk in (tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)):
        return None
    return unk


def unknown_token_warning(rate: float, tokenizer_name) -> str | None:
    """A `warning:` line when more than UNKNOWN_WARN_RATE of the data's tokens are unknown to the tokenizer."""
    if rate <= UNKNOWN_WARN_RATE:
        return None
    return (f"warning: {rate:.1%} of the data's tokens are unknown to the tokenizer {tokenizer_name} (its characters "
            "are read as the unk token, and the model never sees them); use a tokenizer trained on this data "
            "(pretrain with data.tokenizer=bpe) or the base model's own tokenizer")


def unknown_characters(tokenizer, text: str) -> list[str]:
    """The distinct characters of `text` the tokenizer maps to its unk token (in order of appearance)."""
    unk = unknown_token_id(tokenizer)
    if unk is None:
        return []
    return [c for c in dict.fromkeys(text) if unk in tokenizer(c, add_special_tokens=False)["input_ids"]]


def check_vocab(model, tokenizer, tokenizer_dir) -> None:
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise DataError(f"tokenizer={tokenizer_dir} has {len(tokenizer)} tokens but the model embeds only "
                        f"{n_embeddings}; use the tokenizer the model was trained with")


def context_length(model) -> int | None:
    """The model's maximum sequence length (learned position table / trained context), if it declares one."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant), under transformers' current
    name for it (`gradient_checkpointing_enable` is its deprecated alias in transformers 5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
