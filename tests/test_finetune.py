"""recipes/finetune.py: full, LoRA and QLoRA on real Natural-Instructions tasks with a tiny base from our exporter.

The base is a native tiny GPT-2 (and, for "any HF causal LM", a tiny Llama-layout `modern` model) exported as a
standard HF checkpoint with a byte-level BPE tokenizer trained on NI text (tests/conftest.py).
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import NI_TASKS, dequantized_base
from tune.cli import main
from tune.config import load_config

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")

TASKS = ["task363_sst2_polarity_classification", "task073_commonsenseqa_answer_generation",
         "task1355_sent_comp_summarization"]


def make_base(out: Path, ni_texts, preset: str) -> Path:
    from data_prep.text import train_bpe_tokenizer
    from tune.models.export import export_hf
    from tune.models.gpt import GPT, config_from_preset

    tokenizer = train_bpe_tokenizer(ni_texts, 512)
    torch.manual_seed(0)
    model = GPT(config_from_preset(preset, vocab_size=len(tokenizer), block_size=256))
    return export_hf(model, out, tokenizer)


def finetune_config(tmp_path: Path, base: Path, method: str, **overrides):
    from recipes.finetune import FinetuneConfig

    lines = ["recipe: finetune", f"method: {method}", f"base_model: {base}", f"output_dir: {tmp_path / method}",
             "data:", "  train_tasks:", *(f"    - {NI_TASKS / (t + '.json')}" for t in TASKS),
             "  max_train_instances_per_task: 24", "  heldout_instances_per_task: 4", "  max_length: 256",
             f"  cache_dir: {tmp_path / 'cache'}",
             "train:", f"  max_steps: {16 if method == 'full' else 40}", "  micro_batch_size: 4", "  grad_accum_steps: 2",
             f"  lr: {1e-2 if method != 'full' else 1e-3}", "  min_lr: 1.0e-4", "  warmup_steps: 2",
             "  weight_decay: 0.0", "  eval_every: 0", "  eval_batches: 4", "  log_every: 1", "  progress: false",
             "eval:", "  enabled: false"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_config(FinetuneConfig, str(path), [f"{k}={v}" for k, v in overrides.items()])


def val_loss_of(model, cfg) -> float:
    """The engine's validation loss, recomputed for `model` on the same held-out batches."""
    from data_prep.natural_instructions import PromptConfig, TokenizeConfig, build_dataset
    from tune.packing import NIBatches
    from recipes.finetune import load_splits
    from tune.hf import load_tokenizer
    from tune.losses import causal_lm_loss

    tokenizer = load_tokenizer(cfg.base_model)
    splits = load_splits(cfg)
    val, _ = build_dataset(splits["heldout_instances"], tokenizer, PromptConfig(),
                           TokenizeConfig(max_length=cfg.data.max_length), cfg.data.cache_dir)
    source = NIBatches(val, val, cfg.train.micro_batch_size, 1, seed=0, packing=True,
                       max_length=cfg.data.max_length, pad_id=tokenizer.pad_token_id)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for batch in source.val_batches(0, 1, cfg.train.eval_batches):
            s, n = causal_lm_loss(model, batch)
            total, count = total + float(s), count + float(n)
    return total / count


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_loss_falls(run_dir: Path, margin: float):
    """Mean of the last 3 step losses at least `margin` below the first 3 (runs are deterministic)."""
    losses = train_losses(run_dir)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - margin, losses


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def sample_ids(gpt2_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_base)
    return torch.tensor([tok("Definition: classify the sentiment. Input: a fine film. Output:")["input_ids"]])


def test_full_finetune_loss_falls_and_saves_a_loadable_model(tmp_path, gpt2_base):
    from recipes.finetune import run
    from transformers import AutoModelForCausalLM

    cfg = finetune_config(tmp_path, gpt2_base, "full")
    result = run(cfg)
    assert_loss_falls(result.run_dir, 0.3)
    model = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    assert val_loss_of(model, cfg) == pytest.approx(result.val_loss, rel=1e-5)
    for name in ("config.yaml", "report.png", "checkpoints/latest", "model/tokenizer.json"):
        assert (result.run_dir / name).exists(), name


def test_lora_trains_only_the_adapter_reloads_identically_and_merges(tmp_path, gpt2_base, sample_ids, capsys):
    from peft import PeftModel
    from recipes.finetune import run
    from transformers import AutoModelForCausalLM

    cfg = finetune_config(tmp_path, gpt2_base, "lora", merge="true", **{"lora.r": 8, "eval.enabled": "true",
                          "eval.max_instances_per_task": 2, "eval.max_new_tokens": 4})
    result = run(cfg)
    assert_loss_falls(result.run_dir, 0.2)  # a rank-8 adapter on a frozen random base learns slower
    out = capsys.readouterr().out
    assert "trainable of" in out and "(100.00%)" not in out

    base = AutoModelForCausalLM.from_pretrained(gpt2_base)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), result.run_dir / "adapter")
    assert val_loss_of(adapted, cfg) == pytest.approx(result.val_loss, rel=1e-5)  # reload == what was trained
    assert val_loss_of(base, cfg) > result.val_loss + 0.1  # held-out instances improved too

    merged = AutoModelForCausalLM.from_pretrained(result.run_dir / "merged")
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged, sample_ids), logits(adapted, sample_ids), atol=1e-4, rtol=1e-4)

    evaluation = json.loads((result.run_dir / "eval_results.json").read_text())
    assert set(evaluation["heldout_instances"]["tasks"]) == set(TASKS)


