"""Native GPT <-> HF export: equal logits for every preset, generate() on the export, import back."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tune.errors import ConfigError
from tune.models.export import export_hf, hf_layout, import_hf
from tune.models.gpt import GPT, PRESETS, config_from_preset

EXPECTED_CLASS = {"openai-gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_export_round_trip_logits(preset, tmp_path):
    torch.manual_seed(0)
    overrides = {} if preset.startswith("tiny") else {"vocab_size": 1000}  # full-width layers, small vocab: fast
    if preset == "moe":
        overrides["n_layer"] = 2  # 8 full-width experts per block: 2 blocks keep it to seconds
    model = GPT(config_from_preset(preset, **overrides)).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 48))
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == EXPECTED_CLASS[hf_layout(model.config)]
    with torch.no_grad():
        native_logits, hf_logits = model(x), hf(x).logits
        assert torch.allclose(native_logits, hf_logits, atol=1e-5, rtol=1e-5), (native_logits - hf_logits).abs().max()
        back = import_hf(tmp_path / "hf").eval()
        assert torch.equal(back(x), native_logits)
    out = hf.generate(x[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    # greedy continuation from HF generate equals the native argmax path
    ids = x[:1, :4]
    for _ in range(6):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out[:1], ids)


def test_preset_parameter_counts():
    gpt1 = GPT(config_from_preset("gpt1"))
    gpt2 = GPT(config_from_preset("gpt2-124m"))
    assert 116e6 < gpt1.num_parameters() < 118e6  # "117M" with the 40,478-token vocabulary
    assert 124e6 < gpt2.num_parameters() < 125e6  # 124,439,808 with vocab 50257
    assert gpt2.num_parameters() == 124_439_808


def test_architecture_switches():
    c = config_from_preset("modern")
    m = GPT(c)
    assert m.pos_emb is None and c.n_kv_head == 4 and m.blocks[0].mlp.fc.out_features == 2 * c.mlp_hidden
    assert m.lm_head.weight is m.tok_emb.weight
    gpt1 = GPT(config_from_preset("tiny-gpt1"))
    assert gpt1.norm_f is None and not gpt1.blocks[0].pre_norm


def test_import_user_gpt2_checkpoint(tmp_path):
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=300)).eval()
    hf.save_pretrained(tmp_path / "user")
    native = import_hf(tmp_path / "user").eval()
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.allclose(native(x), hf(x).logits, atol=1e-5)


def test_no_hf_layout_for_mixed_architecture():
    with pytest.raises(ConfigError, match="no standard HF layout"):
        hf_layout(config_from_preset("tiny-gpt2", position="rope"))


def test_bad_model_config():
    with pytest.raises(ConfigError, match="preset"):
        config_from_preset("gpt3")
    with pytest.raises(ConfigError, match="n_head"):
        config_from_preset("tiny-gpt2", n_head=5)
    with pytest.raises(ConfigError, match="norm"):
        config_from_preset("tiny-gpt2", norm="batchnorm")


def test_sequence_longer_than_position_table():
    m = GPT(config_from_preset("tiny-gpt2", block_size=16))
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_exact_gelu_exports_to_gpt2(tmp_path):
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny-gpt2", activation="gelu")).eval()
    export_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.activation_function == "gelu"
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-5)
    assert import_hf(tmp_path).config.activation == "gelu"
    with pytest.raises(ConfigError):
        hf_layout(config_from_preset("tiny-gpt1", activation="gelu"))
