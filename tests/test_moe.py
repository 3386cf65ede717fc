"""Mixture of Experts in the native GPT (issue 14, first part): routing, dropless dispatch, the load-balancing and
z losses against hand-computed values, and the router losses in the training loss."""

import json

import pytest
import torch
import torch.nn.functional as F

from tune.errors import ConfigError
from tune.losses import causal_lm_loss
from tune.models.config import GPTConfig, config_from_preset
from tune.models.gpt import GPT, MoE


def moe_layer(n_experts=4, top_k=2, mlp="swiglu", bias=False, seed=0) -> MoE:
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, mlp_hidden=16, vocab_size=32, block_size=16, mlp=mlp,
                       activation="gelu", bias=bias, n_experts=n_experts, moe_top_k=top_k)
    layer = MoE(config)
    for p in (layer.fc, layer.proj):
        torch.nn.init.normal_(p, std=0.3)  # large enough that experts differ visibly
    return layer


def expert_mlp(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ layer.fc[e].T + (layer.fc_bias[e] if layer.fc_bias is not None else 0)
    if layer.swiglu:
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ layer.proj[e].T + (layer.proj_bias[e] if layer.proj_bias is not None else 0)


def test_router_picks_the_top_k_experts_with_gates_renormalised_over_them():
    layer = moe_layer(n_experts=4, top_k=2)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, 8))  # logits = the first 4 features of the token
    x = torch.zeros(2, 8)
    x[0, :4] = torch.tensor([1.0, 3.0, 0.0, 2.0])
    x[1, :4] = torch.tensor([0.0, 0.0, 5.0, 4.0])
    logits, experts, gates = layer.route(x)
    assert experts.tolist() == [[1, 3], [2, 3]]
    # softmax restricted to the two chosen logits: e^3 / (e^3 + e^2), e^2 / (e^3 + e^2)
    expected = torch.tensor([[1 / (1 + torch.e ** -1), 1 / (1 + torch.e)]] * 2)
    torch.testing.assert_close(gates, expected)


@pytest.mark.parametrize("mlp, bias, top_k", [("swiglu", False, 2), ("gelu", True, 2), ("swiglu", False, 3),
                                              ("swiglu", False, 4)])
def test_dropless_dispatch_equals_each_token_through_its_k_experts(mlp, bias, top_k):
    """The sorted, per-expert dispatch gives every token exactly the gate-weighted sum of its k experts' outputs,
    computed here token by token (no token dropped, whatever the load: 37 tokens on 4 experts)."""
    layer = moe_layer(n_experts=4, top_k=top_k, mlp=mlp, bias=bias).eval()
    x = torch.randn(37, 8)
    out = layer(x)
    _, experts, gates = layer.route(x)
    for t in range(37):
        expected = sum(gates[t, j] * expert_mlp(layer, int(experts[t, j]), x[t]) for j in range(top_k))
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-6)
    assert float(layer.expert_fraction.sum()) == pytest.approx(1.0)


def test_load_balancing_and_z_loss_equal_hand_computed_values():
    """4 tokens, 3 experts, top-2, logits set by hand: the chosen pairs are {0,2}, {0,2}, {1,2}, {1,2}, so
    f = (2/4, 2/4, 4/4) (Σ f = k), P = the mean softmax; aux = 3 · Σ f_i P_i; z = mean(logsumexp²); each expert's
    share of the 8 assignments f / k."""
    layer = moe_layer(n_experts=3, top_k=2)
    logits = torch.tensor([[2.0, 0.0, 1.0], [1.0, 0.0, 3.0], [0.0, 0.5, 0.2], [0.0, 3.0, 2.0]])
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3, 8))
    x = torch.zeros(4, 8)
    x[:, :3] = logits
    layer(x)
    f = torch.tensor([2 / 4, 2 / 4, 4 / 4])
    torch.testing.assert_close(layer.aux_loss, 3 * (f * logits.softmax(-1).mean(0)).sum())
    torch.testing.assert_close(layer.z_loss, logits.logsumexp(-1).pow(2).mean())
    torch.testing.assert_close(layer.expert_fraction, f / 2)