def test_lora_on_the_tied_output_head_merges_untied(tmp_path, gpt2_base, sample_ids):
    """lora.target_modules=[c_attn,lm_head] on a tied GPT-2 base: the merged checkpoint equals the adapter model,
    keeps the base's input embedding bit for bit and has its own head (tie_word_embeddings=false)."""
    from peft import PeftModel
    from recipes.finetune import run
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gpt2_base)
    assert base.lm_head.weight is base.transformer.wte.weight  # the fixture is tied
    cfg = finetune_config(tmp_path, gpt2_base, "lora", merge="true",
                          **{"lora.r": 4, "lora.target_modules": "[c_attn,lm_head]", "train.max_steps": 3})
    result = run(cfg)

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), result.run_dir / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(result.run_dir / "merged")
    torch.testing.assert_close(logits(merged, sample_ids), logits(adapted.eval(), sample_ids), atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)  # the head was trained
    assert json.loads((result.run_dir / "merged" / "config.json").read_text())["tie_word_embeddings"] is False


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius norms)."""
    return float((actual - expected).norm() / expected.norm())


def test_qlora_trains_on_a_4bit_base_and_merges_into_the_dequantized_weights(tmp_path, gpt2_base, sample_ids):
    """The merged checkpoint equals the adapter on the dequantized 4-bit base (fp32 arithmetic, 1e-5); the live
    4-bit model agrees with it within the error the 4-bit kernel makes on the base alone."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from recipes.finetune import run
    from transformers import AutoModelForCausalLM

    from tune.adapters import QuantSection, bnb_config, load_base_model

    cfg = finetune_config(tmp_path, gpt2_base, "qlora", merge="true", **{"lora.r": 8})
    result = run(cfg)
    assert_loss_falls(result.run_dir, 0.2)  # a rank-8 adapter on a frozen random base learns slower

    # the 4-bit base as the recipe trains on it: reloading the adapter reproduces the engine's val loss
    quantized = load_base_model(gpt2_base, "qlora", torch.float32, QuantSection())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    dequantized = dequantized_base(gpt2_base, quantized)
    base_val = val_loss_of(quantized, cfg)
    adapted = PeftModel.from_pretrained(quantized, result.run_dir / "adapter")  # wraps `quantized` in place
    assert val_loss_of(adapted, cfg) == pytest.approx(result.val_loss, rel=1e-5)
    assert base_val > result.val_loss + 0.1

    merged = AutoModelForCausalLM.from_pretrained(result.run_dir / "merged").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert json.loads((result.run_dir / "merged" / "merge_info.json").read_text())["dequantized_4bit_base"]
    on_dequantized = PeftModel.from_pretrained(copy.deepcopy(dequantized), result.run_dir / "adapter")
    torch.testing.assert_close(logits(merged, sample_ids), logits(on_dequantized, sample_ids), atol=1e-5, rtol=1e-5)
    # the recipe's 4-bit path dequantizes to fp32 before each matmul: the same numbers
    torch.testing.assert_close(logits(adapted, sample_ids), logits(merged, sample_ids), atol=1e-4, rtol=1e-4)

    # bitsandbytes' own inference kernel (bf16 on CPUs with AVX512-BF16; bitsandbytes >= 0.49 switches to it in
    # eval mode without gradients) is only as close as its rounding allows. Its error on the base alone sets the
    # scale; the trained adapter changes the activations it rounds, hence the factor (measured: 3.3x here).
    fast = AutoModelForCausalLM.from_pretrained(gpt2_base, quantization_config=bnb_config(QuantSection()),
                                                dtype=torch.float32).eval()
    kernel_error = relative_error(logits(fast, sample_ids), logits(dequantized, sample_ids))
    fast_adapted = PeftModel.from_pretrained(fast, result.run_dir / "adapter")
    tolerance = 8 * kernel_error + 1e-5
    assert relative_error(logits(fast_adapted, sample_ids), logits(merged, sample_ids)) <= tolerance

    # merging into the original full-precision weights instead would not reproduce the trained model, and the
    # tolerance above is tight enough to tell
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), result.run_dir / "adapter")
    print("NAIVE", relative_error(logits(naive.merge_and_unload(), sample_ids), logits(merged, sample_ids)), tolerance)
    assert relative_error(logits(naive.merge_and_unload(), sample_ids), logits(merged, sample_ids)) > 2 * tolerance


