"""Packed attention without a dense mask: document_ids batches (flex_attention where torch can run it, else a mask
built from them), the native GPT's positions and masks, and HF models, each against every example run alone."""

import pytest
import torch

import tune.models.gpt as gpt
from tune.losses import IGNORE_INDEX, causal_lm_loss, hidden_and_head
from tune.models.gpt import GPT, config_from_preset
from tune.packing import collate_packed, collate_padded

VOCAB, PAD = 96, 0
LENGTHS = (7, 5, 9)  # three examples, packed into rows of width 24 (3 padding positions)


def make_example(n: int, gen: torch.Generator, prompt_len: int = 3) -> dict:
    ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
    return {"input_ids": ids, "targets": [-100] * (prompt_len - 1) + ids[prompt_len:] + [-100]}


@pytest.fixture(scope="module")
def three():
    gen = torch.Generator().manual_seed(1)
    return [make_example(n, gen) for n in LENGTHS]


def native(preset: str) -> GPT:
    """tiny-gpt2: learned positions (GPT-2 layout); tiny-modern: rope + rmsnorm + swiglu, 4 query / 2 kv heads."""
    torch.manual_seed(0)
    return GPT(config_from_preset(preset, vocab_size=VOCAB, block_size=32)).float().eval()


def alone(model, examples):
    """Per-example logits (concatenated) and summed losses, each example in a row of its own."""
    logits, loss = [], 0.0
    with torch.no_grad():
        for ex in examples:
            batch = collate_padded([ex], PAD)
            out = model(input_ids=batch["input_ids"])
            logits.append(out[0] if isinstance(model, GPT) else out.logits[0])
            loss = loss + causal_lm_loss(model, batch)[0]
    return torch.cat(logits), loss


def packed_logits(model, batch) -> torch.Tensor:
    hidden, head = hidden_and_head(model, batch)
    return head(hidden)