def test_training_loss_adds_the_router_losses_per_token_and_logs_expert_fractions():
    torch.manual_seed(0)
    config = config_from_preset("tiny-moe", router_aux_coef=0.05, router_z_coef=0.001)
    model = GPT(config)
    assert sum(isinstance(b.mlp, MoE) for b in model.blocks) == config.n_layer
    x = torch.randint(0, config.vocab_size, (2, 12))
    loss, n, extras = causal_lm_loss(model, {"input_ids": x, "targets": x})
    ce = F.cross_entropy(model(x).flatten(0, 1), x.flatten(), reduction="sum")
    r = model.router_losses()
    torch.testing.assert_close(loss, ce + 24 * (0.05 * r["aux"] + 0.001 * r["z"]), rtol=1e-5, atol=1e-4)
    assert int(n) == 24 and set(extras) == {"router_aux", "router_z", *(f"expert_frac_{i}" for i in range(4))}
    assert sum(float(extras[f"expert_frac_{i}"]) for i in range(4)) == pytest.approx(24.0)
    loss.backward()
    assert all(float(m.router.weight.grad.abs().sum()) > 0 for m in model.moe_layers())


def test_every_kth_block_and_config_checks():
    config = config_from_preset("tiny-moe", n_layer=4, moe_every=2)
    assert [isinstance(b.mlp, MoE) for b in GPT(config).blocks] == [False, True, False, True]
    assert GPT(config_from_preset("tiny-modern")).router_losses() is None
    for bad, message in (({"n_experts": 1}, "n_experts must be 0"), ({"moe_top_k": 5}, "moe_top_k must be >= 1, at most model.n_experts=4"),
                         ({"moe_every": 0}, "moe_every must be >= 1"), ({"router_aux_coef": -1}, "router_aux_coef"),
                         ({"moe_every": 3, "n_layer": 2}, "moe_every=3 > model.n_layer=2: no block would be MoE"),
                         ({"moe_top_k": 1}, "moe_top_k=1: .* a top-1 gate is always 1")):
        with pytest.raises(ConfigError, match=message):
            config_from_preset("tiny-moe", **bad)


def test_export_to_mixtral_gives_equal_logits_generates_and_imports_back(tmp_path):
    """MixtralForCausalLM (transformers' own class, no remote code) computes our logits (fp32, 1e-5), generates, and
    the checkpoint imports back into the same native weights."""
    from transformers import AutoModelForCausalLM

    from tune.models.export import export_hf, import_hf

    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny-moe", n_experts=4, moe_top_k=2, tie_embeddings=False)).eval()
    for layer in model.moe_layers():
        torch.nn.init.normal_(layer.router.weight, std=0.5)  # routing that differs from token to token
    out = export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 4
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)
        generated = hf.generate(x[:, :4], max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 10)
    back = import_hf(out)
    assert back.config.n_experts == 4 and back.config.moe_top_k == 2
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_moe_models_without_a_mixtral_layout_refuse_to_export():
    """The refusal names the keys that differ from Mixtral's layout, in one line (no config dump)."""
    from tune.models.export import hf_layout

    with pytest.raises(ConfigError, match=r"exports to HF Mixtral only .*; this one has moe_every=2$"):
        hf_layout(config_from_preset("tiny-moe", n_layer=2, moe_every=2))
    with pytest.raises(ConfigError, match=r"this one has position=learned, norm=layernorm, mlp=gelu, bias=True$"):
        hf_layout(config_from_preset("tiny-gpt2", n_experts=4))


def test_active_parameters_count_top_k_of_the_experts_and_eval_loss_is_cross_entropy():
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny-moe", n_experts=4, moe_top_k=3))
    expert = sum(m.fc.numel() + m.proj.numel() for m in model.moe_layers())
    assert model.num_active_parameters() == model.num_parameters() - expert // 4
    dense = GPT(config_from_preset("tiny-modern"))
    assert dense.num_active_parameters() == dense.num_parameters()
    model.eval()
    x = torch.randint(0, 256, (2, 8))
    loss, n, extras = causal_lm_loss(model, {"input_ids": x, "targets": x})
    torch.testing.assert_close(loss, F.cross_entropy(model(x).flatten(0, 1), x.flatten(), reduction="sum"))
    assert "router_aux" in extras


def pretrain_moe(out, corpus, **train):
    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    return run(load_config(PretrainConfig, data={
        "output_dir": str(out), "model": {"preset": "tiny-moe", "block_size": 32},
        "data": {"corpus": str(corpus), "tokenizer": "char", "cache_dir": str(out.parent / "cache")},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 4,
                  "eval_batches": 2, "progress": False, "log_every": 1, "num_threads": 1, **train},
        "sample": {"num_samples": 0}, "export": False}))


