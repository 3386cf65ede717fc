"""Cross-tokenizer distillation (kd.cross_tokenizer=uld): the Universal Logit Distillation loss against hand-computed
values, the response alignment, the pairing of the two tokenizations, and recipes/distill.py end to end on CPU with
a teacher and a student that have different tokenizers."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import NI_TASKS
from tune.config import load_config
from tune.errors import DataError
from tune.losses import IGNORE_INDEX, chunked_uld_sum, uld_sums

TASKS = ["task363_sst2_polarity_classification", "task073_commonsenseqa_answer_generation"]


def softmax(xs, temperature):
    exps = [math.exp(x / temperature) for x in xs]
    return [e / sum(exps) for e in exps]


# -- loss ------------------------------------------------------------------------------------------
def test_uld_is_zero_for_the_same_distribution_under_a_permutation_of_the_vocabulary():
    torch.manual_seed(0)
    teacher = torch.randn(5, 40)
    student = teacher[:, torch.randperm(40)]  # the same distributions, every token relabelled
    assert uld_sums(student, teacher, 1.7).abs().max().item() < 1e-6
    # a larger student vocabulary whose extra tokens get (almost) no mass: zero padding matches them
    padded = torch.cat([student, torch.full((5, 9), -1e4)], -1)
    assert uld_sums(padded, teacher, 1.0).abs().max().item() < 1e-6
    # and not zero when the shapes differ
    assert uld_sums(torch.randn(5, 40), teacher, 1.0).min().item() > 1e-3


def test_uld_matches_hand_computation_with_different_vocabularies_and_a_temperature():
    """Student over 3 tokens, teacher over 4, T = 2: both softened, sorted decreasingly, the student's padded with a
    zero, and Σ|p_s,(i) − p_t,(i)| per position."""
    student = torch.tensor([[1.0, 3.0, 0.0], [0.5, -1.0, 2.0]])
    teacher = torch.tensor([[0.0, 2.0, 1.0, -1.0], [4.0, 0.0, 0.0, 1.0]])
    T = 2.0
    expected = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_s = sorted(softmax(s_row, T), reverse=True) + [0.0]
        p_t = sorted(softmax(t_row, T), reverse=True)
        expected.append(sum(abs(a - b) for a, b in zip(p_s, p_t)))
    got = uld_sums(student, teacher, T)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    # first row by hand: p_s = softmax([1, 3, 0] / 2) sorted, p_t likewise, last teacher probability unmatched
    e = [math.exp(x / 2) for x in (3.0, 1.0, 0.0)]
    f = [math.exp(x / 2) for x in (2.0, 1.0, 0.0, -1.0)]
    p_s, p_t = [x / sum(e) for x in e] + [0.0], [x / sum(f) for x in f]
    assert got[0].item() == pytest.approx(sum(abs(a - b) for a, b in zip(p_s, p_t)), rel=1e-6)


def test_chunked_uld_sum_equals_the_unchunked_sum_and_its_gradient():
    torch.manual_seed(1)
    student_head, teacher_head = nn.Linear(8, 30, bias=False), nn.Linear(6, 50, bias=False)
    hidden, teacher_hidden = torch.randn(11, 8, requires_grad=True), torch.randn(11, 6)
    whole = chunked_uld_sum(hidden, student_head, teacher_hidden, teacher_head, 1.5, 30, 45, chunk_size=100)
    chunked = chunked_uld_sum(hidden, student_head, teacher_hidden, teacher_head, 1.5, 30, 45, chunk_size=4)
    reference = uld_sums(student_head(hidden), teacher_head(teacher_hidden)[:, :45], 1.5).sum()
    torch.testing.assert_close(whole, reference)
    torch.testing.assert_close(chunked, reference)
    torch.testing.assert_close(torch.autograd.grad(chunked, hidden)[0], torch.autograd.grad(reference, hidden)[0])


# -- alignment and pairing --------------------------------------------------------------------------
def test_alignment_takes_the_first_min_response_tokens_of_each_example():
    from tune.distill import response_alignment
    from tune.packing import collate_packed, collate_padded

    def example(prompt, response):  # targets: -100 over the prompt, then the response ids
        ids = list(range(1, prompt + response + 1))
        return {"input_ids": ids, "targets": [IGNORE_INDEX] * (prompt - 1) + ids[prompt:] + [IGNORE_INDEX]}

    student = [example(3, 4), example(2, 2)]  # responses of 4 and 2 tokens
    teacher = [example(5, 3), example(1, 5)]  # the same examples, 3 and 5 tokens
    s, t = collate_padded(student, 0), collate_padded(teacher, 0)
    s_mask, t_mask = response_alignment(s["targets"], t["targets"], [4, 2], [3, 5])
    # example 0: min(4, 3) = 3 positions from its first response position (prompt - 1) on each side
    assert s_mask.tolist() == [[False, False, True, True, True, False, False], [False, True, True, False, False, False,
                                                                                 False]]
    assert t_mask.tolist() == [[False, False, False, False, True, True, True, False],
                               [True, True, False, False, False, False, False, False]]
    assert int(s_mask.sum()) == int(t_mask.sum()) == 5
    # packed: both examples in one row, the same positions in row-major order
    s_packed, t_packed = collate_packed([student], None, 0, "document_ids"), collate_packed([teacher], None, 0,
                                                                                           "document_ids")
    s_mask, t_mask = response_alignment(s_packed["targets"], t_packed["targets"], [4, 2], [3, 5])
    assert torch.nonzero(s_mask[0]).flatten().tolist() == [2, 3, 4, 8, 9]
    assert torch.nonzero(t_mask[0]).flatten().tolist() == [4, 5, 6, 8, 9]
    with pytest.raises(DataError, match="do not match"):
        response_alignment(s["targets"], t["targets"], [4, 3], [3, 5])


def test_pairing_drops_an_instance_missing_from_either_tokenization():
    from tune.distill import pair_examples
    from tune.packing import example_rows

    def examples(ids):
        return [{"task": "t", "id": i, "input_ids": [ord(i)], "targets": [IGNORE_INDEX]} for i in ids]

    student, teacher, dropped = pair_examples(examples(["a", "b", "d", "e"]), examples(["a", "c", "d", "e"]))
    assert [ex["id"] for ex in student] == [ex["id"] for ex in teacher] == ["a", "d", "e"]
    assert dropped == 2
    with pytest.raises(DataError, match="twice"):
        pair_examples(examples(["a", "a"]), examples(["a"]))
    # Arrow-backed datasets (as build_ni_datasets makes them) come back as selections of themselves
    from datasets import Dataset

    student, teacher, dropped = pair_examples(Dataset.from_list(examples(["a", "b", "d"])),
                                              Dataset.from_list(examples(["b", "c", "d"])))
    assert list(student["id"]) == list(teacher["id"]) == ["b", "d"] and dropped == 2
    assert [r["input_ids"] for r in example_rows(teacher, [0, 1])] == [[ord("b")], [ord("d")]]  # as batches read them


# -- recipe ------------------------------------------------------------------------------------------
pytest_ni = pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")


@pytest.fixture(scope="module")
def other_tokenizer_lm(tmp_path_factory, ni_texts) -> Path:
    """A tiny random GPT-2 with its own byte-level BPE tokenizer (300 tokens, trained on other text than tiny_lm's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_prep.text import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("other_lm")
    tokenizer = train_bpe_tokenizer(ni_texts[::3], 300)
    tokenizer.save_pretrained(out)
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer) + 4, n_positions=256, n_embd=32, n_layer=1, n_head=2,  # padded rows
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def uld_config(tmp_path: Path, teacher: Path, student: Path, name: str, **overrides):
    from recipes.distill import DistillConfig

    data = {
        "output_dir": str(tmp_path / name), "teacher": {"model": str(teacher)},
        "student": {"model": str(student), "preset": None},
        "kd": {"alpha": 0.5, "temperature": 1.0, "cross_tokenizer": "uld"},
        "data": {"train_tasks": [str(NI_TASKS / f"{t}.json") for t in TASKS], "max_train_instances_per_task": 12,
                 "heldout_instances_per_task": 4, "max_length": 256, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum_steps": 1, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 2, "eval_batches": 2, "log_every": 1, "progress": False},
        "compare": {"ce_only": False},
    }
    return load_config(DistillConfig, data=data, overrides=[f"{k}={v}" for k, v in overrides.items()])


def history(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest_ni
@pytest.mark.parametrize("packing, max_length", [("true", 128), ("false", 256)])
def test_uld_distills_across_two_tokenizers_end_to_end(tmp_path, tiny_lm, other_tokenizer_lm, packing, max_length,
                                                       capsys):
    """Packed rows at max_length 128, where one tokenizer or the other drops instances (dropped from both), and
    padded rows at 256."""
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.distill import run

    cfg = uld_config(tmp_path, tiny_lm, other_tokenizer_lm, "uld", **{"data.packing": packing,
                                                                      "data.max_length": max_length})
    result = run(cfg)
    assert result.step == 4
    losses, uld, ce = history(result.run_dir, "loss"), history(result.run_dir, "uld"), history(result.run_dir, "ce")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses + uld + ce)
    assert all(0 < u <= 2 for u in uld)  # a sum of W1 distances in [0, 2] per aligned position, per target token
    # total = α·ULD + (1 − α)·CE, per target token (α = 0.5)
    assert losses == pytest.approx([0.5 * u + 0.5 * c for u, c in zip(uld, ce)], rel=1e-5)
    assert len(history(result.run_dir, "val_uld")) == 2
    out = capsys.readouterr().out
    assert "cross-tokenizer ULD" in out
    kept, dropped = re.search(r"ULD: (\d+) training .* \((\d+) and \d+ dropped", out).groups()
    assert int(kept) > 0 and (int(dropped) > 0) == (max_length == 128), out
    saved = result.run_dir / "student"
    AutoModelForCausalLM.from_pretrained(saved)
    # the student keeps its own tokenizer
    assert AutoTokenizer.from_pretrained(saved).get_vocab() == AutoTokenizer.from_pretrained(
        other_tokenizer_lm).get_vocab()
    if packing == "false":  # `tune export` of the last checkpoint writes the same student, with its tokenizer
        from safetensors.torch import load_file

        from recipes.distill import export_checkpoint

        out = export_checkpoint(cfg, result.run_dir, result.run_dir / "checkpoints" / "step_0000004",
                                tmp_path / "exported")
        a, b = load_file(saved / "model.safetensors"), load_file(out / "model.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(saved).get_vocab()


@pytest_ni
def test_the_default_still_refuses_different_tokenizers_and_names_the_option(tmp_path, tiny_lm, other_tokenizer_lm):
    from recipes.distill import run

    cfg = uld_config(tmp_path, tiny_lm, other_tokenizer_lm, "refused", **{"kd.cross_tokenizer": "none"})
    with pytest.raises(DataError, match="different tokenizers.*kd.cross_tokenizer=uld"):
        run(cfg)
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_uld_without_an_hf_student_is_a_one_line_error(model_dir, tmp_path, capsys):
    from tune.cli import main

    (tmp_path / "task.json").write_text("{}")
    tasks = f"data.train_tasks={tmp_path / 'task.json'}"  # exists; the task files are not read by validate
    assert main(["validate", "distill_ni", f"teacher.model={model_dir}", tasks, "kd.cross_tokenizer=uld",
                 "compare.ce_only=false"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: kd.cross_tokenizer=uld needs student.model (an HF directory with its "
                                        "own tokenizer; a fresh student.preset takes the teacher's)"], err
    # every other requirement, each named
    assert main(["validate", "distill_ni", f"teacher.model={model_dir}", tasks, "kd.cross_tokenizer=uld",
                 f"student.model={model_dir}", "student.preset=null", "teacher.cache=true",
                 "data.mask_prompt=false", "kd.lmbda=0.5", "seq_kd.enabled=true"]) == 2
    err = capsys.readouterr().err
    for need in ("teacher.cache=false", "compare.ce_only=false", "data.mask_prompt=true", "kd.lmbda=0",
                 "seq_kd.enabled=false"):
        assert f"kd.cross_tokenizer=uld needs {need}" in err, err
    assert main(["validate", "distill_ni", f"teacher.model={model_dir}", tasks, "kd.cross_tokenizer=uld",
                 f"student.model={model_dir}", "student.preset=null", "compare.ce_only=false"]) == 0
    assert main(["validate", "distill_ni", f"teacher.model={model_dir}", tasks, "kd.cross_tokenizer=bogus"]) == 2
    assert "kd.cross_tokenizer" in capsys.readouterr().err


@pytest_ni
@pytest.mark.slow
def test_uld_to_a_trained_teacher_falls_below_ce_training_alone(tmp_path, gpt2_base, other_tokenizer_lm):
    """From our pretrained tiny GPT-2 (BPE 512) into a random student with another tokenizer (BPE 300): the held-out
    ULD per target token falls over 24 steps, and ends lower than for the same student trained with CE only (α = 0,
    the same batches), so the ULD term, not the CE alone, moves the student towards the teacher's distributions."""
    from recipes.distill import run

    def uld_history(name, alpha):
        result = run(uld_config(tmp_path, gpt2_base, other_tokenizer_lm, name, **{
            "kd.alpha": alpha, "train.max_steps": 24, "train.eval_every": 8, "train.eval_batches": 4,
            "data.max_train_instances_per_task": 48}))
        return history(result.run_dir, "val_uld")

    uld, ce_only = uld_history("uld", 0.5), uld_history("ce_only", 0.0)
    assert len(uld) == 3 and uld[-1] < 0.8 * uld[0], uld  # 0.63 -> 0.41 here
    assert uld[-1] < 0.8 * ce_only[-1], (uld, ce_only)  # 0.41 vs 0.65 here