# -- native GPT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-modern"])
@pytest.mark.parametrize("path", ["flex", "document_ids_dense", "4d"])
def test_native_packed_logits_equal_each_example_alone(three, preset, path, monkeypatch):
    """flex: document_ids through flex_attention (its eager form, as on CPU it runs forward only); document_ids_dense:
    the dense mask the model builds from them where flex cannot run (CPU training); 4d: the collator's mask."""
    flex = path == "flex"
    monkeypatch.setattr(gpt, "FLEX_DEVICES", {"cuda", "cpu"} if flex else set())
    masks = []
    real_attend = gpt.attend
    monkeypatch.setattr(gpt, "attend", lambda q, k, v, mask, **kw: masks.append(type(mask).__name__)
                        or real_attend(q, k, v, mask, **kw))
    model = native(preset)
    ref_logits, ref_loss = alone(model, three)
    masks.clear()
    batch = collate_packed([three, list(reversed(three))], 24, PAD, mask_mode="4d" if path == "4d" else "document_ids")
    with torch.no_grad():
        logits = packed_logits(model, batch)
        loss, n = causal_lm_loss(model, batch)
    assert set(masks) == {"BlockMask" if flex else "Tensor"}  # the path named is the one that ran
    torch.testing.assert_close(logits[0, :21], ref_logits, atol=1e-5, rtol=1e-5)
    reversed_ref = torch.cat([ref_logits[12:], ref_logits[7:12], ref_logits[:7]])
    torch.testing.assert_close(logits[1, :21], reversed_ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()  # the padding tail too
    torch.testing.assert_close(loss, 2 * ref_loss, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled flex_attention path runs on CUDA")
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-modern"])
def test_native_flex_on_cuda_equals_each_example_alone(three, preset):
    """The GPU path as it trains: compiled create_block_mask + compiled flex_attention, forward and backward."""
    model = native(preset)
    ref_logits, ref_loss = alone(model, three)
    model.cuda().train()  # no dropout in these presets: flex_attention runs in training mode too
    batch = {k: v.cuda() for k, v in collate_packed([three, list(reversed(three))], 24, PAD,
                                                    mask_mode="document_ids").items()}
    logits = packed_logits(model, batch)
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(logits[0, :21].cpu(), ref_logits, atol=2e-3, rtol=2e-3)  # TF32 may be on
    torch.testing.assert_close(loss.detach().cpu(), 2 * ref_loss, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-modern"])
def test_native_distill_student_loss_on_packed_rows_is_the_sum_alone(three, preset):
    """The distill recipe's bug: the native student ignored the packed batch's mask and position_ids, so it
    attended across examples and saw positions running on from one example into the next."""
    from tune.distill import kd_loss_fn

    model = native(preset)
    _, ref_loss = alone(model, three)
    for mode in ("4d", "document_ids", "position_ids"):  # position_ids: documents found where positions restart
        batch = collate_packed([three], None, PAD, mask_mode=mode)
        with torch.no_grad():
            loss, n = causal_lm_loss(model, batch)
        assert n.item() == sum(t != IGNORE_INDEX for ex in three for t in ex["targets"])
        torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    # the KD loss the recipe trains with (cached teacher: the student's own top-k, so KD = 0 and only CE is left)
    batch = collate_packed([three], None, PAD)
    with torch.no_grad():
        logp = torch.log_softmax(packed_logits(model, batch)[batch["targets"] != IGNORE_INDEX], -1)
        values, ids = logp.topk(VOCAB, -1)
        _, _, parts = kd_loss_fn(None, 0.5, 1.0, "forward_kl", 0.5, VOCAB)(
            model, dict(batch, teacher_logprobs=values, teacher_ids=ids))
    torch.testing.assert_close(parts["ce"], ref_loss, atol=1e-4, rtol=1e-5)


def test_native_single_example_paths_agree_and_generate_works():
    """No mask (SDPA is_causal), explicit positions 0..T-1 and one document id give the same logits."""
    model = native("tiny-modern")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids)
        positions = torch.arange(10).expand(2, 10)
        torch.testing.assert_close(model(ids, position_ids=positions), plain, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(ids, document_ids=torch.zeros(2, 10, dtype=torch.long)), plain,
                                   atol=1e-5, rtol=1e-5)
    steps = list(model.generate(ids[:, :4], max_new_tokens=3, temperature=1.0, top_k=1))
    assert len(steps) == 3 and all(s.shape == (2, 1) for s in steps)
    assert torch.equal(steps[0][:, 0], plain[:, 3].argmax(-1))  # greedy: the plain forward's next token
    with pytest.raises(ValueError, match="not both"):
        model(ids, document_ids=torch.zeros(2, 10, dtype=torch.long), attention_mask=torch.ones(2, 1, 10, 10).bool())


# -- collator / batches ------------------------------------------------------------------------------------
def test_collate_document_ids_layout(three):
    batch = collate_packed([three, three[:1]], 24, PAD, mask_mode="document_ids")
    assert "attention_mask" not in batch and batch["document_ids"].dtype == torch.int64
    assert batch["document_ids"][0].tolist() == [0] * 7 + [1] * 5 + [2] * 9 + [3] * 3  # padding tail: its own id
    assert batch["document_ids"][1].tolist() == [0] * 7 + [1] * 17
    dense = collate_packed([three, three[:1]], 24, PAD)
    assert torch.equal(batch["position_ids"], dense["position_ids"]) and torch.equal(batch["input_ids"], dense["input_ids"])
    # the mask the model builds from the ids is the collator's dense mask, except that padding positions attend
    # causally within the tail instead of to themselves only (their targets are -100 either way)
    built = gpt.document_dense_mask(batch["document_ids"])
    assert torch.equal(built[0, 0, :21], dense["attention_mask"][0, 0, :21])  # real query positions
    assert torch.equal(built[1, 0, :7], dense["attention_mask"][1, 0, :7])
    assert not built[0, 0, 21:, :21].any() and not built[1, 0, 7:, :7].any()  # padding sees no example


def test_ni_batches_pass_the_mask_mode(three):
    from tune.packing import PACKED_ATTENTION, NIBatches

    gen = torch.Generator().manual_seed(2)
    data = [make_example(int(n), gen) for n in torch.randint(4, 12, (30,), generator=gen)]
    flex = NIBatches(data, data[:6], 2, 1, seed=0, packing=True, max_length=32, pad_id=PAD,
                     mask_mode=PACKED_ATTENTION["flex"])
    dense = NIBatches(data, data[:6], 2, 1, seed=0, packing=True, max_length=32, pad_id=PAD,
                      mask_mode=PACKED_ATTENTION["dense"])
    for a, b in [(flex.step_batches(1, 0, 1)[0], dense.step_batches(1, 0, 1)[0]),
                 (next(iter(flex.val_batches(0, 1, 1))), next(iter(dense.val_batches(0, 1, 1))))]:
        assert set(a) == {"input_ids", "targets", "position_ids", "document_ids"}
        assert set(b) == {"input_ids", "targets", "position_ids", "attention_mask"}
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
        assert a["document_ids"].max() >= 1  # several examples in a row


def test_packed_attention_config_key():
    from recipes.distill import DistillConfig
    from recipes.finetune import FinetuneConfig
    from tune.config import load_config
    from tune.errors import ConfigError

    assert load_config(FinetuneConfig, "lora_ni").data.packed_attention == "flex"
    assert load_config(DistillConfig, "distill_ni", ["data.packed_attention=dense"]).data.packed_attention == "dense"
    with pytest.raises(ConfigError, match="packed_attention"):
        load_config(FinetuneConfig, "lora_ni", ["data.packed_attention=sparse"])


# -- HF models -----------------------------------------------------------------------------------------------
def hf_model(name: str, impl: str):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OpenAIGPTConfig,
                              OpenAIGPTLMHeadModel)

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, attn_implementation=impl)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **small))
    elif name == "openai-gpt":
        model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(n_positions=64, n_embd=32, n_layer=2, n_head=4, afn="gelu", **small))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **small))
    return model.float().eval()