def test_moe_pretraining_resumes_exactly_and_logs_router_metrics(tmp_path, shakespeare_slice, monkeypatch):
    import json

    from tune.data import TokenWindows as TokenBatches

    full = pretrain_moe(tmp_path / "a", shakespeare_slice, save_every=3)
    original = TokenBatches.step_batches

    def dies_in_step_7(self, step, rank, world):
        if step == 7:
            raise KeyboardInterrupt
        return original(self, step, rank, world)

    monkeypatch.setattr(TokenBatches, "step_batches", dies_in_step_7)
    with pytest.raises(KeyboardInterrupt):
        pretrain_moe(tmp_path / "b", shakespeare_slice, save_every=3)
    monkeypatch.setattr(TokenBatches, "step_batches", original)
    resumed = pretrain_moe(tmp_path / "b", shakespeare_slice, save_every=3, resume=True)
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"}
    assert [r["loss"] for r in rows["b"] if "loss" in r] == [r["loss"] for r in rows["a"] if "loss" in r]
    assert resumed.val_loss == full.val_loss
    train_rows = [r for r in rows["a"] if "loss" in r]
    assert all(r["router_aux"] >= 1.0 and abs(sum(r[f"expert_frac_{i}"] for i in range(4)) - 1) < 1e-5
               for r in train_rows)  # balanced: aux = top_k = 2; a single expert taking all: 4


def test_two_processes_match_one_for_an_moe_model(tmp_path, shakespeare_slice):
    """Routing and the router losses are per micro-batch and token-weighted, so 2 processes x 1 accumulation step
    train like 1 process x 2 (as the dense models in test_multiprocess.py)."""
    from conftest import assert_losses_close, losses, tune_run

    common = [f"data.corpus={shakespeare_slice}", "data.tokenizer=char", f"data.cache_dir={tmp_path / 'cache'}",
              "model.preset=tiny-moe", "model.block_size=32", "sample.num_samples=0", "export=false"]
    one = tune_run("pretrain", "demo", [*common, "train.grad_accum_steps=2"], tmp_path / "one", nproc=1)
    two = tune_run("pretrain", "demo", [*common, "train.grad_accum_steps=1"], tmp_path / "two", nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert_losses_close(a[0], b[0])
    assert_losses_close(a[1], b[1])


def test_lora_on_the_exported_mixtral_adapts_attention_and_experts(tmp_path):
    """peft's all-linear on MixtralForCausalLM: LoRA on q/k/v/o and on the stacked expert weights and router
    (target_parameters); their base weights stay frozen, and a LoRA step changes the logits. Expert LoRA takes no
    dropout in peft: a one-line error naming lora.dropout."""
    from transformers import AutoModelForCausalLM

    from tune.adapters import LoraSection, add_lora
    from tune.models.export import export_hf

    torch.manual_seed(0)
    out = export_hf(GPT(config_from_preset("tiny-moe")), tmp_path / "hf")
    with pytest.raises(ConfigError, match="lora.dropout=0.05: LoRA on this model's expert weights"):
        add_lora(AutoModelForCausalLM.from_pretrained(out), LoraSection(r=4, dropout=0.05))
    model = add_lora(AutoModelForCausalLM.from_pretrained(out), LoraSection(r=4, dropout=0.0))
    targets = set(model.peft_config["default"].target_parameters or [])
    assert {"gate_up_proj", "down_proj"} <= targets
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable) and any("self_attn" in n for n in trainable)
    x = torch.randint(0, 256, (2, 16))
    before = model(x).logits.detach()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(model(x).logits, before)


