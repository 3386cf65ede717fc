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


# options -> what adapter_config.json must say. PiSSA / OLoRA adapters are saved converted for the original base
# (peft's path_initial_model_for_weight_conversion): rank 2r, alpha 2·alpha (patterns doubled), init_lora_weights true
@pytest.mark.parametrize("options,saved", [
    ({"use_dora": True}, {"use_dora": True}),
    ({"use_rslora": True}, {"use_rslora": True}),
    ({"layers_to_transform": [1], "target_modules": ["q_proj", "v_proj"]}, {"layers_to_transform": [1]}),
    ({"exclude_modules": ["o_proj", "down_proj"]}, {"exclude_modules": ["down_proj", "o_proj"]}),
    ({"init": "gaussian"}, {"init_lora_weights": "gaussian", "r": 4}),
    ({"init": "pissa", "rank_pattern": {"q_proj": 2}}, {"init_lora_weights": True, "r": 8, "lora_alpha": 16,
                                                         "rank_pattern": {"q_proj": 4}}),
    ({"init": "pissa_niter_2"}, {"init_lora_weights": True, "r": 8, "lora_alpha": 16}),
    ({"init": "olora"}, {"init_lora_weights": True, "r": 8, "lora_alpha": 16}),
    ({"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 2}},
     {"r": 4, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 2}}),
    ({"trainable_token_indices": [3, 5, 7]}, {"trainable_token_indices": [3, 5, 7]}),
])
def test_lora_option_reaches_peft_trains_reloads_and_merges_exactly(tmp_path, options, saved):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tune.adapters import prepare_initial_adapter, save_adapter

    base = tiny_llama(tmp_path / "base")
    lora = LoraSection(r=4, alpha=8, dropout=0.0, **options)
    model = add_lora(AutoModelForCausalLM.from_pretrained(base), lora)
    targeted = model.targeted_module_names
    if "layers_to_transform" in options:
        assert targeted and all(".layers.1." in name for name in targeted)
    if "exclude_modules" in options:
        assert targeted and not any(name.endswith(("o_proj", "down_proj")) for name in targeted)
    layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if hasattr(m, "r")}
    if "rank_pattern" in options:  # q_proj at its own rank; v_proj at its own alpha (scaling alpha / r)
        q, v, k = (layers[f"model.layers.0.self_attn.{n}_proj"] for n in "qvk")
        assert (q.r["default"], q.scaling["default"]) == (2, 8 / 2)
        assert (v.r["default"], v.scaling["default"]) == (4, 2 / 4) if "alpha_pattern" in options else True
        assert (k.r["default"], k.scaling["default"]) == (4, 8 / 4)
        assert q.lora_A["default"].weight.shape == (2, 32)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    q_weight = (q_proj.get_base_layer() if hasattr(q_proj, "get_base_layer") else q_proj).weight
    original = AutoModelForCausalLM.from_pretrained(base).model.layers[0].self_attn.q_proj.weight
    if options.get("init", "default").startswith(("pissa", "olora")):  # the base holds W - scaling·B0·A0 now
        assert model.peft_config["default"].init_lora_weights == options["init"]
        assert not torch.equal(q_weight, original)
    else:
        assert torch.equal(q_weight, original)
    initial = prepare_initial_adapter(model, lora, tmp_path / "run")
    # a few steps, so B (and DoRA's magnitude) leave their initial values
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(model, tmp_path / "adapter", initial)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {key: sorted(config[key]) if isinstance(config[key], list) else config[key] for key in saved} == saved
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(AutoModelForCausalLM.from_pretrained(base), ids))  # it trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(plain, ids), ours, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(base, tmp_path / "adapter", tmp_path / "merged"))
    torch.testing.assert_close(logits(merged, ids), ours, atol=1e-5, rtol=1e-5)
    if "trainable_token_indices" in options:  # those rows of the input embedding trained, and no other
        before = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
        changed = (merged.get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == [3, 5, 7]


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


def test_loftq_fits_the_4bit_error_trains_reloads_on_the_4bit_base_and_merges_exactly(tmp_path):
    """lora.init=loftq (QLoRA): every adapted layer starts at Q + scaling·B·A = Q + SVD_r(W - Q), the best rank-r
    approximation of the full-precision weight W, so its error ||W - (Q + scaling·B·A)|| is the norm of W - Q's
    singular values past r (hand-computed here) and below plain QLoRA's ||W - Q|| (B = 0). The 4-bit weights stay
    as loaded: the adapter reloads in plain peft on the 4-bit base, and merges into its dequantized weights, exactly."""
    from bitsandbytes.functional import dequantize_4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tune.adapters import load_base_model
    from tune.train_config import QuantSection

    base = tiny_llama(tmp_path / "base")
    quant = QuantSection(compute_dtype="fp32")
    full = dict(AutoModelForCausalLM.from_pretrained(base).named_modules())
    lora = LoraSection(r=4, alpha=8, dropout=0.0, init="loftq")
    model = add_lora(load_base_model(base, "qlora", torch.float32, quant), lora)
    layers = [(n.removeprefix("base_model.model."), m) for n, m in model.named_modules() if hasattr(m, "lora_A")
              and "default" in m.lora_A]
    assert len(layers) == 2 * 7
    for name, layer in layers:
        weight, q = full[name].weight.detach(), layer.get_base_layer().weight
        error = weight - dequantize_4bit(q.data, q.quant_state)
        delta = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        singular = torch.linalg.svdvals(error)
        assert (error - delta).norm().item() == pytest.approx(singular[4:].norm().item(), rel=1e-4)
        assert (error - delta).norm() < 0.9 * error.norm()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    ours = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(load_base_model(base, "qlora", torch.float32, quant), tmp_path / "adapter")
    torch.testing.assert_close(logits(plain, ids), ours, atol=1e-5, rtol=1e-5)
    merged = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged", quant=quant)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), ids), ours, atol=1e-4, rtol=1e-4)


def test_lora_init_patterns_and_tokens_are_checked_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    from tune.train_config import lora_init_problem

    with pytest.raises(ConfigError, match=r"lora.init='svd' is not one of default, gaussian, pissa, pissa_niter_N"):
        LoraSection(init="svd")
    with pytest.raises(ConfigError, match="lora.init='pissa_niter_0' is not one of"):
        LoraSection(init="pissa_niter_0")
    with pytest.raises(ConfigError, match="lora.use_dora cannot start from lora.init=pissa"):
        LoraSection(init="pissa", use_dora=True)
    with pytest.raises(ConfigError, match=r"lora.rank_pattern must map module names \(or regexes\) to an integer >= 1"):
        LoraSection(rank_pattern={"q_proj": 0})
    with pytest.raises(ConfigError, match="lora.alpha_pattern must map module names"):
        LoraSection(alpha_pattern={"q_proj": "big"})
    with pytest.raises(ConfigError, match=r"got \{'q_proj:8': None\}; YAML needs a space after the colon"):
        LoraSection(rank_pattern={"q_proj:8": None})  # what YAML makes of lora.rank_pattern={q_proj:8}
    with pytest.raises(ConfigError, match=r"lora.rank_pattern: '\(q_proj' is not a valid regex"):
        LoraSection(rank_pattern={"(q_proj": 2})
    with pytest.raises(ConfigError, match="lora.init=olora with lora.use_rslora and a rank/alpha pattern"):
        LoraSection(init="olora", use_rslora=True, rank_pattern={"q_proj": 2})
    with pytest.raises(ConfigError, match="lora.init=pissa cannot be combined with lora.trainable_token_indices"):
        LoraSection(init="pissa", trainable_token_indices=[1])
    with pytest.raises(ConfigError, match="lora.init=olora cannot be combined with lora.trainable_token_indices or "
                                          "lora.bias"):
        LoraSection(init="olora", bias="lora_only")
    for bad in ([], [-1], ["a"], {"embed_tokens": []}, {}):
        with pytest.raises(ConfigError, match="lora.trainable_token_indices must list token ids >= 0"):
            LoraSection(trainable_token_indices=bad)
    from tune.adapters import token_indices  # classify adds its task tokens to lora.trainable_token_indices

    assert token_indices(LoraSection(trainable_token_indices=[9, 3]), [3, 60]) == [3, 9, 60]
    assert token_indices(LoraSection(trainable_token_indices={"embed_tokens": [1]})) == {"embed_tokens": [1]}
    with pytest.raises(ConfigError, match="lora.trainable_token_indices must be a list of token ids here"):
        token_indices(LoraSection(trainable_token_indices={"embed_tokens": [1]}), [60])
    assert "is for method=qlora only" in lora_init_problem(LoraSection(init="loftq"), "lora")
    assert "a 4-bit base cannot hold exactly" in lora_init_problem(LoraSection(init="pissa"), "qlora")
    assert lora_init_problem(LoraSection(init="loftq"), "qlora") is None
    assert lora_init_problem(LoraSection(init="pissa_niter_4"), "lora") is None
    assert "which only the finetune recipe converts back" in lora_init_problem(LoraSection(init="olora"), "lora",
                                                                                converts=False)  # distill, classify
    assert lora_init_problem(LoraSection(init="olora"), "full", converts=False) is None
    base = tiny_llama(tmp_path / "base")
    with pytest.raises(ConfigError, match="lora.init=loftq fits the adapter to the error of a 4-bit base"):
        add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(init="loftq"))
    with pytest.raises(ConfigError, match="token ids must be below the input embedding's 64 rows"):
        add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(trainable_token_indices=[3, 64]))
    tied = AutoModelForCausalLM.from_pretrained(base)
    tied.lm_head.weight = tied.model.embed_tokens.weight  # one tensor, as a tie_word_embeddings base loads
    with pytest.raises(ConfigError, match="lora.init=pissa would change lm_head, whose weight the model shares"):
        add_lora(tied, LoraSection(init="pissa", target_modules=["q_proj", "lm_head"]))
    from tune.adapters import prepare_initial_adapter
    from tune.errors import TuneError

    pissa = LoraSection(r=4, init="pissa")
    start = prepare_initial_adapter(add_lora(AutoModelForCausalLM.from_pretrained(base), pissa), pissa, tmp_path / "run")
    assert prepare_initial_adapter(add_lora(AutoModelForCausalLM.from_pretrained(base), pissa), pissa, tmp_path / "run",
                                   resume=True) == start
    other = AutoModelForCausalLM.from_pretrained(base)
    other.model.layers[0].self_attn.q_proj.weight.data *= 2  # another base: another SVD, another residual
    with pytest.raises(TuneError, match="initial_adapter: this rebuild of the lora.init=pissa model starts from other"):
        prepare_initial_adapter(add_lora(other, pissa), pissa, tmp_path / "run", resume=True)
    from tune.adapters import save_adapter

    with pytest.raises(TuneError, match="gone is missing: a lora.init=pissa / olora run keeps its starting adapter"):
        save_adapter(add_lora(AutoModelForCausalLM.from_pretrained(base), pissa), tmp_path / "out", tmp_path / "gone")
    from transformers import GPT2Config, GPT2LMHeadModel

    def make_gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()

    with pytest.raises(ConfigError, match="lora.init=olora: peft builds it wrongly for Conv1D layers"):
        add_lora(make_gpt2(), LoraSection(init="olora"))
    # PiSSA handles GPT-2's transposed Conv1D weights: the model starts computing what the base computes
    ids, gpt2 = torch.arange(12)[None], make_gpt2()
    before = logits(gpt2, ids)
    torch.testing.assert_close(logits(add_lora(gpt2, LoraSection(r=4, init="pissa", dropout=0.0)), ids), before,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", [pytest.param("pissa_niter_2", marks=pytest.mark.slow), "olora"])
def test_pissa_and_olora_runs_resume_export_and_merge_exactly(tmp_path, ni_texts, init):
    """The finetune recipe with a base-changing init: the saved adapter (converted through run_dir/initial_adapter)
    applies to the untouched base with the trained model's logits, merge=true equals it, `tune export` of the last
    checkpoint writes the same adapter, and a run stopped at step 4 and resumed (the base residual rebuilt and
    checked against initial_adapter) ends with the same adapter and losses."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import NI_TASKS, rewind_to_step_4
    from recipes.finetune import run
    from test_finetune import finetune_config, make_base, train_losses
    from tune.cli import main

    if not NI_TASKS.is_dir():
        pytest.skip(f"{NI_TASKS} not present")
    base = make_base(tmp_path / "llama_base", ni_texts, "tiny-modern")
    steps = {"train.max_steps": 8, "train.save_every": 2, "lora.init": init, "lora.r": 4, "lora.dropout": 0.0,
             "merge": "true"}
    cfg = finetune_config(tmp_path, base, "lora", **steps)
    result = run(cfg)
    run_dir = result.run_dir
    assert (run_dir / "initial_adapter" / "adapter_model.safetensors").is_file()
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    ids = torch.arange(1, 40)[None]
    ours = logits(result.model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "adapter")
    torch.testing.assert_close(logits(plain, ids), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(run_dir / "merged"), ids), ours,
                               atol=1e-5, rtol=1e-5)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(tmp_path / "export" / "adapter_model.safetensors")
    assert exported.keys() == adapter.keys() and all(torch.equal(exported[k], adapter[k]) for k in adapter)
    losses = train_losses(run_dir)
    rewind_to_step_4(run_dir)
    run(finetune_config(tmp_path, base, "lora", **steps, **{"train.resume": "true"}))
    resumed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    assert train_losses(run_dir)[-4:] == losses[-4:]


def test_validate_checks_the_new_lora_keys_without_torch(tmp_path):
    """`tune validate` takes lora.init / rank_pattern / alpha_pattern / trainable_token_indices as overrides and
    refuses an init that does not suit the method, in one line, importing neither torch nor transformers."""
    import subprocess
    import sys
    from pathlib import Path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], '
                                       '"n_positions": 64, "n_layer": 2, "vocab_size": 100}')
    (model / "model.safetensors").write_bytes(b"")
    common = f"'base_model={model}', 'data.max_length=64', 'data.train_tasks={model}'"
    code = ("import sys; from tune.cli import main; "
            f"assert main(['validate', 'lora_ni', {common}, 'lora.init=pissa_niter_4', "
            "'lora.rank_pattern={c_attn: 8}', 'lora.alpha_pattern={c_attn: 16}']) == 0; "
            f"assert main(['validate', 'lora_ni', {common}, 'lora.trainable_token_indices=[1, 2]']) == 0; "
            f"assert main(['validate', 'lora_ni', {common}, 'lora.init=loftq']) == 2; "
            f"assert main(['validate', 'qlora_ni', {common}, 'lora.init=olora']) == 2; "
            f"assert main(['validate', 'lora_ni', {common}, 'lora.layers_to_transform=[1]', "
            "'lora.target_modules=[c_attn]', 'lora.trainable_token_indices=[99]', 'train.loraplus_lr_ratio=16']) == 0; "
            f"assert main(['validate', 'lora_ni', {common}, 'lora.layers_to_transform=[0, 2]', "
            "'lora.target_modules=[c_attn]']) == 2; "
            f"assert main(['validate', 'lora_ni', {common}, 'lora.trainable_token_indices=[5, 100]']) == 2; "
            f"assert main(['validate', 'full_ni', {common}, 'train.loraplus_lr_ratio=16']) == 2; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 5 and "lora.init=loftq fits the adapter to the error of a 4-bit base" in errors[0]
    assert "lora.init=olora moves part of each base weight into the adapter" in errors[1], result.stderr
    # what the model's config.json says: its layers, its vocabulary; LoRA+ needs LoRA
    assert errors[2:] == [
        "error: lora.layers_to_transform=[0, 2]: the model has 2 decoder layers (indices 0 to 1); give indices below 2",
        "error: lora.trainable_token_indices: token ids must be below the model's vocabulary of 100, got 100; add the "
        "new tokens to the tokenizer and base model first",
        "error: train.loraplus_lr_ratio applies to method=lora or qlora (it speeds up the LoRA B matrices); set it to "
        "null for a full fine-tune"], result.stderr


@pytest.mark.parametrize("options,message", [
    ({"rank_pattern": {"q_projj": 2}}, r"lora.rank_pattern: 'q_projj' matches no module LoRA adapts"),
    ({"alpha_pattern": {"v_proj": 2, "nothing": 4}}, r"lora.alpha_pattern: 'nothing' matches no module LoRA adapts"),
    ({"rank_pattern": {"q_proj": 2}, "target_modules": ["v_proj"]}, r"lora.rank_pattern: 'q_proj' matches no module"),
    ({"exclude_modules": ["o_projj"]}, r"lora.exclude_modules: 'o_projj' is no module of the model"),
    ({"layers_to_transform": [0, 2], "target_modules": ["q_proj"]},
     r"lora.layers_to_transform=\[0, 2\]: the model has 2 decoder layers \(indices 0 to 1\)"),
    ({"trainable_token_indices": {"embed_tokenz": [3]}},
     r"lora.trainable_token_indices: 'embed_tokenz' is no module of the model"),
])
def test_lora_names_that_match_nothing_are_config_errors_naming_their_key(tmp_path, options, message):
    """peft ignores (with a warning) rank/alpha pattern keys and exclude_modules entries that match nothing, so a typo
    silently trained every layer at r / alpha; a layer index past the model, or a trainable-token module that does not
    exist, failed in peft under lora.target_modules' name."""
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base")
    with pytest.raises(ConfigError, match=message):
        add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(r=4, alpha=8, **options))
    # the right names still apply: a regex key reaches layer 0's q_proj only
    model = add_lora(AutoModelForCausalLM.from_pretrained(base),
                     LoraSection(r=4, alpha=8, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2},
                                 exclude_modules=["layers.1.self_attn.o_proj"], target_modules=["q_proj", "o_proj"]))
    assert sorted(model.targeted_module_names) == ["model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj",
                                                   "model.layers.1.self_attn.q_proj"]
    layers = model.get_base_model().model.layers
    assert [layer.self_attn.q_proj.r["default"] for layer in layers] == [2, 4]


