"""On-policy distillation (GKD): KV-cached batched sampling against an uncached reference, on-policy batches made of
the student's own seeded samples, kd.lmbda = 0 equal to off-policy KD bit for bit. Exact resume after a kill, 2
processes = 1 and FSDP = 1 process with on-policy steps: the distill runs of test_crash_resume.py,
test_multiprocess.py and test_fsdp.py, whose config (conftest.recipe_configs) makes half the steps on-policy."""

import pytest
import torch

from conftest import NI_TASKS
from tune.distill import OnPolicyBatches, completion_example, prompt_of
from tune.generate import sample_completions
from tune.losses import IGNORE_INDEX
from tune.packing import NIBatches


def greedy_reference(model, prompt: list[int], steps: int, vocab: int, eos: int | None = None) -> list[int]:
    """Greedy decoding one token at a time over the whole sequence (no cache, no padding)."""
    ids, out = torch.tensor([prompt]), []
    for _ in range(steps):
        logits = model(ids)
        logits = getattr(logits, "logits", logits)
        token = int(logits[0, -1, :vocab].argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


def sharpened(model):
    """Random weights scaled up, so greedy decoding does not repeat one token (a harder test of the cache)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return model.eval()


def native(preset: str, vocab: int = 50, block: int = 32):
    from tune.models.gpt import GPT, config_from_preset

    torch.manual_seed(0)
    return sharpened(GPT(config_from_preset(preset, vocab_size=vocab, block_size=block)))


def hf_gpt2(vocab: int = 50):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    return sharpened(GPT2LMHeadModel(config))


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9], [3, 3, 3, 3, 3, 3, 3]]


@pytest.mark.parametrize("make", [lambda: native("tiny-gpt2"), lambda: native("tiny-modern"),
                                  lambda: native("tiny-moe"), hf_gpt2], ids=["gpt2", "modern", "moe", "hf-gpt2"])
def test_cached_batched_greedy_equals_uncached_decoding(make):
    """Left-padded prompts of different lengths, per-row budgets (0 included) and an end-of-sequence id: each row
    equals greedy decoding of that prompt alone without a KV cache; the padded embedding rows past vocab are never
    picked."""
    model = make()
    budgets = [6, 3, 6, 0]
    out = sample_completions(model, PROMPTS, budgets, temperature=0, vocab_size=40)
    assert out == [greedy_reference(model, p, b, 40) for p, b in zip(PROMPTS, budgets)]
    eos = out[0][2]  # a token greedy decoding emits: rows stop right after it, eos included
    stopped = sample_completions(model, PROMPTS, 6, temperature=0, eos_token_id=eos, vocab_size=40)
    assert stopped == [greedy_reference(model, p, 6, 40, eos) for p in PROMPTS]
    assert stopped[0] == out[0][:out[0].index(eos) + 1]


def test_sampling_is_a_function_of_the_generator_seed_alone():
    model = native("tiny-modern")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()

    def draw(seed):
        return sample_completions(model, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's own RNG is untouched


def synthetic_examples(n: int, vocab: int = 50) -> list[dict]:
    """NI-like tokenized examples: a prompt of 3..8 tokens, then a 2..4-token answer (the targets)."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        prompt = torch.randint(1, vocab, (3 + i % 6,), generator=g).tolist()
        answer = torch.randint(1, vocab, (2 + i % 3,), generator=g).tolist()
        examples.append(completion_example(prompt, answer))
    return examples


def batches(cls, examples, **kwargs):
    return cls(examples, examples[:4], 2, 2, seed=7, packing=True, max_length=16, pad_id=0, **kwargs)


def test_lmbda_zero_batches_are_the_off_policy_batches():
    examples = synthetic_examples(24)
    plain = batches(NIBatches, examples)
    gkd = batches(OnPolicyBatches, examples, student=native("tiny-gpt2"), lmbda=0.0, temperature=1.0,
                  max_new_tokens=4, eos_id=None, vocab_size=50)
    for step in range(1, 8):
        ours, theirs = gkd.step_batches(step, 0, 1), plain.step_batches(step, 0, 1)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_batches_hold_the_students_own_seeded_samples():
    examples = synthetic_examples(24)
    student = native("tiny-gpt2")
    make = lambda seed, temperature, accum=2: OnPolicyBatches(  # noqa: E731
        examples, examples[:4], 2, accum, seed=seed, packing=True, max_length=16, pad_id=0, student=student, lmbda=1.0,
        temperature=temperature, max_new_tokens=5, eos_id=None, vocab_size=50)
    greedy = make(7, 0.0)
    units = greedy.micro_batch_units(3, 0, 1)
    for (m, unit), batch in zip(units, greedy.step_batches(3, 0, 1)):
        rows = [examples[int(i)] for u in unit for i in u]
        assert batch["input_ids"].shape[0] == len(rows) and float(batch["on_policy"]) == 1.0
        for row, ex in enumerate(rows):
            prompt = prompt_of(ex)
            budget = min(5, 16 + 1 - len(prompt))
            completion = greedy_reference(student, prompt, budget, 50)
            n = len(prompt) + len(completion) - 1
            assert batch["input_ids"][row, :n].tolist() == (prompt + completion)[:-1]
            assert batch["targets"][row, :n].tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + completion
            assert (batch["targets"][row, n:] == IGNORE_INDEX).all()
    assert student.training is False  # sharpened() left it in eval; sampling restores the mode it found
    student.train()
    sampled = make(7, 1.0)
    first = sampled.step_batches(3, 0, 1)
    assert student.training
    again, other = sampled.step_batches(3, 0, 1), make(8, 1.0).step_batches(3, 0, 1)
    assert all(torch.equal(a["targets"], b["targets"]) for a, b in zip(first, again))
    assert any(a["targets"].shape != b["targets"].shape or not torch.equal(a["targets"], b["targets"])
               for a, b in zip(first, other))
    # 2 processes x 1 accumulation step draw the samples 1 process x 2 does (micro-batch m of the same global batch)
    half = make(7, 1.0, accum=1)
    two = [b for rank in (0, 1) for b in half.step_batches(3, rank, 2)]
    by_m = {m: b for (m, _), b in zip(half.micro_batch_units(3, 0, 2) + half.micro_batch_units(3, 1, 2), two)}
    assert all(torch.equal(by_m[m]["targets"], b["targets"]) for (m, _), b in zip(units, first))


pytest_ni = pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")


@pytest_ni
def test_gkd_without_on_policy_steps_equals_off_policy_kd_bit_for_bit(tmp_path, gpt2_base):
    """kd.lmbda = 1e-9 runs the GKD path (OnPolicyBatches, no prefetch, the on_policy share logged) but draws no
    on-policy step in 6: its losses equal kd.lmbda = 0's exactly."""
    from recipes.distill import run
    from test_distill import distill_config, history

    off = run(distill_config(tmp_path, gpt2_base, "off", **{"train.max_steps": 6}))
    gkd = run(distill_config(tmp_path, gpt2_base, "gkd", **{"train.max_steps": 6, "kd.lmbda": 1e-9}))
    assert history(gkd.run_dir, "loss") == history(off.run_dir, "loss")
    assert history(gkd.run_dir, "val_loss") == history(off.run_dir, "val_loss")
    assert history(gkd.run_dir, "on_policy") == [0.0] * 6
    on = run(distill_config(tmp_path, gpt2_base, "on", **{"train.max_steps": 4, "kd.lmbda": 0.5,
                                                          "kd.max_new_tokens": 6}))
    share = history(on.run_dir, "on_policy")
    assert set(share) == {0.0, 1.0} and len(share) == 4  # both kinds of step were drawn, each all one kind


@pytest_ni
@pytest.mark.parametrize("overrides,message", [
    (["kd.lmbda=0.5", "teacher.cache=true"], "kd.lmbda > 0 (on-policy distillation) needs a live teacher"),
    (["kd.lmbda=0.5", "train.compile=true"], "set train.compile=false"),
    (["compare.methods=[on_policy]", "teacher.cache=true"], "compare.methods names on_policy, which needs"),
    (["compare.methods=[on_policy]", "compare.lmbda=0"], "compare.lmbda must be in (0, 1], got 0"),
    (["kd.lmbda=0.5", "kd.alpha=0"], "so kd.alpha=0 would train nothing on them; set kd.alpha > 0"),
    (["kd.lmbda=0.5", "compare.methods=[on_policy]"], "compare.methods names on_policy, which this run trains itself"),
])
def test_on_policy_settings_that_cannot_work_are_refused_in_one_line(overrides, message, model_dir, tmp_path, capsys):
    from tune.cli import main

    valid = [f"teacher.model={model_dir}", f"data.train_tasks={NI_TASKS}", f"output_dir={tmp_path / 'run'}"]
    assert main(["validate", "distill_ni", *valid]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["validate", "distill_ni", *valid, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_on_policy_prompts_are_the_recorded_prompts_when_the_prompt_is_trained_on_too():
    """data.mask_prompt=false makes the prompt's tokens targets as well: the prompt to complete is then the
    example's prompt_len tokens (as the NI tokenization records them), from dicts and from an Arrow dataset alike."""
    from datasets import Dataset

    from tune.distill import prompt_of

    examples = []
    for ex in synthetic_examples(12):
        n = ex["targets"].count(IGNORE_INDEX) + 1  # the prompt's length
        ids = ex["input_ids"] + [ex["targets"][-1]]
        examples.append({"input_ids": ids[:-1], "targets": ids[1:], "prompt_len": n})  # every position a target
    assert [prompt_of(ex) for ex in examples] == [ex["input_ids"][:ex["prompt_len"]] for ex in examples]
    student = native("tiny-gpt2")
    for data in (examples, Dataset.from_list(examples)):
        batches = OnPolicyBatches(data, data, 2, 1, seed=7, packing=False, max_length=16, pad_id=0, student=student,
                                  lmbda=1.0, temperature=0.0, max_new_tokens=3, eos_id=None, vocab_size=50)
        (m, units), = batches.micro_batch_units(1, 0, 1)
        batch, = batches.step_batches(1, 0, 1)
        for row, i in enumerate(int(i) for u in units for i in u):
            prompt = examples[i]["input_ids"][:examples[i]["prompt_len"]]
            assert batch["input_ids"][row, :len(prompt)].tolist() == prompt
            assert (batch["targets"][row, :len(prompt) - 1] == IGNORE_INDEX).all()