def test_lora_target_parameters_choose_the_experts_and_names_that_match_nothing_are_errors(tmp_path):
    """lora.target_parameters adapts exactly the named expert weights (not the router, which all-linear also takes);
    an expert weight put in target_modules, or a name matching nothing, is a one-line error (peft itself would skip
    it silently as long as another name matches)."""
    from transformers import AutoModelForCausalLM

    from tune.adapters import LoraSection, add_lora
    from tune.models.export import export_hf

    out = export_hf(GPT(config_from_preset("tiny-moe")), tmp_path / "hf")
    model = add_lora(AutoModelForCausalLM.from_pretrained(out), LoraSection(
        r=4, dropout=0.0, target_modules=["q_proj", "v_proj"], target_parameters=["gate_up_proj", "down_proj"]))
    adapted = {n.rsplit(".", 1)[-1] for n in model.targeted_parameter_names}
    assert adapted == {"gate_up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[-1] for n in model.targeted_module_names} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="lora.target_modules: 'gate_up_proj' is a parameter .* lora.target_parameters"):
        add_lora(AutoModelForCausalLM.from_pretrained(out), LoraSection(r=4, dropout=0.0,
                                                                          target_modules=["q_proj", "gate_up_proj"]))
    with pytest.raises(ConfigError, match="lora.target_modules: 'qproj' matches no linear layer"):
        add_lora(AutoModelForCausalLM.from_pretrained(out), LoraSection(r=4, dropout=0.0,
                                                                          target_modules=["q_proj", "qproj"]))


def test_report_plots_each_experts_share_for_an_moe_run(tmp_path):
    from tune.report import expert_fractions, write_report

    rows = [{"step": s, "loss": 3.0 - s / 10, "expert_frac_0": 0.5 + s / 100, "expert_frac_1": 0.5 - s / 100}
            for s in (1, 2, 3)] + [{"step": 3, "val_loss": 2.8}]
    assert expert_fractions(rows) == {0: [(1, 0.51), (2, 0.52), (3, 0.53)], 1: [(1, 0.49), (2, 0.48), (3, 0.47)]}
    assert expert_fractions([{"step": 1, "loss": 1.0}]) == {}
    out = write_report(rows, tmp_path / "report.png")
    assert out.is_file() and out.stat().st_size > 10_000


def test_continued_pretraining_from_mixtral_takes_the_router_weights_and_refuses_a_shape_change(tmp_path):
    """model.init_from=<Mixtral>: router_aux_coef / router_z_coef given in the config replace the checkpoint's (HF
    keeps router_aux_loss_coef only); moe_every != 1 would change its shape: one-line error."""
    from recipes.pretrain import PretrainConfig, load_init_checkpoint
    from tune.config import load_config
    from tune.models.export import export_hf

    out = export_hf(GPT(config_from_preset("tiny-moe", tie_embeddings=False)), tmp_path / "hf")

    def config(**model):
        return load_config(PretrainConfig, data={"output_dir": str(tmp_path / "run"),
                                                 "model": {"init_from": str(out), **model}})

    assert load_init_checkpoint(config()).config.router_aux_coef == 0.01  # the checkpoint's
    model = load_init_checkpoint(config(router_aux_coef=0.5, router_z_coef=1e-3))
    assert (model.config.router_aux_coef, model.config.router_z_coef) == (0.5, 1e-3)
    with pytest.raises(ConfigError, match="model.moe_every=2 would change the shape of init_from"):
        load_init_checkpoint(config(moe_every=2))


def test_an_hf_moe_trains_with_its_own_router_loss_as_transformers_computes_it():
    """Fine-tuning an HF Mixtral (e.g. our export): the engine loss equals MixtralForCausalLM's own loss with
    output_router_logits (CE + router_aux_loss_coef · load_balancing_loss_func), expert shares logged; in eval mode
    the cross-entropy alone."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.02)
    model = MixtralForCausalLM(config).train()
    x = torch.randint(0, 64, (2, 10))
    targets = torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)
    loss, n, extras = causal_lm_loss(model, {"input_ids": x, "targets": targets})
    reference = model(input_ids=x, labels=x, output_router_logits=True)
    torch.testing.assert_close(loss / n, reference.loss)
    torch.testing.assert_close(extras["router_aux"] / n, reference.aux_loss.detach())
    assert sum(extras[f"expert_frac_{i}"] for i in range(4)) / n == pytest.approx(1.0)
    model.eval()
    with torch.no_grad():
        loss, n = causal_lm_loss(model, {"input_ids": x, "targets": targets})
        torch.testing.assert_close(loss / n, model(input_ids=x, labels=x).loss)


def test_distilling_into_an_moe_student_adds_its_router_losses():
    from tune.distill import kd_loss_fn

    torch.manual_seed(0)
    teacher = GPT(config_from_preset("tiny-modern")).eval()
    student = GPT(config_from_preset("tiny-moe", router_aux_coef=0.1, router_z_coef=0.01)).train()
    x = torch.randint(0, 256, (2, 12))
    loss, n, extras = kd_loss_fn(teacher, 0.5, 2.0, "forward_kl", 0.5, 256)(student, {"input_ids": x, "targets": x})
    router = student.router_losses()
    expected = 0.5 * 4 * extras["kd"] + 0.5 * extras["ce"] + n * (0.1 * router["aux"] + 0.01 * router["z"])
    torch.testing.assert_close(loss, expected)
    assert {"kd", "ce", "router_aux", "router_z", "expert_frac_0"} <= set(extras)


@pytest.mark.slow
def test_compiled_moe_blocks_do_not_recompile_per_step_and_give_the_eager_losses(tmp_path):
    """train.compile with MoE: the expert dispatch (tokens per expert change every step) runs eager inside the
    compiled blocks, so after the first step no step compiles a new graph (before, each step's token counts
    recompiled until dynamo's recompile limit), and the losses equal the eager ones."""
    from torch._dynamo.utils import counters

    from conftest import ListSource
    from tune.engine import Engine, TrainConfig

    g = torch.Generator().manual_seed(0)
    steps = [[{"input_ids": (x := torch.randint(0, 64, (2, 24), generator=g)), "targets": x}] for _ in range(6)]
    graphs = []

    def counting_loss(model, batch):
        out = causal_lm_loss(model, batch)
        if torch.is_grad_enabled():  # a training forward (the final evaluation, without grad, is another graph)
            graphs.append(counters["stats"]["unique_graphs"])
        return out

    torch._dynamo.reset()
    counters.clear()
    losses = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        graphs.clear()
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-moe", vocab_size=64, block_size=32, n_layer=2))
        cfg = TrainConfig(max_steps=6, micro_batch_size=2, warmup_steps=1, lr=3e-3, eval_every=0, log_every=1,
                          progress=False, mixed_precision="no", compile=compile_)
        result = Engine(cfg, tmp_path / name, model, ListSource(steps), counting_loss, log=lambda s: None).fit()
        losses.append([r["loss"] for r in result.history if "loss" in r])
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 5
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_qlora_finetune_of_an_exported_mixtral_logs_its_router_and_says_the_experts_stay_unquantized(
        tmp_path, ni_texts, capsys):
    """The finetune recipe on our exported Mixtral: lora.dropout > 0 with the experts targeted is caught by validate
    (nothing written); with dropout 0, QLoRA says the 3-D expert weights stay unquantized, and the run logs the
    router's aux loss and expert shares (HF's load-balancing loss, added in training)."""
    from recipes.finetune import run, validate
    from test_finetune import finetune_config, make_base

    base = make_base(tmp_path / "moe_base", ni_texts, "tiny-moe")
    steps = {"train.max_steps": 3, "train.micro_batch_size": 2, "train.grad_accum_steps": 1}
    with pytest.raises(ConfigError, match=r"lora.dropout=0.05: LoRA on the expert weights of base_model \(an MoE, "
                                          r"mixtral\) takes no dropout in peft; set lora.dropout=0"):
        validate(finetune_config(tmp_path / "bad", base, "qlora", **steps, **{"lora.dropout": 0.05}))
    assert not (tmp_path / "bad" / "qlora").exists()
    result = run(finetune_config(tmp_path / "ok", base, "qlora", **steps, **{"lora.dropout": 0}))
    printed = capsys.readouterr().out
    assert "note: quant=nf4 leaves this MoE's 4 fused expert weights (" in printed, printed[:3000]
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 3 and all(r["router_aux"] > 0 for r in trained)
    assert sum(v for k, v in trained[0].items() if k.startswith("expert_frac_")) == pytest.approx(1.0, abs=1e-5)


def test_resuming_with_another_model_shape_is_a_one_line_error_that_keeps_the_run(tmp_path, shakespeare_slice):
    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    out = tmp_path / "run"
    pretrain_moe(out, shakespeare_slice, max_steps=4, save_every=2)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg = load_config(PretrainConfig, data={
        "output_dir": str(out), "model": {"preset": "tiny-moe", "block_size": 32, "n_experts": 8},
        "data": {"corpus": str(shakespeare_slice), "tokenizer": "char", "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 6, "micro_batch_size": 4, "resume": True, "allow_schedule_change": True,
                  "progress": False, "num_threads": 1}, "sample": {"num_samples": 0}, "export": False})
    with pytest.raises(ConfigError, match=r"blocks.0.mlp.fc has shape \[4, 384, 64\] in the checkpoint but "
                                          r"\[8, 384, 64\] in the model this config builds; resume with the run's own "
                                          r"model settings"):
        run(cfg)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
