"""tune/adapters.py:merge_adapter on tied and untied bases: the merged checkpoint computes what the adapter model
computes, and a tied module that was not adapted keeps the base's weights exactly.

Tiny GPT-2 and Llama layouts built here, with random non-zero LoRA weights (init_lora_weights=False), so every
adapted module changes the logits.
"""

import copy
import json
import warnings

import pytest
import torch

from conftest import dequantized_base

VOCAB = 64


def make_base(path, layout: str, tied: bool):
    """A random tiny causal LM saved at `path` (GPT-2: Conv1D attention, Linear head; Llama: Linear everywhere)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if layout == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=1, n_head=2, bos_token_id=0,
                            eos_token_id=0, tie_word_embeddings=tied)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
                             eos_token_id=0, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    model.save_pretrained(path)
    return path


def make_adapter(path, model, target_modules):
    """A LoRA adapter with random A and B (r=4) on `model`, saved at `path`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                                      init_lora_weights=False))
        peft_model.save_pretrained(path)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def adapter_reference(base_path, adapter, method):
    """(the base the adapter was trained on, the adapter model on it): the fp32 base for LoRA, the dequantized
    4-bit base for QLoRA, which the merge must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tune.adapters import QuantSection, load_base_model

    if method == "lora":
        base = AutoModelForCausalLM.from_pretrained(base_path)
    else:
        base = dequantized_base(base_path, load_base_model(base_path, "qlora", torch.float32, QuantSection()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return base, PeftModel.from_pretrained(copy.deepcopy(base), adapter)


def train_model(base_path, method):
    from transformers import AutoModelForCausalLM

    from tune.adapters import QuantSection, load_base_model

    if method == "lora":
        return AutoModelForCausalLM.from_pretrained(base_path)
    return load_base_model(base_path, "qlora", torch.float32, QuantSection())


ATTENTION = {"gpt2": "c_attn", "llama": "q_proj"}
EMBEDDING = {"gpt2": "wte", "llama": "embed_tokens"}


def merge_and_compare(tmp_path, layout: str, method: str, tied: bool, targets: list[str]):
    """Train an adapter on `targets` of a fresh base, merge it, and check the merged logits equal the adapter
    model's (on the dequantized base for QLoRA). Returns (merged output dir, merged model, base model)."""
    from transformers import AutoModelForCausalLM

    from tune.adapters import QuantSection, merge_adapter

    base_path = make_base(tmp_path / "base", layout, tied=tied)
    adapter = make_adapter(tmp_path / "adapter", train_model(base_path, method), targets)
    out = merge_adapter(base_path, adapter, tmp_path / "merged", quant=QuantSection() if method == "qlora" else None)
    merged = AutoModelForCausalLM.from_pretrained(out)
    base, reference = adapter_reference(base_path, adapter, method)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    return out, merged, base


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_adapted_tied_head_is_merged_untied(tmp_path, layout, method):
    """LoRA on the head of a tied base: the merged model equals the adapter model, its input embedding is the
    base's, bit for bit, and it is saved untied."""
    out, merged, base = merge_and_compare(tmp_path, layout, method, True, [ATTENTION[layout], "lm_head"])
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(merged.get_output_embeddings().weight, base.get_output_embeddings().weight)
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((out / "merge_info.json").read_text())["untied"] == ["lm_head"]


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_adapted_tied_input_embedding_is_merged_untied(tmp_path, layout):
    """The other side of the tie: LoRA on the input embedding leaves the output head exactly the base's."""
    out, merged, base = merge_and_compare(tmp_path, layout, "lora", True, [EMBEDDING[layout]])
    assert torch.equal(merged.get_output_embeddings().weight, base.get_output_embeddings().weight)
    assert not torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("tied,layout,targets", [
    (True, "gpt2", ["c_attn"]), (True, "llama", ["q_proj", "v_proj"]),  # tied base, no tied module adapted
    (False, "gpt2", ["c_attn", "lm_head"]), (False, "llama", ["q_proj", "lm_head"])])  # untied base
def test_merge_keeps_the_base_tying_when_no_tied_module_is_adapted(tmp_path, method, tied, layout, targets):
    out, merged, base = merge_and_compare(tmp_path, layout, method, tied, targets)
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    assert json.loads((out / "merge_info.json").read_text())["untied"] == []