def test_a_resume_that_changes_what_the_adapter_computes_is_refused_by_validate(tmp_path, capsys):
    """The checkpoint holds the adapter's tensors only: resumed with another lora.alpha, rsLoRA, init or other
    trainable-token ids (same shapes) they loaded silently into a different model. tune validate (and so the run)
    refuses every such change in one line, naming old and new; lora.dropout may change; method=full has no adapter."""
    from tune.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], '
                                       '"n_positions": 64, "n_layer": 2, "vocab_size": 100}')
    (model / "model.safetensors").write_bytes(b"")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: finetune\nmethod: lora\nlora:\n  alpha: 32\n  use_rslora: true\n"
                                     "  trainable_token_indices: [5, 7]\n")  # keys it lacks: their defaults
    common = ["validate", "lora_ni", f"base_model={model}", "data.max_length=64", f"data.train_tasks={model}",
              f"output_dir={run}", "train.resume=true", "lora.use_rslora=true", "lora.trainable_token_indices=[5, 7]"]
    assert main([*common, "lora.dropout=0.2"]) == 0
    capsys.readouterr()
    assert main([*common, "lora.alpha=64", "lora.trainable_token_indices=[5, 8]", "lora.init=gaussian"]) == 2
    assert capsys.readouterr().err == (
        f"error: resuming {run} would change the model its checkpoints were trained as: lora.alpha 32 -> 64, "
        "lora.init default -> gaussian, lora.trainable_token_indices [5, 7] -> [5, 8]; resume with the run's own "
        "settings (its config.yaml) or start a new output_dir\n")
    assert main([*common, "lora.use_rslora=false"]) == 2
    assert "lora.use_rslora True -> False" in capsys.readouterr().err
    assert main(["validate", "qlora_ni", *common[2:]]) == 2
    assert "would change the model its checkpoints were trained as: method lora -> qlora" in capsys.readouterr().err
    # distill and classify keep the same check (distill's method is student.method)
    from tune.train_config import check_resume_keeps_lora

    (run / "config.yaml").write_text("recipe: distill\nstudent:\n  method: lora\nlora:\n  alpha: 16\n")
    check_resume_keeps_lora(run, True, "lora", LoraSection(alpha=16), "student.method")
    check_resume_keeps_lora(run, False, "qlora", LoraSection(alpha=8), "student.method")  # no resume: no check
    with pytest.raises(ConfigError, match=r"trained as: student.method lora -> qlora;"):
        check_resume_keeps_lora(run, True, "qlora", LoraSection(alpha=16), "student.method")
    with pytest.raises(ConfigError, match=r"trained as: lora.alpha 16 -> 8;"):
        check_resume_keeps_lora(run, True, "lora", LoraSection(alpha=8), "student.method")
