"""`tune merge-adapters` (tune.adapters.combine_adapters): LoRA adapters of one base combined with peft's
add_weighted_adapter into one plain PEFT adapter (and optionally a merged checkpoint), checked against the formulas
and by reloading in plain peft."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from test_peft_menu import VOCAB, logits, tiny_llama
from tune.adapters import combine_adapters
from tune.cli import main

IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
LAYERS = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def make_adapter(base, out, seed, r=4, alpha=8, **options):
    """A LoRA on q_proj / v_proj with random non-zero A and B (as if trained), saved for `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM", **options)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


@pytest.fixture
def two_adapters(tmp_path):
    base = tiny_llama(tmp_path / "base")
    return base, make_adapter(base, tmp_path / "a", 1), make_adapter(base, tmp_path / "b", 2, alpha=4)


def reloaded(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)


def delta(tensors, layer, scaling):
    """scaling · B @ A of one layer, from an adapter's saved tensors."""
    key = f"base_model.model.{layer}"
    return scaling * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]


def test_linear_merge_is_peft_formula_reloads_and_merges_to_the_same_logits(tmp_path, two_adapters):
    """linear: A = Σ sqrt(wᵢ·sᵢ)·Aᵢ, B = Σ sqrt(wᵢ·sᵢ)·Bᵢ (sᵢ = alpha / r: 2 and 1 here), alpha = r: B·A, hand-computed
    from the two saved adapters, is the combined adapter's delta in every layer; the written adapter reloads in plain
    peft to the in-memory model's logits, and the --merge checkpoint computes them too."""
    from transformers import AutoModelForCausalLM

    base, a, b = two_adapters
    weights, scalings = [0.7, 0.3], [8 / 4, 4 / 4]
    model = combine_adapters([a, b], tmp_path / "out", weights, "linear", merged=tmp_path / "merged")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 4)
    ta, tb, out = (load_file(d / "adapter_model.safetensors") for d in (a, b, tmp_path / "out"))
    for layer in LAYERS:
        key = f"base_model.model.{layer}"
        c = [(w * s) ** 0.5 for w, s in zip(weights, scalings)]
        want_a = c[0] * ta[f"{key}.lora_A.weight"] + c[1] * tb[f"{key}.lora_A.weight"]
        want_b = c[0] * ta[f"{key}.lora_B.weight"] + c[1] * tb[f"{key}.lora_B.weight"]
        torch.testing.assert_close(delta(out, layer, 1.0), want_b @ want_a, atol=1e-6, rtol=1e-5)
    ours = logits(model, IDS)
    assert not torch.allclose(ours, logits(AutoModelForCausalLM.from_pretrained(base), IDS))
    torch.testing.assert_close(logits(reloaded(base, tmp_path / "out"), IDS), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), IDS), ours,
                               atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "out" / "combine_info.json").read_text())["weights"] == weights


def test_cat_is_the_exact_weighted_sum_of_the_deltas(tmp_path, two_adapters):
    base, a, b = two_adapters
    combine_adapters([a, b], tmp_path / "out", [0.5, -1.0], "cat")
    ta, tb, out = (load_file(d / "adapter_model.safetensors") for d in (a, b, tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8
    for layer in LAYERS:
        want = 0.5 * delta(ta, layer, 2.0) - 1.0 * delta(tb, layer, 1.0)
        torch.testing.assert_close(delta(out, layer, 1.0), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", [({"layers_to_transform": [0]}, {"layers_to_transform": [1]}),
                                     ({"exclude_modules": ["v_proj"]}, {})])
def test_adapters_restricted_to_other_layers_or_modules_combine_all_their_layers(tmp_path, options):
    """add_weighted_adapter gives the combined adapter the first adapter's layers_to_transform / exclude_modules, so the
    second's layers outside them were silently dropped: a's layer-0 and b's layer-1 adapters gave a layer-0 one. Every
    adapted layer is in the combination now (cat: w·ΔW of the adapter that has it, hand-computed), and it reloads in
    plain peft to the --merge checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base")
    a = make_adapter(base, tmp_path / "a", 1, **options[0])
    b = make_adapter(base, tmp_path / "b", 2, alpha=4, **options[1])
    model = combine_adapters([a, b], tmp_path / "out", [0.5, 2.0], "cat", merged=tmp_path / "merged")
    ta, tb, out = (load_file(d / "adapter_model.safetensors") for d in (a, b, tmp_path / "out"))
    assert {k for k in out if k.endswith("lora_A.weight")} == {k for k in {**ta, **tb} if k.endswith("lora_A.weight")}
    for layer in LAYERS:
        want = sum(w * delta(t, layer, s) for t, w, s in ((ta, 0.5, 2.0), (tb, 2.0, 1.0))
                   if f"base_model.model.{layer}.lora_A.weight" in t)
        torch.testing.assert_close(delta(out, layer, 1.0), want, atol=1e-6, rtol=1e-5)
    ours = logits(model, IDS)
    torch.testing.assert_close(logits(reloaded(base, tmp_path / "out"), IDS), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), IDS), ours,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination", ["ties", "dare_ties", "dare_linear", "magnitude_prune", "svd"])
def test_pruning_and_svd_combinations_through_the_cli_reload_and_merge_exactly(tmp_path, two_adapters,
                                                                               combination, capsys):
    """TIES / DARE / magnitude pruning keep --density of each adapter's values (DARE at random), svd truncates the
    exact sum: the written adapter differs from the linear combination, and it reloads in plain peft to the
    --merge checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    base, a, b = two_adapters
    density = [] if combination == "svd" else ["--density", "0.5"]
    assert main(["merge-adapters", str(a), str(b), "--out", str(tmp_path / "out"), "--weights", "1", "1",
                 "--combination", combination, *density, "--merge", str(tmp_path / "merged")]) == 0
    assert f"combined 2 adapters ({combination})" in capsys.readouterr().out
    combined = reloaded(base, tmp_path / "out")
    ours = logits(combined, IDS)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), IDS), ours,
                               atol=1e-5, rtol=1e-5)
    linear = combine_adapters([a, b], tmp_path / "linear", [1.0, 1.0], "linear")
    assert not torch.allclose(ours, logits(linear, IDS), atol=1e-4)
    kept = load_file(tmp_path / "out" / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.q_proj"
                                                                     ".lora_A.weight"]
    if density:
        assert 0 < (kept == 0).float().mean() < 1  # values were pruned, not all


def test_bad_combinations_are_one_line_errors(tmp_path, two_adapters, capsys):
    base, a, b = two_adapters
    other = tiny_llama(tmp_path / "other_base")
    c = make_adapter(other, tmp_path / "c", 3)
    d = make_adapter(base, tmp_path / "d", 4, r=2)
    e = make_adapter(base, tmp_path / "e", 5, use_dora=True)
    out = str(tmp_path / "out")
    cases = [
        ([str(a), str(c)], "adapters of different bases: .*a was trained on .*base, .*c on .*other_base"),
        ([str(a), str(d)], r"--combination linear needs adapters of one rank, got .*a r=4, .*d r=2; use cat or svd"),
        ([str(a), str(tmp_path / "missing")], r"adapter .*missing does not exist"),
        ([str(a), str(b), "--weights", "1"], "--weights gives 1 weights for 2 adapters; give one per adapter"),
        ([str(a), str(b), "--weights", "1", "nan"], r"--weights must be finite numbers, got \[1.0, nan\]"),
        ([str(a), str(b), "--combination", "ties"], "--combination ties needs --density D"),
        ([str(a), str(b), "--combination", "mean"], "--combination 'mean' is not one of linear, cat, svd"),
        ([str(a), str(e)], "adapter .*e has DoRA magnitudes, which peft's add_weighted_adapter cannot combine"),
        ([str(a), str(b), "--base", str(other)], "adapter .*a was trained on .*base, not --base"),
        ([str(a), str(b), "--merge", out], "--out and --merge are both .*out: the merged checkpoint would replace"),
        ([str(a), str(b), "--merge", str(base), "--force"], r"--merge .*base would replace --base .*base, which"),
        ([str(a), str(b), "--merge", str(tmp_path), "--force"], r"--merge .* would replace --base .*base, which"),
        ([str(a), str(b), "--combination", "svd", "--svd-rank", "17"],
         r"--svd-rank 17 is more than the 16 dimensions of the adapted layer model.layers.0.self_attn.v_proj; give "
         r"--svd-rank 16 or less"),
    ]
    import re

    capsys.readouterr()  # the setup's progress bars
    for args, message in cases:
        assert main(["merge-adapters", *args, "--out", out]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), (args, err)
    assert not (tmp_path / "out").exists()
    assert main(["merge-adapters", str(a), str(d), "--out", out, "--combination", "cat"]) == 0


def test_qlora_adapters_merge_into_the_dequantized_4bit_base(tmp_path):
    """Adapters of QLoRA finetune runs (their run's config.yaml says method: qlora) are combined on the 4-bit base and
    --merge writes them into its dequantized weights: the merged checkpoint computes what the combined adapter
    computes on the 4-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tune.adapters import load_base_model
    from tune.train_config import QuantSection

    base = tiny_llama(tmp_path / "base")
    quant = QuantSection(compute_dtype="fp32")
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(base, tmp_path / name / "adapter", seed)
        (tmp_path / name / "config.yaml").write_text("method: qlora\nqlora:\n  compute_dtype: fp32\n")
    assert main(["merge-adapters", str(tmp_path / "a" / "adapter"), str(tmp_path / "b" / "adapter"),
                 "--out", str(tmp_path / "out"), "--merge", str(tmp_path / "merged")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        combined = PeftModel.from_pretrained(load_base_model(base, "qlora", torch.float32, quant), tmp_path / "out")
    ours = logits(combined, IDS)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), IDS), ours,
                               atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "merged" / "merge_info.json").read_text())["dequantized_4bit_base"] is True
