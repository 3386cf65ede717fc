"""Quantized inference: tune.hf.bnb_config / load_model(quant=...), `tune generate --quant`, the evaluate recipe's
`quant` key and `tune quantize`, on the tiny random GPT-2 of conftest (bitsandbytes 0.50 runs int8 and 4-bit on CPU).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune.cli import main

from conftest import NI_TASKS, REPO

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")

TASK = NI_TASKS / "task363_sst2_polarity_classification.json"


@pytest.fixture(scope="module")
def lm64(tmp_path_factory, tiny_lm) -> Path:
    """lm64's tokenizer with a random 2-layer GPT-2 64 wide: bitsandbytes' 4-bit CPU kernel needs in_features
    a multiple of its 64-weight blocks (a narrower model runs, see test_narrow_4bit_layers_run)."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("lm64")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_lm / name, out / name)
    source = json.loads((tiny_lm / "config.json").read_text())
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=source["vocab_size"], n_positions=256, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=source["eos_token_id"], eos_token_id=source["eos_token_id"],
                        pad_token_id=source.get("pad_token_id"))
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fp32_model(lm64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lm64, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, lm64) -> Path:
    """A LoRA on c_attn and c_fc with non-zero B (init_lora_weights=False, scale alpha/r = 1), so it changes the
    logits (by ~100% of their scale here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("quant_adapter")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(lm64)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                        task_type="CAUSAL_LM", fan_in_fan_out=True)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, lm64) -> dict[str, Path]:
    """`tune quantize` outputs of lm64: {"int8": DIR, "nf4": DIR}."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for kind in ("int8", "nf4"):
        out[kind] = root / kind
        assert main(["quantize", str(lm64), str(out[kind]), "--quant", kind, "--dtype", "fp32"]) == 0
    return out


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def int8_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Per-element bound on |LLM.int8(x) W^T - x W^T| for x (N, K), w (M, K).

    LLM.int8 (bitsandbytes' MatMul8bitLt, also on CPU) casts x and W to fp16 and quantizes each row with its own
    absmax scale: x_ik ~ s_i q_ik, s_i = max_k |x_ik| / 127, and w_jk ~ t_j p_jk, t_j = max_k |w_jk| / 127, rounding
    to the nearest integer, so |x^ - x| <= s_i / 2 and |w^ - w| <= t_j / 2. Input columns with an outlier (|x| > 6)
    are multiplied in fp16 instead, which only lowers their error. Hence, for y_ij = sum_k x_ik w_jk:

        |y^_ij - y_ij| <= sum_k (|x_ik| t_j / 2 + |w_jk| s_i / 2 + s_i t_j / 4)   (int8 rounding of both sides)
                        + 2^-9 (sum_k |x_ik| |w_jk| + |b_j|)                      (fp16 casts of x, W and y: 2^-11 each,
                                                                                   doubled for slack)
    """
    s = x.abs().amax(dim=1, keepdim=True) / 127  # (N, 1)
    t = w.abs().amax(dim=1, keepdim=True).T / 127  # (1, M)
    k = x.shape[1]
    rounding = x.abs().sum(1, keepdim=True) * t / 2 + s * w.abs().sum(1, keepdim=True).T / 2 + k * s * t / 4
    fp16 = (x.abs() @ w.abs().T + (b.abs() if b is not None else 0)) * 2.0**-9
    return rounding + fp16


def test_int8_matmuls_within_the_llm_int8_bound_and_logits_close_to_fp32(lm64, fp32_model, ids):
    """Every int8 layer of the model, on the activations it actually sees, stays within int8_bound of the fp32 matmul
    with the original weights (the bound is exact arithmetic, not a fitted number).

    End to end the logits stay within 3% of their scale (max |logit|) of fp32, and correlate > 0.999 with them: an
    int8 step is 1/127 of a row's absmax, about 3 x rms for Gaussian-like rows, so each product's rounding error has a
    spread of ~(3/127)/sqrt(12) ~ 0.7% of the operands' rms; a sum of K terms grows as sqrt(K) like the output itself,
    so each layer errs by ~1% (0.7% x sqrt(2): both operands) of its output rms; the 8 quantized matmuls (2 blocks x
    c_attn, attn c_proj, c_fc, mlp c_proj; embeddings and the tied head stay fp32) add theirs into a residual stream
    carried mostly by the unquantized embeddings: a few % at most. Measured 0.7%."""
    import bitsandbytes as bnb

    from tune.hf import load_model

    model = load_model(lm64, quant="int8", dtype="fp32")
    reference = dict(fp32_model.named_modules())
    seen = []

    def check(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            ref = reference[name]
            w = ref.weight if isinstance(ref, torch.nn.Linear) else ref.weight.T  # GPT-2's Conv1D holds (in, out)
            exact = x @ w.T + (ref.bias if ref.bias is not None else 0)
            error = (output.reshape(exact.shape).float() - exact).abs()
            bound = int8_bound(x, w, ref.bias)
            seen.append((name, float((error / bound).max())))
        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 8
    handles = [m.register_forward_hook(check(n)) for n, m in layers]
    quant = logits(model, ids)
    for h in handles:
        h.remove()
    assert len(seen) == 8 and all(ratio <= 1 for _, ratio in seen), seen
    exact = logits(fp32_model, ids)
    assert 0 < (quant - exact).abs().max() <= 0.03 * exact.abs().max()  # > 0: really quantized
    assert torch.corrcoef(torch.stack([quant.flatten(), exact.flatten()]))[0, 1] > 0.999


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_logits_close_to_fp32_looser(lm64, fp32_model, ids, kind):
    """4-bit stores each block of 64 weights as one of 16 levels times the block's absmax, against 255 levels per row
    for int8: steps ~16x coarser (nf4's levels sit at normal quantiles, so Gaussian weights lose less than with fp4;
    its widest gap, 0.72 .. 1.0 of the absmax, rounds a weight by up to 14% of its block's largest). With the int8
    test's reasoning scaled by ~16x on the quantized layers' share: tolerance 15% of the logit scale (measured 6%
    nf4, 7.6% fp4), correlation with fp32 > 0.99, and not equal to fp32 (really quantized)."""
    from tune.hf import load_model

    quant = logits(load_model(lm64, quant=kind, dtype="fp32"), ids)
    exact = logits(fp32_model, ids)
    gap = (quant - exact).abs().max()
    assert 0 < gap <= 0.15 * exact.abs().max()
    assert torch.corrcoef(torch.stack([quant.flatten(), exact.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_checkpoint_reloads_with_plain_transformers_and_generates(quantized, lm64, ids, kind, capsys):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from tune.hf import load_model

    out = quantized[kind]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    info = json.loads((out / "quantize_info.json").read_text())
    source_bytes = (lm64 / "model.safetensors").stat().st_size
    assert info["weight_bytes_before"] == source_bytes
    assert info["weight_bytes_after"] == (out / "model.safetensors").stat().st_size < source_bytes
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    layer = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, layer) for m in reloaded.modules()) == 8
    # the saved codes are those a quantized load of the original computes with (4-bit: CPU kernels may differ by
    # bf16 rounding between a fresh and a repacked layer, hence 1e-2 of the scale)
    direct = logits(load_model(lm64, quant=kind, dtype="fp32"), ids)
    assert (logits(reloaded, ids) - direct).abs().max() <= 1e-2 * direct.abs().max()
    generated = reloaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "Definition:", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Definition:") and len(captured.out) > len("Definition:\n")
    assert "error" not in captured.err and "cast from" not in captured.err
    # asking again for what it is loads it as saved
    assert main(["generate", "--model", str(out), "--prompt", "Definition:", "--max-new-tokens", "4",
                 "--temperature", "0", "--quant", kind]) == 0
    assert capsys.readouterr().out == captured.out


def test_adapter_on_a_quantized_base_is_peft_on_the_4bit_base(lm64, lora_adapter, ids):
    """load_model(quant=nf4) + adapter computes exactly what peft computes on the base loaded 4-bit by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tune.hf import load_model

    ours = logits(load_model(lm64, str(lora_adapter), dtype="fp32", quant="nf4"), ids)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(lm64, quantization_config=config, dtype=torch.float32)
    by_hand = logits(PeftModel.from_pretrained(base, lora_adapter).eval(), ids)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
    no_adapter = logits(load_model(lm64, dtype="fp32", quant="nf4"), ids)
    assert (ours - no_adapter).abs().max() > 1e-2  # the adapter is applied


def test_cli_generate_quant_with_an_adapter_is_the_quantized_model(lm64, lora_adapter, capsys):
    """`tune generate --quant nf4 --adapter A --temperature 0` streams the greedy continuation of that very model."""
    from tune.evaluation import generate_predictions, load_tokenizer
    from tune.hf import load_model

    prompt = "Definition: answer yes or no."
    assert main(["generate", "--model", str(lm64), "--adapter", str(lora_adapter), "--quant", "nf4", "--dtype", "fp32",
                 "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    model = load_model(lm64, str(lora_adapter), dtype="fp32", quant="nf4")
    expected = generate_predictions(model, load_tokenizer(lm64), [prompt], batch_size=1, max_new_tokens=6)[0]
    assert expected.strip() and out.startswith(prompt) and out[len(prompt):].strip() == expected.strip()


def test_quantize_merges_an_adapter_first(lm64, lora_adapter, tmp_path, ids, capsys):
    """`tune quantize BASE OUT --adapter A --quant int8` = the adapter model, within the int8 tolerance above."""
    from transformers import AutoModelForCausalLM

    from tune.hf import load_model

    out = tmp_path / "merged_int8"
    assert main(["quantize", str(lm64), str(out), "--adapter", str(lora_adapter), "--quant", "int8",
                 "--dtype", "fp32"]) == 0
    assert f"merged {lora_adapter}" in capsys.readouterr().out
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the merge scratch directory is gone
    adapted = logits(load_model(lm64, str(lora_adapter), dtype="fp32"), ids)
    quant = logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    base = logits(load_model(lm64, dtype="fp32"), ids)
    assert (quant - adapted).abs().max() <= 0.03 * adapted.abs().max()
    assert (quant - adapted).abs().max() < (base - adapted).abs().max()  # the adapter is in the weights


def test_quantize_merges_a_qlora_adapter_into_the_dequantized_base(lm64, lora_adapter, tmp_path, ids, capsys):
    """An adapter whose run trained it as QLoRA (its config.yaml: method qlora) is merged into the dequantized nf4
    weights it learned against: the int8 checkpoint then computes what the adapter on the nf4 base computes, within
    the int8 tolerance (3% of the logit scale)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from tune.hf import load_model

    run = tmp_path / "qlora_run"
    shutil.copytree(lora_adapter, run / "adapter")
    (run / "config.yaml").write_text("recipe: finetune\nmethod: qlora\nqlora:\n  quant_type: nf4\n  double_quant: true\n"
                                     "  compute_dtype: fp32\n  quant_storage: auto\n")
    out = tmp_path / "merged"
    assert main(["quantize", str(lm64), str(out), "--adapter", str(run / "adapter"), "--quant", "int8"]) == 0
    assert "(the dequantized 4-bit base, as QLoRA trained it)" in capsys.readouterr().out
    qlora = logits(load_model(lm64, str(run / "adapter"), dtype="fp32", quant="nf4"), ids)
    quant = logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    lora = logits(load_model(lm64, str(lora_adapter), dtype="fp32"), ids)
    assert (quant - qlora).abs().max() <= 0.03 * qlora.abs().max()
    assert (quant - qlora).abs().max() < (lora - qlora).abs().max()  # closer to the 4-bit base than the fp32 one


def test_quantize_options_reach_the_checkpoint(lm64, tmp_path, capsys):
    out = tmp_path / "fp4"
    assert main(["quantize", str(lm64), str(out), "--quant", "fp4", "--no-double-quant", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["load_in_4bit"], config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"],
            config["bnb_4bit_compute_dtype"]) == (True, "fp4", False, "float32")
    info = json.loads((out / "quantize_info.json").read_text())
    assert (info["quant"], info["double_quant"], info["adapter"]) == ("fp4", False, None)
    before, after = info["weight_bytes_before"] / 2**20, info["weight_bytes_after"] / 2**20
    assert f"wrote {out}: fp4 weights {before:.1f} MiB -> {after:.1f} MiB on disk" in printed
    assert main(["quantize", str(lm64), str(out), "--quant", "int8", "--force"]) == 0  # --force replaces it
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def write_eval_config(path: Path, model: Path, output_dir: Path, **extra) -> Path:
    lines = ["recipe: evaluate", f"model: {model}", f"output_dir: {output_dir}", "dtype: fp32",
             *(f"{k}: {v}" for k, v in extra.items()),
             "data:", "  tasks:", f"    - {TASK}", "  max_instances_per_task: 4",
             "generation:", "  batch_size: 4", "  max_new_tokens: 6"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_evaluate_recipe_with_quant_int8_end_to_end(lm64, lora_adapter, tmp_path, capsys):
    """The recipe loads the base int8 with the adapter on top, scores every instance and records the quant."""
    from tune.evaluation import load_tokenizer
    from tune.hf import load_model

    config = write_eval_config(tmp_path / "eval.yaml", lm64, tmp_path / "out", quant="int8",
                               adapter=str(lora_adapter))
    assert main(["validate", str(config)]) == 0
    assert main(["run", "evaluate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "quantized int8" in out
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["quant"] == "int8" and results["adapter"] == str(lora_adapter)
    assert results["n_instances"] == 4 and 0 <= results["overall"]["mean_over_instances"]["rougeL"] <= 100
    # the predictions are the int8 model's (+ adapter): the same evaluation done by hand
    from data_prep.natural_instructions import load_task
    from recipes.evaluate import select_pairs
    from tune.evaluation import evaluate_tasks

    model = load_model(lm64, str(lora_adapter), dtype="fp32", quant="int8")
    expected = evaluate_tasks(model, load_tokenizer(lm64), select_pairs([load_task(TASK)], 4), batch_size=4,
                              max_new_tokens=6)
    assert [p["prediction"] for p in results["predictions"]] == [p["prediction"] for p in expected["predictions"]]


def test_narrow_4bit_layers_run(tiny_lm, ids):
    """tiny_lm is 32 wide, less than one 4-bit block: load_model keeps its layers off the CPU packed kernel (which
    would fail), and generation runs."""
    from tune.hf import load_model

    import bitsandbytes as bnb

    model = load_model(tiny_lm, quant="nf4", dtype="fp32")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 8
    # in_features 32 (c_attn, attn c_proj, c_fc of both blocks) is less than a block; mlp c_proj (128 -> 32) fits
    assert [m.in_features % 64 != 0 for m in layers] == [not m.support_avx512bf16_for_cpu for m in layers]
    assert sum(not m.support_avx512bf16_for_cpu for m in layers) == 6
    assert logits(model, ids).isfinite().all()


def test_moe_experts_left_unquantized_are_named(tmp_path, capsys):
    """bitsandbytes replaces nn.Linear only: Mixtral's fused expert weights stay fp32, and a note says so."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tune.hf import load_model, unquantized_experts

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=32)
    full = MixtralForCausalLM(config)
    full.save_pretrained(tmp_path / "moe")
    total = sum(p.numel() for p in full.parameters())
    model = load_model(tmp_path / "moe", quant="nf4", dtype="fp32")
    count, elements = unquantized_experts(model)
    assert count == 2 and elements == 4 * (2 * 64 * 64) + 4 * (64 * 64)  # gate_up (4, 128, 64), down (4, 64, 64)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".experts." in n)
    err = capsys.readouterr().err
    assert "note: quant=nf4 leaves this MoE's 2 fused expert weights" in err and "nn.Linear layers only" in err
    share = f"({elements / total:.0%} of the parameters)"  # of the model's parameters, not of packed 4-bit bytes
    assert share in err
    load_model(tmp_path / "moe", quant="int8", dtype="fp32")
    assert share in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_quantize_inputs_are_one_line_errors(tmp_path, lm64, lora_adapter, quantized, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    (bert / "model.safetensors").write_bytes(b"")
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: pretrain\n")
    (run / "hf" / "config.json").write_text("{}")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    cases = [
        ([str(lora_adapter), str(tmp_path / "o1")], "is a peft adapter, not a model; give the base model"),
        ([str(bert), str(tmp_path / "o2")], "is not a causal language model"),
        ([str(lm64), str(existing)], "already exists; pass --force to replace it"),
        ([str(quantized["nf4"]), str(tmp_path / "o3")], "is already quantized (nf4"),
        ([str(lm64), str(lm64)], "would replace MODEL_DIR"),
        ([str(tmp_path / "nothing"), str(tmp_path / "o4")], "does not exist"),
        ([str(run), str(tmp_path / "o4")], f"is a run directory, not a model; use {run / 'hf'}"),
        ([str(lm64), str(tmp_path / "o5"), "--adapter", str(tmp_path)], "is not a peft adapter directory"),
    ]
    for args, message in cases:
        assert main(["quantize", *args]) == 2
        assert message in one_line_error(capsys), args
    assert (existing / "keep.txt").is_file()
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_bad_quant_values_are_one_line_errors(tmp_path, lm64, quantized, capsys):
    assert main(["generate", "--model", str(quantized["int8"]), "--prompt", "x", "--quant", "nf4"]) == 2
    line = one_line_error(capsys)
    assert "--quant nf4: model=" in line and "already quantized (int8" in line and "drop --quant" in line
    config = write_eval_config(tmp_path / "eval.yaml", lm64, tmp_path / "out")
    assert main(["validate", str(config), "quant=int4"]) == 2
    assert "quant: 'int4' is not one of ['int8', 'nf4', 'fp4']" in one_line_error(capsys)
    config = write_eval_config(tmp_path / "eval2.yaml", quantized["nf4"], tmp_path / "out", quant="int8")
    assert main(["validate", str(config)]) == 2
    assert "quant=int8: model=" in one_line_error(capsys)
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["generate", "--model", str(lm64), "--prompt", "x", "--quant", "int4"])


def test_validate_with_quant_stays_torch_free(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], '
                                       '"n_positions": 64}')
    (model / "model.safetensors").write_bytes(b"")
    code = ("import sys; from tune.cli import main; "
            f"assert main(['validate', 'eval_ni', 'model={model}', 'adapter=null', 'data.exclude_train_of=null', "
            f"'data.tasks={model}', 'quant=nf4']) == 0; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_one_bnb_config_builder_serves_qlora_and_the_teacher(lm64, monkeypatch):
    """QLoRA's section and the distillation teacher both build their BitsAndBytesConfig through tune.hf.bnb_config,
    with the settings they had (QLoRA: its section; teacher 8bit: LLM.int8, 4bit: nf4 + double quant in its dtype)."""
    import bitsandbytes as bnb

    import tune.adapters
    import tune.hf
    from tune.distill import load_teacher

    calls = []
    real = tune.hf.bnb_config

    def spy(*args, **kwargs):
        config = real(*args, **kwargs)
        calls.append(config)
        return config

    monkeypatch.setattr(tune.hf, "bnb_config", spy)
    monkeypatch.setattr(tune.adapters, "hf_bnb_config", spy)
    tune.adapters.bnb_config(tune.adapters.QuantSection(quant_type="fp4", double_quant=False, compute_dtype="fp32"))
    teacher8 = load_teacher(lm64, torch.float32, "8bit")
    teacher4 = load_teacher(lm64, torch.float32, "4bit")
    qlora, int8, nf4 = calls
    assert (qlora.load_in_4bit, qlora.bnb_4bit_quant_type, qlora.bnb_4bit_use_double_quant,
            qlora.bnb_4bit_compute_dtype, qlora.bnb_4bit_quant_storage) == (True, "fp4", False, torch.float32,
                                                                           torch.uint8)
    assert int8.load_in_8bit and not int8.load_in_4bit
    assert (nf4.bnb_4bit_quant_type, nf4.bnb_4bit_use_double_quant, nf4.bnb_4bit_compute_dtype) == (
        "nf4", True, torch.float32)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in teacher8.modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in teacher4.modules())


def test_quantize_never_replaces_the_working_directory_or_a_foreign_directory(tmp_path, lm64, monkeypatch, capsys):
    """OUT=".." (or ".") with --force would have emptied the directory tune runs in and everything beside it; a
    non-empty directory that is not an earlier `tune quantize` output is not replaced either."""
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (tmp_path / "work" / "canary.txt").write_text("keep")
    monkeypatch.chdir(work)
    for out in ("..", "."):
        assert main(["quantize", str(lm64), out, "--force"]) == 2
        assert "holds the directory you run tune in" in one_line_error(capsys)
    assert (tmp_path / "work" / "canary.txt").read_text() == "keep" and work.is_dir()
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text("{}\n")
    assert main(["quantize", str(lm64), str(foreign), "--force"]) == 2
    assert "is not an earlier `tune quantize` output (no quantize_info.json)" in one_line_error(capsys)
    assert (foreign / "metrics.jsonl").is_file()


def test_quantize_with_an_adapter_of_another_base_is_a_one_line_error(tmp_path, tiny_lm, lora_adapter, capsys):
    assert main(["quantize", str(tiny_lm), str(tmp_path / "out"), "--adapter", str(lora_adapter)]) == 2
    line = one_line_error(capsys)
    assert f"--adapter {lora_adapter} does not fit MODEL_DIR {tiny_lm}" in line and "it was trained on" in line
    assert not (tmp_path / "out").exists()


def test_a_quantized_checkpoint_loads_in_its_saved_dtypes_and_refuses_its_merged_adapter(tmp_path, lm64, ids,
                                                                                         lora_adapter):
    """Saved with --dtype bf16, loaded where `auto` means fp32 (CPU): it computes in its saved bf16 (before, a
    dtype clash crashed generate); an adapter already merged into it is refused instead of applied twice."""
    from tune.errors import ConfigError
    from tune.hf import load_model

    out = tmp_path / "nf4_bf16"
    assert main(["quantize", str(lm64), str(out), "--dtype", "bf16", "--adapter", str(lora_adapter)]) == 0
    model = load_model(out, device="cpu")
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    with pytest.raises(ConfigError, match="is already merged into model="):
        load_model(out, adapter=str(lora_adapter), device="cpu")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_refuses_a_quantized_base_model(tmp_path, quantized, method):
    """A `tune quantize` output as base_model: a full fine-tune would silently freeze its int8 linears and then fail
    to save; validate refuses it (any method) and names the fix."""
    from recipes.finetune import validate
    from test_finetune import finetune_config
    from tune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"is a quantized checkpoint \(int8, .*fine-tune the full-precision model"):
        validate(finetune_config(tmp_path, quantized["int8"], method))