@pytest.mark.parametrize("name,impl", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager"),
                                       ("llama", "flex_attention")])
def test_hf_packed_document_ids_equal_each_example_alone(three, name, impl):
    """GPT-2 (learned positions; transformers 5 has no flex_attention for it), Llama (rope, GQA) in every attention
    implementation they load with on CPU: flex_attention gets a BlockMask (forward only on CPU)."""
    model = hf_model(name, impl)
    assert model.config._attn_implementation == impl
    if impl == "flex_attention":  # transformers compiles flex per shape: the references run with sdpa (same weights)
        model.set_attn_implementation("sdpa")
    ref_logits, ref_loss = alone(model, three)
    model.set_attn_implementation(impl)
    batch = collate_packed([three, list(reversed(three))], 24, PAD, mask_mode="document_ids")
    with torch.no_grad():
        logits = packed_logits(model, batch)
        loss, _ = causal_lm_loss(model, batch)
    torch.testing.assert_close(logits[0, :21], ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :7], ref_logits[12:19], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, 2 * ref_loss, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name,impl", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "eager")])
def test_hf_dense_mask_batches_equal_each_example_alone_in_every_implementation(three, name, impl):
    """data.packed_attention=dense (a (B, 1, L, L) bool mask): eager attention adds a tensor mask to the scores, so
    a bool one passed as it is would add 0 / 1 and attend across examples; it is converted to the additive form."""
    model = hf_model(name, impl)
    ref_logits, ref_loss = alone(model, three)
    with torch.no_grad():
        loss, _ = causal_lm_loss(model, collate_packed([three, list(reversed(three))], 24, PAD, mask_mode="4d"))
    torch.testing.assert_close(loss, 2 * ref_loss, atol=1e-4, rtol=1e-5)


def test_a_dense_mask_cannot_drive_flex_attention(three):
    from tune.errors import TuneError

    model = hf_model("llama", "flex_attention")
    with pytest.raises(TuneError, match="runs flex_attention, which cannot apply a dense .* use data.packed_attention=flex"):
        causal_lm_loss(model, collate_packed([three], 24, PAD, mask_mode="4d"))


def test_hf_peft_wrapped_packed_equal_alone(three):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model("llama", "sdpa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    _, ref_loss = alone(model, three)
    with torch.no_grad():
        loss, _ = causal_lm_loss(model, collate_packed([three], None, PAD, mask_mode="document_ids"))
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)


def test_openai_gpt_cannot_take_packed_rows(three):
    """OpenAIGPTLMHeadModel (transformers 5) supports neither sdpa nor flex_attention and takes only a 2D padding
    mask: packed rows are refused with the fix, unpacked rows train."""
    from tune.adapters import attention_implementation
    from tune.errors import TuneError

    model = hf_model("openai-gpt", "eager")
    for mode in ("document_ids", "4d"):
        with pytest.raises(TuneError, match="data.packing=false"):
            causal_lm_loss(model, collate_packed([three], None, PAD, mask_mode=mode))
    with torch.no_grad():
        loss, n = causal_lm_loss(model, collate_padded(three, PAD))
    assert torch.isfinite(loss) and n.item() == sum(t != IGNORE_INDEX for ex in three for t in ex["targets"])


def test_attention_implementation_choice(tmp_path, monkeypatch):
    from tune.adapters import attention_implementation

    for name in ("gpt2", "llama", "openai-gpt"):
        hf_model(name, "eager").config.save_pretrained(tmp_path / name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_implementation(tmp_path / "llama", "flex")[0] == "flex_attention"
    assert attention_implementation(tmp_path / "llama", "dense")[0] == "sdpa"
    impl, why = attention_implementation(tmp_path / "gpt2", "flex")
    assert impl == "sdpa" and "GPT2LMHeadModel has no flex_attention" in why
    assert attention_implementation(tmp_path / "openai-gpt", "flex")[0] == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    impl, why = attention_implementation(tmp_path / "llama", "flex")
    assert impl == "sdpa" and "needs CUDA" in why


# -- no gradient crosses examples ----------------------------------------------------------------------------
def embedding_grads(model, batch, example: slice) -> torch.Tensor:
    """d(loss on the targets in `example` of row 0) / d(token embeddings) for every position of row 0: (L, D)."""
    captured = []
    emb = model.tok_emb if isinstance(model, GPT) else model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, i, out: captured.append(out) or out.retain_grad())
    targets = torch.full_like(batch["targets"], IGNORE_INDEX)
    targets[0, example] = batch["targets"][0, example]
    try:
        loss, _ = causal_lm_loss(model, dict(batch, targets=targets))
        loss.backward()
    finally:
        handle.remove()
    return captured[0].grad[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="flex_attention's backward runs on CUDA only (torch 2.13)"))])