def test_qlora_evaluation_mid_run_leaves_training_unchanged(tmp_path, gpt2_base):
    """Validation passes between steps (eval mode, no gradients) must not switch the 4-bit layers to another
    kernel: bitsandbytes >= 0.49 would repack them for its bf16 CPU inference kernel, which changes the numbers
    and cannot train (the next step failed)."""
    from recipes.finetune import run

    steps = {"train.max_steps": 4, "lora.r": 4}
    plain = run(finetune_config(tmp_path / "a", gpt2_base, "qlora", **steps))
    evaluated = run(finetune_config(tmp_path / "b", gpt2_base, "qlora", **steps, **{"train.eval_every": 1}))
    assert train_losses(evaluated.run_dir) == train_losses(plain.run_dir)
    assert evaluated.val_loss == pytest.approx(plain.val_loss, rel=1e-6)


def test_lora_on_a_llama_layout_base_resumes_exactly(tmp_path, ni_texts, monkeypatch):
    from tune.packing import NIBatches
    from recipes.finetune import run

    base = make_base(tmp_path / "llama_base", ni_texts, "tiny-modern")
    assert json.loads((base / "config.json").read_text())["model_type"] == "llama"
    steps = {"train.max_steps": 8, "train.save_every": 3}
    full = run(finetune_config(tmp_path / "a", base, "lora", **steps))

    original = NIBatches.step_batches

    def dies_in_step_7(self, step, rank, world):
        if step == 7:
            raise KeyboardInterrupt  # as Ctrl-C: the engine saves a checkpoint (step 6) and re-raises
        return original(self, step, rank, world)

    monkeypatch.setattr(NIBatches, "step_batches", dies_in_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(finetune_config(tmp_path / "b", base, "lora", **steps))
    monkeypatch.setattr(NIBatches, "step_batches", original)
    resumed = run(finetune_config(tmp_path / "b", base, "lora", **steps, **{"train.resume": "true"}))
    assert train_losses(tmp_path / "b" / "lora") == train_losses(full.run_dir)
    assert resumed.val_loss == full.val_loss


def test_builtin_finetune_configs_validate(capsys):
    from recipes.finetune import FinetuneConfig

    for name in ("lora_ni", "qlora_ni", "full_ni", "lora_ni_own_model"):
        cfg = load_config(FinetuneConfig, name)
        assert cfg.recipe == "finetune" and (cfg.method in name or name == "lora_ni_own_model")


@pytest.mark.parametrize("case", ["not_causal", "no_pad", "missing", "too_long"])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, gpt2_base, case, capsys):
    import shutil

    base = gpt2_base
    overrides = {}
    if case == "not_causal":
        from transformers import BertConfig, BertModel

        base = tmp_path / "bert"
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
                  ).save_pretrained(base)
        expected = "not a causal language model"
    elif case == "no_pad":
        base = tmp_path / "nopad"
        shutil.copytree(gpt2_base, base)
        config = json.loads((base / "tokenizer_config.json").read_text())
        config.pop("pad_token", None)
        (base / "tokenizer_config.json").write_text(json.dumps(config))
        special = base / "special_tokens_map.json"
        if special.exists():
            data = json.loads(special.read_text())
            data.pop("pad_token", None)
            special.write_text(json.dumps(data))
        expected = "pad_token='<|endoftext|>'"
    elif case == "missing":
        base = tmp_path / "nowhere"
        expected = "does not exist"
    else:
        overrides = {"data.max_length": 512}
        expected = "longer than the position table"
    cfg_path = tmp_path / "cfg.yaml"
    cfg = finetune_config(tmp_path, base, "lora")
    from tune.config import save_config

    save_config(cfg, cfg_path)
    assert main(["run", "finetune", "--config", str(cfg_path), *(f"{k}={v}" for k, v in overrides.items())]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "lora").exists()


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, gpt2_base):
    from recipes.finetune import run

    plain = run(finetune_config(tmp_path / "a", gpt2_base, "lora", **{"train.max_steps": 3}))
    checkpointed = run(finetune_config(tmp_path / "b", gpt2_base, "lora", **{"train.max_steps": 3,
                                                                            "train.gradient_checkpointing": "true"}))
    assert train_losses(checkpointed.run_dir) == pytest.approx(train_losses(plain.run_dir), rel=1e-5)


def test_users_qwen2_checkpoint_whose_tokenizer_has_no_pad_token(tmp_path, gpt2_base):
    """A user's own HF directory (here a tiny Qwen2 layout) with a GPT-2-style tokenizer: pad_token=<eos>."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from recipes.finetune import run

    user = tmp_path / "my_qwen2"
    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(user)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)).save_pretrained(user)
    result = run(finetune_config(tmp_path, user, "lora", pad_token="<|endoftext|>", **{"train.max_steps": 4}))
    assert result.step == 4
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(user), result.run_dir / "adapter")
    assert adapted.base_model.model.config.model_type == "qwen2"
