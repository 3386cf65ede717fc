"""Sequence-level KD (Kim & Rush, 2016): the teacher's decoded outputs, their cache, the training examples built from
them and the distill recipe with seq_kd.enabled."""

import json
import shutil

import pytest
import torch

from conftest import NI_TASKS
from tune.errors import ConfigError
from tune.losses import IGNORE_INDEX

pytest_ni = pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")


@pytest.fixture(scope="module")
def teacher_and_prompts(tiny_lm, ni_texts):
    """The tiny random GPT-2 (fp32, eval) and its tokenizer, and 7 prompts of 3 to 40 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    ids = tokenizer("\n".join(ni_texts[:40]), add_special_tokens=False)["input_ids"]
    prompts = [ids[i * 50:i * 50 + n] for i, n in enumerate([3, 40, 17, 9, 33, 25, 12])]
    return teacher, tokenizer, prompts


def hand_greedy(teacher, prompt, budget, eos):
    """Argmax over the teacher's last logits, one full forward per token (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(budget):
            token = int(teacher(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt):]


def settings(tokenizer, **kw):
    from tune.distill import SequenceSettings

    base = dict(max_new_tokens=8, max_length=256, batch_size=3, eos_ids=(tokenizer.eos_token_id,),
                pad_id=tokenizer.pad_token_id)
    return SequenceSettings(**{**base, **kw})


def test_greedy_outputs_equal_a_hand_argmax_loop_and_fit_max_length(teacher_and_prompts):
    from tune.distill import teacher_outputs

    teacher, tokenizer, prompts = teacher_and_prompts
    eos = tokenizer.eos_token_id
    # max_length 43: the 40-token prompt gets 3 new tokens, the 40 - 33 one 8 (its own batch: budgets differ)
    got = teacher_outputs(teacher, prompts, settings(tokenizer, max_length=43))
    expected = [hand_greedy(teacher, p, min(8, 43 - len(p)), [eos]) for p in prompts]
    assert got == expected
    assert len(got[1]) == 3 and all(len(p) + len(o) <= 43 for p, o in zip(prompts, got))
    assert len({tuple(o) for o in got}) > 3  # the prompts lead to different outputs

    # stopping: a token the teacher emits mid-output acts as a stop id and is replaced by eos_ids[0] (the eos)
    stop = got[0][2]
    stopped = teacher_outputs(teacher, prompts, settings(tokenizer, max_length=43, eos_ids=(eos, stop)))
    for out, full in zip(stopped, expected):
        cut = next((t for t, x in enumerate(full) if x in (eos, stop)), None)
        assert out == (full if cut is None else full[:cut] + [eos])
    assert stopped[0] == got[0][:2] + [eos]

    # the model's own generation defaults (an instruct model's sampling, a repetition penalty) do not apply
    saved = teacher.generation_config
    teacher.generation_config = type(saved)(do_sample=True, temperature=0.7, repetition_penalty=3.0)
    try:
        assert teacher_outputs(teacher, prompts, settings(tokenizer, max_length=43)) == expected
        assert teacher.generation_config.repetition_penalty == 3.0  # restored
    finally:
        teacher.generation_config = saved


