"""GPT-1 task heads (issue 13), model side: the loss against hand-computed references, similarity's order invariance,
multiple choice's softmax over choices, the weighted LM loss, and the HF export's predictions equal ours."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tune.losses import IGNORE_INDEX, chunked_ce_sum
from tune.task_heads import (TaskHeadModel, add_task_tokens, collate_task, export_hf, load_task_model, predict,
                             resize_embeddings, save_head, task_loss_fn)


@dataclass
class Ex:  # data_prep.task_data.EncodedExample's fields
    sequences: list
    target: object
    truncated: bool = False


@pytest.fixture(scope="module")
def tok():
    from data_prep.text import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["the cat sat on the mat", "a dog ran in the park", "is it true or false"] * 20, 300)
    ids, new = add_task_tokens(tokenizer, "<s>", "<$>", "<e>")
    return tokenizer, ids, new


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def lm_of(arch: str, vocab: int, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OpenAIGPTConfig,
                              OpenAIGPTLMHeadModel)

    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    if arch == "openai-gpt":
        return OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def pair(ids, a, b):
    return [ids["start"], *a, ids["delimiter"], *b, ids["extract"]]


def test_task_tokens_are_added_once_with_a_pad_token_and_grow_the_embeddings_to_their_mean(tok):
    from data_prep.text import train_bpe_tokenizer

    tokenizer, ids, new = tok
    assert new == ["<s>", "<$>", "<e>"]  # the tokenizer has a pad token
    assert sorted(ids.values()) == [tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<$>", "<e>")]
    assert add_task_tokens(tokenizer, "<s>", "<$>", "<e>") == (ids, [])  # already there: reused, nothing new
    bare = train_bpe_tokenizer(["the cat sat on the mat"] * 5, 280)
    bare.pad_token = None
    _, new = add_task_tokens(bare, "<s>", "<$>", "<e>")
    assert new == ["<s>", "<$>", "<e>", "<pad>"] and bare.pad_token == "<pad>"
    lm = lm_of("llama", len(bare) - 4)  # untied: both tables grow
    old_in, old_out = lm.get_input_embeddings().weight.clone(), lm.get_output_embeddings().weight.clone()
    assert resize_embeddings(lm, len(bare)) == 4
    for new_w, old_w in ((lm.get_input_embeddings().weight, old_in), (lm.get_output_embeddings().weight, old_out)):
        assert torch.equal(new_w[:len(old_w)], old_w)
        assert torch.allclose(new_w[len(old_w):], old_w.mean(0).expand(4, -1))


def test_extract_token_as_pad_is_refused():
    from data_prep.text import train_bpe_tokenizer
    from tune.errors import ConfigError

    tokenizer = train_bpe_tokenizer(["a b c"] * 5, 280)
    tokenizer.pad_token = "<e>" if "<e>" in tokenizer.get_vocab() else tokenizer.eos_token
    with pytest.raises(ConfigError, match="pad token"):
        add_task_tokens(tokenizer, "<s>", "<$>", tokenizer.pad_token)


def test_loss_is_task_cross_entropy_plus_lambda_times_the_per_sequence_mean_lm_loss(tok):
    """By hand: the head's logits at <e> give CE; the LM part is, per example, the mean over its sequences of the
    plain next-token CE of each sequence (computed here on full logits, one sequence at a time)."""
    tokenizer, ids, _ = tok
    lm = lm_of("gpt2", len(tokenizer))
    model = TaskHeadModel(lm, "entailment", 3).eval()
    a, b, c = enc(tokenizer, "the cat sat"), enc(tokenizer, "on the mat"), enc(tokenizer, "a dog ran in the park")
    examples = [Ex([pair(ids, a, b)], 2), Ex([pair(ids, c, a)], 0), Ex([pair(ids, b, c + c)], 1)]
    batch = collate_task(examples, "entailment", tokenizer.pad_token_id)
    ce_sum, lm_sum, correct = 0.0, 0.0, 0
    for ex in examples:
        ids_t = torch.tensor([ex.sequences[0]])
        out = lm(ids_t, output_hidden_states=True)
        logits = model.head(out.hidden_states[-1][0, -1])
        ce_sum += F.cross_entropy(logits[None], torch.tensor([ex.target]), reduction="sum")
        lm_sum += F.cross_entropy(out.logits[0, :-1], ids_t[0, 1:])  # mean over the sequence's tokens
        correct += int(logits.argmax() == ex.target)
    for lm_coef in (0.0, 0.5, 2.0):
        loss, count, extras = task_loss_fn(lm_coef, regression=False)(model, batch)
        assert int(count) == 3
        torch.testing.assert_close(loss, ce_sum + lm_coef * lm_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(extras["task_loss"], ce_sum.detach(), rtol=1e-5, atol=1e-5)
        assert float(extras["accuracy"]) == correct
        if lm_coef:
            torch.testing.assert_close(extras["lm_loss"], lm_sum.detach(), rtol=1e-5, atol=1e-5)
        else:
            assert "lm_loss" not in extras  # lambda = 0: exactly the task loss, the LM part not even computed
    loss0, _, _ = task_loss_fn(0.0, regression=False)(model, batch)
    assert torch.equal(loss0, task_loss_fn(0.0, regression=False)(model, batch)[2]["task_loss"])


def test_regression_loss_is_the_squared_error_of_the_score(tok):
    tokenizer, ids, _ = tok
    model = TaskHeadModel(lm_of("gpt2", len(tokenizer)), "similarity", 1).eval()
    a, b = enc(tokenizer, "the cat"), enc(tokenizer, "a dog ran")
    examples = [Ex([pair(ids, a, b), pair(ids, b, a)], 3.5), Ex([pair(ids, b, b), pair(ids, b, b)], 0.25)]
    batch = collate_task(examples, "similarity", tokenizer.pad_token_id, regression=True)
    scores, _ = model(batch, with_lm=False)
    loss, count, extras = task_loss_fn(0.0, regression=True)(model, batch)
    torch.testing.assert_close(loss, ((scores[:, 0] - torch.tensor([3.5, 0.25])) ** 2).sum())
    assert "accuracy" not in extras and int(count) == 2


def test_similarity_adds_both_orders_so_the_prediction_ignores_the_order(tok):
    tokenizer, ids, _ = tok
    model = TaskHeadModel(lm_of("gpt2", len(tokenizer)), "similarity", 2).eval()
    a, b = enc(tokenizer, "the cat sat on the mat"), enc(tokenizer, "is it true")
    ab = Ex([pair(ids, a, b), pair(ids, b, a)], 1)
    ba = Ex([pair(ids, b, a), pair(ids, a, b)], 1)
    p = predict(model, [ab, ba], tokenizer.pad_token_id, regression=False)
    torch.testing.assert_close(p[0], p[1])
    # and it is the head on the sum of the two <e> states
    states = [model.lm(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, -1] for s in ab.sequences]
    torch.testing.assert_close(p[0], model.head(states[0] + states[1]).softmax(-1), rtol=1e-5, atol=1e-6)


def test_multiple_choice_is_a_softmax_over_one_score_per_choice(tok):
    """Examples with 3 and 2 choices in one batch: each choice's score by hand, softmax over that example's choices
    only; the CE picks the right choice."""
    tokenizer, ids, _ = tok
    model = TaskHeadModel(lm_of("gpt2", len(tokenizer)), "multiple_choice", 1).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    ctx = enc(tokenizer, "is it true")
    answers = [enc(tokenizer, t) for t in ("the cat", "a dog ran", "on the mat")]
    examples = [Ex([pair(ids, ctx, x) for x in answers], 2), Ex([pair(ids, ctx, x) for x in answers[:2]], 0)]
    batch = collate_task(examples, "multiple_choice", tokenizer.pad_token_id)
    logits, _ = model(batch, with_lm=False)
    for e, ex in enumerate(examples):
        by_hand = torch.stack([model.head(model.lm(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, -1])[0]
                               for s in ex.sequences])
        torch.testing.assert_close(logits[e, :len(ex.sequences)], by_hand, rtol=1e-5, atol=1e-6)
    assert logits[1, 2] == float("-inf")
    probs = predict(model, examples, tokenizer.pad_token_id, regression=False)
    torch.testing.assert_close(probs[1], F.pad(logits[1, :2].softmax(-1), (0, 1)))
    loss, _, _ = task_loss_fn(0.0, regression=False)(model, batch)
    torch.testing.assert_close(loss, -(logits[0].log_softmax(-1)[2] + logits[1, :2].log_softmax(-1)[0]))


@pytest.mark.parametrize("fusable", [True, False])
def test_weighted_chunked_ce_equals_weighted_full_logits(fusable):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    if not fusable:
        head.register_forward_hook(lambda m, i, o: o)  # a hook makes the head non-fusable: the autograd path
    targets = torch.randint(0, 50, (3, 7))
    targets[0, 5:] = IGNORE_INDEX
    weights = torch.rand(3, 7)
    total, count = chunked_ce_sum(hidden, head, targets, chunk_size=4, weights=weights)
    ref_ce = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    ref = (ref_ce * weights.flatten()).sum()
    torch.testing.assert_close(total, ref)
    assert int(count) == 19
    g, = torch.autograd.grad(total, hidden)
    g_ref, = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("arch, kind, hf_class", [
    ("gpt2", "classification", "GPT2ForSequenceClassification"),
    ("openai-gpt", "entailment", "OpenAIGPTForSequenceClassification"),
    ("llama", "classification", "LlamaForSequenceClassification"),
    ("gpt2", "multiple_choice", "GPT2DoubleHeadsModel"),
    ("openai-gpt", "multiple_choice", "OpenAIGPTDoubleHeadsModel"),
])
def test_exported_hf_model_predicts_what_ours_predicts(tok, tmp_path, arch, kind, hf_class):
    """The export loads with plain transformers (no remote code) and gives the same probabilities on right-padded
    batches: ForSequenceClassification reads the last non-pad token, i.e. <e>; DoubleHeads reads mc_token_ids."""
    import transformers

    tokenizer, ids, _ = tok
    model = TaskHeadModel(lm_of(arch, len(tokenizer)), kind, 3).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    a, b, c = enc(tokenizer, "the cat sat"), enc(tokenizer, "on the mat"), enc(tokenizer, "a dog ran in the park")
    if kind == "multiple_choice":
        examples = [Ex([pair(ids, a, b), pair(ids, a, c)], 1), Ex([pair(ids, c, b), pair(ids, c, a + a)], 0)]
    else:
        examples = [Ex([[ids["start"], *a, ids["extract"]]], 1), Ex([pair(ids, c, b)], 0)]
    ours = predict(model, examples, tokenizer.pad_token_id, regression=False)
    out, name = export_hf(model, model.lm, tokenizer, {"kind": kind, "labels": ["x", "y", "z"]}, tmp_path / "hf")
    assert name == hf_class
    loaded = getattr(transformers, hf_class).from_pretrained(out, trust_remote_code=False).eval()
    batch = collate_task(examples, kind, tokenizer.pad_token_id)
    with torch.no_grad():
        if kind == "multiple_choice":
            theirs = loaded(input_ids=batch["input_ids"].view(2, 2, -1),
                            mc_token_ids=batch["extract_index"].view(2, 2)).mc_logits.softmax(-1)
        else:
            theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
            assert loaded.config.id2label == {0: "x", 1: "y", 2: "z"}
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_similarity_export_is_the_causal_lm_and_the_head_file(tok, tmp_path):
    """No HF class adds two orders: the export is the causal LM + task_head.safetensors + task.json, and
    load_task_model gives the same predictions."""
    tokenizer, ids, _ = tok
    model = TaskHeadModel(lm_of("llama", len(tokenizer)), "similarity", 2).eval()
    a, b = enc(tokenizer, "the cat sat"), enc(tokenizer, "on the mat")
    examples = [Ex([pair(ids, a, b), pair(ids, b, a)], 1)]
    meta = {"kind": "similarity", "labels": ["no", "yes"], "n_outputs": 2, "regression": False}
    out, name = export_hf(model, model.lm, tokenizer, meta, tmp_path / "hf")
    assert name == "LlamaForCausalLM + task_head.safetensors"
    loaded, _, loaded_meta = load_task_model(out)
    assert loaded_meta["format"] == "causal_lm"
    torch.testing.assert_close(predict(loaded, examples, tokenizer.pad_token_id, False),
                               predict(model, examples, tokenizer.pad_token_id, False))


def test_a_full_model_saved_with_its_head_reloads_with_the_same_predictions(tok, tmp_path):
    tokenizer, ids, _ = tok
    model = TaskHeadModel(lm_of("gpt2", len(tokenizer)), "classification", 2).eval()
    examples = [Ex([[ids["start"], *enc(tokenizer, "the cat"), ids["extract"]]], 0)]
    model.lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    save_head(model, tmp_path, {"format": "causal_lm", "kind": "classification", "labels": ["a", "b"], "n_outputs": 2})
    loaded, _, _ = load_task_model(tmp_path)
    torch.testing.assert_close(predict(loaded, examples, tokenizer.pad_token_id, False),
                               predict(model, examples, tokenizer.pad_token_id, False))


def test_val_metrics_turn_mean_counts_into_macro_f1_and_moments_into_pearson():
    """Means of per-class counts (what the engine reports) give the F1 of the sums; moments give numpy's Pearson."""
    import numpy as np

    from tune.task_heads import _eval_sums, val_metrics

    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 1])
    sums = _eval_sums(F.one_hot(pred, 4).float(), y, regression=False, kind="classification")
    out = val_metrics({"accuracy": 4 / 7, **{k: float(v) / 7 for k, v in sums.items()}})
    f1 = [2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 2 + 0), 2 * 1 / (2 * 1 + 0 + 2)]  # class 3: never true or predicted
    assert out == pytest.approx({"accuracy": 4 / 7, "macro_f1": sum(f1) / 3})
    x, t = torch.tensor([[0.5], [1.5], [2.0], [4.0]]), torch.tensor([1.0, 1.0, 3.0, 3.5])
    sums = _eval_sums(x, t, regression=True, kind="similarity")
    out = val_metrics({k: float(v) / 4 for k, v in sums.items()})
    assert out["pearson"] == pytest.approx(np.corrcoef(x[:, 0].numpy(), t.numpy())[0, 1])