@pytest.mark.parametrize("kind", ["native-gpt2", "native-modern", "llama"])
def test_no_gradient_crosses_examples(three, kind, device):
    """On CUDA the native GPT and a Llama loaded with flex_attention run flex_attention; on CPU the mask built from
    the document ids. Control: one document id for the whole row lets the gradient through."""
    if kind == "llama":
        model = hf_model("llama", "flex_attention" if device == "cuda" else "sdpa").train()
    else:
        model = native("tiny-gpt2" if kind == "native-gpt2" else "tiny-modern").train()
    model.to(device)
    batch = {k: v.to(device) for k, v in collate_packed([three], 24, PAD, mask_mode="document_ids").items()}
    grads = embedding_grads(model, batch, slice(7, 12))  # the loss of example 2 (positions 7..11)
    assert torch.count_nonzero(grads[:7]) == 0 and torch.count_nonzero(grads[12:]) == 0  # exactly zero
    assert grads[7:12].abs().sum() > 0
    model.zero_grad()
    leaky = embedding_grads(model, dict(batch, document_ids=torch.zeros_like(batch["document_ids"])), slice(7, 12))
    assert leaky[:7].abs().sum() > 0


# -- the recipe on real data ------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["gpt2", "llama"])
def test_finetune_flex_and_dense_train_the_same(tmp_path, tiny_lm, ni_texts, base):
    """Full fine-tuning on real NI prompts, 4 steps: per-step losses (metrics.jsonl) and val loss of
    data.packed_attention=flex and =dense agree within rel 1e-5 (fp32; the masks are equal on every real token)."""
    import json

    from conftest import NI_TASKS
    from recipes.finetune import FinetuneConfig, run
    from tune.config import load_config

    if not NI_TASKS.is_dir():
        pytest.skip(f"{NI_TASKS} not present")
    if base == "llama":
        from data_prep.text import train_bpe_tokenizer
        from tune.models.export import export_hf

        torch.manual_seed(0)
        tokenizer = train_bpe_tokenizer(ni_texts, 512)
        base_dir = export_hf(GPT(config_from_preset("tiny-modern", vocab_size=len(tokenizer), block_size=256)),
                             tmp_path / "llama_base", tokenizer)
    else:
        base_dir = tiny_lm
    tasks = ["task363_sst2_polarity_classification", "task1355_sent_comp_summarization"]
    runs = {}
    for mode in ("flex", "dense"):
        cfg = load_config(FinetuneConfig, data={
            "method": "full", "base_model": str(base_dir), "output_dir": str(tmp_path / mode),
            "data": {"train_tasks": [str(NI_TASKS / f"{t}.json") for t in tasks], "max_train_instances_per_task": 16,
                     "heldout_instances_per_task": 4, "max_length": 256, "cache_dir": str(tmp_path / "cache"),
                     "packed_attention": mode},
            "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3, "warmup_steps": 1,
                      "eval_every": 0, "eval_batches": 2, "log_every": 1, "progress": False},
            "eval": {"enabled": False}})
        result = run(cfg)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = ([r["loss"] for r in rows if "loss" in r], result.val_loss)
    assert len(runs["flex"][0]) == 4
    assert runs["flex"][0] == pytest.approx(runs["dense"][0], rel=1e-5)
    assert runs["flex"][1] == pytest.approx(runs["dense"][1], rel=1e-5)


def test_native_training_with_dropout_takes_the_dense_mask(monkeypatch):
    """flex_attention has no attention dropout: a native model training with dropout builds the dense mask."""
    monkeypatch.setattr(gpt, "FLEX_DEVICES", {"cuda", "cpu"})
    masks = []
    real_attend = gpt.attend
    monkeypatch.setattr(gpt, "attend", lambda q, k, v, mask, **kw: masks.append(type(mask).__name__)
                        or real_attend(q, k, v, mask, **kw))
    model = GPT(config_from_preset("tiny-gpt1", vocab_size=VOCAB, block_size=32, dropout=0.1))
    ids, documents = torch.randint(1, VOCAB, (1, 12)), torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        model.train()(ids, document_ids=documents)
        assert set(masks) == {"Tensor"}
        masks.clear()
        model.eval()(ids, document_ids=documents)
        assert set(masks) == {"BlockMask"}
    with pytest.raises(ValueError, match="dropout"):
        gpt.attend(*torch.randn(3, 1, 2, 12, 8), gpt.document_block_mask(documents), dropout_p=0.1, enable_gqa=False)
