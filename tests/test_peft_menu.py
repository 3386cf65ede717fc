"""peft options passed through `lora.*` (tune/adapters.py add_lora): each reaches adapter_config.json, trains, reloads in
plain peft to the same logits and merges (tune.adapters.merge_adapter) to the same logits, DoRA included."""

import json
import warnings

import pytest
import torch

from tune.adapters import add_lora, merge_adapter
from tune.errors import ConfigError
from tune.train_config import LoraSection

VOCAB = 64


def tiny_llama(path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("options,config_key,expected", [
    ({"use_dora": True}, "use_dora", True),
    ({"use_rslora": True}, "use_rslora", True),
    ({"layers_to_transform": [1], "target_modules": ["q_proj", "v_proj"]}, "layers_to_transform", [1]),
    ({"exclude_modules": ["o_proj", "down_proj"]}, "exclude_modules", ["down_proj", "o_proj"]),
])
def test_lora_option_reaches_peft_trains_reloads_and_merges_exactly(tmp_path, options, config_key, expected):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base")
    model = add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(r=4, alpha=8, dropout=0.0, **options))
    targeted = model.targeted_module_names
    if "layers_to_transform" in options:
        assert targeted and all(".layers.1." in name for name in targeted)
    if "exclude_modules" in options:
        assert targeted and not any(name.endswith(("o_proj", "down_proj")) for name in targeted)
    # a few steps, so B (and DoRA's magnitude) leave their initial values
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    got = sorted(saved[config_key]) if isinstance(saved[config_key], list) else saved[config_key]
    assert got == expected
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(AutoModelForCausalLM.from_pretrained(base), ids))  # it trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(plain, ids), ours, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(base, tmp_path / "adapter", tmp_path / "merged"))
    torch.testing.assert_close(logits(merged, ids), ours, atol=1e-5, rtol=1e-5)


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base")
    plain = add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(r=16, alpha=8, dropout=0.0))
    rs = add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(r=16, alpha=8, dropout=0.0, use_rslora=True))
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    assert dict(plain.named_modules())[layer].scaling["default"] == pytest.approx(8 / 16)
    assert dict(rs.named_modules())[layer].scaling["default"] == pytest.approx(8 / 16 ** 0.5)


def test_bad_layers_to_transform_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.layers_to_transform must list layer indices >= 0"):
        LoraSection(layers_to_transform=[-1], target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="lora.layers_to_transform"):
        LoraSection(layers_to_transform=[], target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="lora.layers_to_transform needs lora.target_modules as a list"):
        LoraSection(layers_to_transform=[1])  # all-linear


def test_loraplus_trains_the_b_matrices_at_ratio_times_the_lr_through_the_schedule():
    """train.loraplus_lr_ratio: peft's lora_B matrices form their own optimizer group at lr x ratio, kept at that
    ratio by the warmup / cosine schedule; everything else at lr. Without LoRA weights it is a one-line error."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tune.engine import lr_lambda, make_optimizer
    from tune.train_config import TrainConfig

    torch.manual_seed(0)
    model = add_lora(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2)),
                     LoraSection(r=4, dropout=0.0))
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=10, loraplus_lr_ratio=16)
    optimizer = make_optimizer(cfg, model)
    b_ids = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    b_groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & b_ids]
    assert len(b_groups) == 1 and {id(p) for p in b_groups[0]["params"]} == b_ids
    assert b_groups[0]["lr"] == pytest.approx(16e-3) and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        assert b_groups[0]["lr"] == pytest.approx(16 * optimizer.param_groups[0]["lr"])
    assert len(optimizer.param_groups) == 2 + 1
    plain = TrainConfig(lr=1e-3, min_lr=1e-4)
    assert len(make_optimizer(plain, model).param_groups) == 2
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio is set but the model has no trainable LoRA B"):
        make_optimizer(cfg, GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1,
                                                       n_head=2)))