def test_a_flex_attention_teacher_decodes_with_sdpa_and_keeps_flex(tmp_path):
    """A teacher loaded for packed flex batches (Llama on CUDA) decodes as its sdpa copy and is flex again after."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tune.distill import SequenceSettings, teacher_outputs

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.3)).save_pretrained(tmp_path)
    flex = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="flex_attention").eval()
    sdpa = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    s = SequenceSettings(max_new_tokens=6, max_length=64, batch_size=3, eos_ids=(2,), pad_id=0)
    prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14, 15]]
    assert teacher_outputs(flex, prompts, s) == teacher_outputs(sdpa, prompts, s)
    assert flex.config._attn_implementation == "flex_attention"


def test_sampling_is_reproducible_by_seed_and_leaves_the_callers_rng_alone(teacher_and_prompts):
    from tune.distill import teacher_outputs

    teacher, tokenizer, prompts = teacher_and_prompts
    state = torch.get_rng_state()
    a = teacher_outputs(teacher, prompts, settings(tokenizer, decoding="sample", temperature=1.5, seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    b = teacher_outputs(teacher, prompts, settings(tokenizer, decoding="sample", temperature=1.5, seed=1))
    c = teacher_outputs(teacher, prompts, settings(tokenizer, decoding="sample", temperature=1.5, seed=2))
    greedy = teacher_outputs(teacher, prompts, settings(tokenizer))
    assert a == b and a != c and a != greedy
    # top_p -> 0 keeps the single most likely token: sampling becomes greedy
    nucleus = teacher_outputs(teacher, prompts, settings(tokenizer, decoding="sample", top_p=1e-6, seed=3))
    assert nucleus == greedy


def test_sampled_outputs_equal_a_hand_multinomial_loop_over_the_whole_distribution(teacher_and_prompts):
    """softmax(logits / T) over every token (no top-k: the model's generation defaults do not apply), one
    torch.multinomial draw per token from the RNG seeded by `seed`; prompts one per batch, longest first."""
    from tune.distill import teacher_outputs

    teacher, tokenizer, prompts = teacher_and_prompts
    got = teacher_outputs(teacher, prompts, settings(tokenizer, decoding="sample", temperature=2.0, seed=5,
                                                     batch_size=1))
    torch.manual_seed(5)
    expected = {}
    with torch.no_grad():
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
            ids = list(prompts[i])
            for _ in range(8):
                probs = torch.softmax(teacher(torch.tensor([ids])).logits[0, -1] / 2.0, -1)
                ids.append(int(torch.multinomial(probs[None], 1)))
                if ids[-1] == tokenizer.eos_token_id:
                    break
            expected[i] = ids[len(prompts[i]):]
    assert got == [expected[i] for i in range(len(prompts))]


def test_the_cache_is_reused_and_invalidated_by_the_teacher_and_the_settings(tmp_path, teacher_and_prompts, tiny_lm):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tune.distill import build_sequence_cache, sequence_cache_key

    teacher, tokenizer, prompts = teacher_and_prompts
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(tiny_lm, teacher_dir)
    cache, s = tmp_path / "seq", settings(tokenizer)
    lines = []
    first = build_sequence_cache(teacher_dir, teacher, prompts, cache, s, log=lines.append)
    entry = cache / f"seq-{sequence_cache_key(teacher_dir, prompts, s)}"
    assert lines[-1].startswith(f"sequence-level KD: wrote {entry}; 7 outputs")
    stored = load_file(str(entry / "outputs.safetensors"))
    assert stored["ids"].tolist() == [t for out in first for t in out]
    assert json.loads((entry / "meta.json").read_text())["outputs"] == 7
    assert build_sequence_cache(teacher_dir, None, prompts, cache, s, log=lines.append) == first
    assert lines[-1].startswith(f"sequence-level KD: reusing {entry}; 7 outputs")

    for changed in (settings(tokenizer, max_new_tokens=4), settings(tokenizer, decoding="sample"),
                    settings(tokenizer, precision="torch.bfloat16/none")):
        with pytest.raises(ConfigError, match="no complete sequence-level KD cache"):
            build_sequence_cache(teacher_dir, None, prompts, cache, changed, log=lines.append)
    with pytest.raises(ConfigError, match="no complete sequence-level KD cache"):  # other prompts
        build_sequence_cache(teacher_dir, None, prompts[:-1], cache, s, log=lines.append)
    other = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1)  # tied to the embeddings: another teacher
    other.save_pretrained(teacher_dir)
    with pytest.raises(ConfigError, match="no complete sequence-level KD cache"):
        build_sequence_cache(teacher_dir, None, prompts, cache, s, log=lines.append)
    rebuilt = build_sequence_cache(teacher_dir, other.eval(), prompts, cache, s, log=lines.append)
    assert "wrote" in lines[-1] and rebuilt != first and len(list(cache.iterdir())) == 2


def test_an_interrupted_write_leaves_no_complete_looking_cache(tmp_path, teacher_and_prompts, tiny_lm, monkeypatch):
    import safetensors.torch

    from tune.distill import build_sequence_cache, sequence_cache_key

    teacher, tokenizer, prompts = teacher_and_prompts
    cache, s = tmp_path / "seq", settings(tokenizer)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        build_sequence_cache(tiny_lm, teacher, prompts, cache, s, log=lambda line: None)
    assert list(cache.iterdir()) == []  # neither the entry nor its temporary sibling
    monkeypatch.undo()
    # a leftover entry without meta.json (written by hand here) is not complete: it is not used, and is replaced
    entry = cache / f"seq-{sequence_cache_key(tiny_lm, prompts, s)}"
    entry.mkdir()
    (entry / "outputs.safetensors").write_bytes(b"partial")
    with pytest.raises(ConfigError, match="no complete sequence-level KD cache"):
        build_sequence_cache(tiny_lm, None, prompts, cache, s, log=lambda line: None)
    outputs = build_sequence_cache(tiny_lm, teacher, prompts, cache, s, log=lambda line: None)
    assert build_sequence_cache(tiny_lm, None, prompts, cache, s, log=lambda line: None) == outputs


@pytest_ni
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_examples_from_outputs_shift_as_the_ni_tokenization_and_keep_gold_doubles(tiny_lm, mask_prompt):
    from transformers import AutoTokenizer

    from data_prep.natural_instructions import PromptConfig, TokenizeConfig, load_task, tokenize_examples
    from tune.distill import SequenceKDExamples, example_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    task = load_task(NI_TASKS / "task363_sst2_polarity_classification.json")
    gold, _ = tokenize_examples([(task, inst) for inst in task.instances[:3]], tokenizer, PromptConfig(),
                                TokenizeConfig(max_length=256, mask_prompt=mask_prompt))
    prompts = example_prompts(gold)
    # the reference output (+ eos) as the "teacher's" output gives back the gold examples exactly
    references = [ex["input_ids"][len(p):] for ex, p in zip(gold, prompts)]
    assert all(r[-1] == tokenizer.eos_token_id for r in references)
    same = SequenceKDExamples(gold, references, mask_prompt=mask_prompt)
    assert [same[i] for i in range(3)] == [{"input_ids": ex["input_ids"], "targets": ex["targets"],
                                            "prompt_len": ex["prompt_len"]} for ex in gold]

    outputs = [[7, 8, tokenizer.eos_token_id], [tokenizer.eos_token_id], [9, 10]]  # the last one ran out of budget
    examples = SequenceKDExamples(gold, outputs, keep_gold=True, mask_prompt=mask_prompt)
    assert len(examples) == 6
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        ids = p + out
        first = len(p) if mask_prompt else 1
        targets = [IGNORE_INDEX] * (first - 1) + ids[first:] + [IGNORE_INDEX]
        assert examples[i] == {"input_ids": ids, "targets": targets, "prompt_len": len(p)}
        assert examples[3 + i] == {"input_ids": gold[i]["input_ids"], "targets": gold[i]["targets"],
                                   "prompt_len": len(p)}
    if mask_prompt:  # an output that is just the eos still gives one target: the eos
        assert [t for t in examples[1]["targets"] if t != IGNORE_INDEX] == [tokenizer.eos_token_id]
    with pytest.raises(IndexError):
        examples[6]


@pytest_ni
def test_distill_with_sequence_level_kd_end_to_end(tmp_path, tiny_lm, capsys):
    """The KD student trains on the teacher's outputs, the CE-only student on the references: its losses equal those
    of a run without seq_kd. A second run reuses the outputs (and caches the teacher's top-k over them)."""
    from test_distill import distill_config, history

    from recipes.distill import run

    common = {"train.max_steps": 3, "train.eval_every": 3, "compare.ce_only": "true",
              "seq_kd.cache_dir": tmp_path / "sq", "seq_kd.max_new_tokens": 6}
    plain = run(distill_config(tmp_path, tiny_lm, "plain", **common))
    seq = run(distill_config(tmp_path, tiny_lm, "seq", **common, **{"seq_kd.enabled": "true"}))
    out = capsys.readouterr().out
    assert "sequence-level KD: wrote" in out and "cut at their length budget" in out
    assert history(seq.run_dir / "ce_only", "loss") == history(plain.run_dir / "ce_only", "loss")
    assert history(seq.run_dir, "loss") != history(plain.run_dir, "loss")
    assert history(seq.run_dir, "val_loss") and (seq.run_dir / "comparison.json").is_file()
    again = run(distill_config(tmp_path, tiny_lm, "again", **{**common, "compare.ce_only": "false",
                                                             "seq_kd.enabled": "true", "seq_kd.keep_gold": "true",
                                                             "teacher.cache": "true", "train.max_steps": 2}))
    assert "sequence-level KD: reusing" in capsys.readouterr().out and again.step == 2


def test_sequence_level_kd_needs_ni_data(tmp_path, tiny_lm, capsys):
    from tune.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    text = ["data.kind=text", f"data.corpus={corpus}", "data.block_size=64", f"teacher.model={tiny_lm}"]
    assert main(["validate", "distill_ni", *text]) == 0
    assert main(["validate", "distill_ni", *text, "seq_kd.enabled=true"]) == 2
    assert capsys.readouterr().err == ("error: seq_kd.enabled=true needs data.kind=ni: the teacher rewrites the "
                                       "outputs of NI prompts and a text corpus has none; set data.kind=ni or "
                                       "seq_kd.enabled=false\n")
    assert main(["validate", "distill_ni", *text, "seq_kd.max_new_tokens=0", "seq_kd.top_p=1.5",
                 "seq_kd.temperature=0", "seq_kd.batch_size=0"]) == 2
    err = capsys.readouterr().err
    for line in ("seq_kd.max_new_tokens must be >= 1, got 0", "seq_kd.top_p must be in (0, 1], got 1.5",
                 "seq_kd.temperature must be > 0, got 0", "seq_kd.batch_size must be >= 1, got 0"):
        assert line in err, err


def test_stop_ids_are_the_tokenizers_eos_then_the_generation_configs(tmp_path, tiny_lm):
    from transformers import AutoTokenizer, GenerationConfig

    from recipes.distill import _eos_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    shutil.copytree(tiny_lm, tmp_path / "t")
    (tmp_path / "t" / "generation_config.json").unlink()
    assert _eos_ids(tmp_path / "t", tokenizer) == (tokenizer.eos_token_id,)
    GenerationConfig(eos_token_id=[7, tokenizer.eos_token_id, 9]).save_pretrained(tmp_path / "t")
    assert _eos_ids(tmp_path / "t", tokenizer) == (tokenizer.eos_token_id, 7, 9)
    (tmp_path / "t" / "generation_config.json").write_text('{"eos_token_id": [0, 7], ')  # cut short
    from tune.errors import DataError

    with pytest.raises(DataError, match="generation_config.json: not a JSON object"):
        _eos_ids(tmp_path / "t", tokenizer)
    (tmp_path / "t" / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(DataError, match="eos_token_id must be a token id"):
        _eos_ids(tmp_path / "t", tokenizer)


def test_padded_embedding_rows_are_never_decoded(teacher_and_prompts):
    """A teacher whose embedding table has rows past the tokenizer (padding) never emits their ids, even when its
    weights make one of them the most likely token."""
    import copy

    from tune.distill import teacher_outputs

    teacher, tokenizer, prompts = teacher_and_prompts
    padded = copy.deepcopy(teacher)
    n = len(tokenizer)
    padded.resize_token_embeddings(n + 8)
    with torch.no_grad():
        padded.get_output_embeddings().weight[n + 3] = 50 * padded.get_output_embeddings().weight[:n].mean(0) + 1
    unguarded = teacher_outputs(padded, prompts, settings(tokenizer))
    assert any(t >= n for o in unguarded for t in o)  # the trap works
    guarded = teacher_outputs(padded, prompts, settings(tokenizer, vocab_size=n))
    assert all(t < n for o in guarded for t in o)
