"""data_prep.natural_instructions: task loading and bad input, Tk-Instruct prompts, splits, masking,
truncation and the tokenized-dataset cache."""

import json
from pathlib import Path

import pytest

import data_prep.natural_instructions as ni
from data_prep.natural_instructions import (NISplitConfig, PromptConfig, TokenizeConfig, build_dataset,
                                            encode_prompt, load_task, load_tasks, split_instances, tokenize_examples)
from conftest import NI_TASKS
from data_prep.text import EOS_TOKEN as EOS, train_bpe_tokenizer
from tune.errors import ConfigError, DataError

NI_DIR = NI_TASKS.parent


def make_tokenizer(vocab_size: int):
    """Small byte-level BPE trained on NI definitions, inputs and outputs."""
    texts = []
    for path in sorted((NI_DIR / "tasks").glob("*.json")):
        obj = json.loads(path.read_text(encoding="utf-8"))
        texts += obj["Definition"] + [i["input"] for i in obj["Instances"][:30]] + [i["output"][0] for i in obj["Instances"][:30]]
    return train_bpe_tokenizer(texts, vocab_size)


@pytest.fixture(scope="session")
def ni_dir():
    if not NI_DIR.is_dir():
        pytest.skip(f"{NI_DIR} not present (see README: getting the data)")
    return NI_DIR


@pytest.fixture(scope="session")
def tokenizer(ni_dir):
    return make_tokenizer(500)


@pytest.fixture(scope="session")
def tasks(ni_dir):
    return load_tasks(ni_dir / "tasks")


TINY = {
    "Categories": ["Toy"],
    "Definition": ["Answer with the sum of the two numbers."],
    "Positive Examples": [
        {"input": "1 2", "output": "3", "explanation": "1 plus 2 is 3."},
        {"input": "2 2", "output": "4", "explanation": "2 plus 2 is 4."},
        {"input": "5 5", "output": "10", "explanation": "5 plus 5 is 10."},
    ],
    "Negative Examples": [{"input": "1 1", "output": "11", "explanation": "Do not concatenate."}],
    "Instances": [
        {"id": "toy-0", "input": "3 4", "output": ["7"]},
        {"id": "toy-1", "input": "10 20", "output": ["30", "thirty"]},
    ],
    "Instance License": ["MIT"],
}


def write_task(tmp_path: Path, obj, name="toy_task") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# -- loading -------------------------------------------------------------------------------------
def test_all_dev_tasks_load_with_their_instance_counts(ni_dir, tasks):
    assert len(tasks) == 16
    for task in tasks:
        raw = json.loads(task.path.read_text(encoding="utf-8"))
        assert len(task.instances) == len(raw["Instances"])
        assert [i.id for i in task.instances] == [i["id"] for i in raw["Instances"]]
        assert task.definition == raw["Definition"][0].strip()
        assert len(task.positive_examples) == len(raw["Positive Examples"])
        assert task.metadata["Categories"] == raw["Categories"] and "Instances" not in task.metadata
    assert sum(len(t.instances) for t in tasks) == 1466


def test_split_file_resolves_in_order(ni_dir, tmp_path):
    names = [line.strip() for line in (ni_dir / "dev_tasks.txt").read_text().splitlines() if line.strip()]
    assert [t.name for t in load_tasks(ni_dir / "dev_tasks.txt")] == names
    split = tmp_path / "mine.txt"
    split.write_text(f"# two tasks\n\n{names[3]}\n  {names[0]}.json  # with suffix\n")
    assert [t.name for t in load_tasks(split, tasks_dir=ni_dir / "tasks")] == [names[3], names[0]]
    assert [t.name for t in load_tasks([names[1]], tasks_dir=ni_dir / "tasks")] == [names[1]]
    listed = load_tasks([split, ni_dir / "tasks" / f"{names[5]}.json"], tasks_dir=ni_dir / "tasks")
    assert [t.name for t in listed] == [names[3], names[0], names[5]]


BAD_FILES = {
    "malformed": ('{"Definition": ["x"],\n  "Instances": [}', "line 2"),
    "top_level_list": ("[1, 2]", "top level"),
    "no_definition": ({"Instances": []}, "'Definition'"),
    "no_instances": ({"Definition": ["x"]}, "'Instances'"),
    "definition_type": ({"Definition": 3, "Instances": []}, "'Definition'"),
    "definition_list_type": ({"Definition": [1], "Instances": []}, "'Definition'"),
    "instances_type": ({"Definition": "x", "Instances": {"id": 1}}, "'Instances'"),
    "instance_not_object": ({"Definition": "x", "Instances": ["a"]}, "'Instances'[0]"),
    "instance_input": ({"Definition": "x", "Instances": [{"id": "t-0", "input": 5, "output": ["a"]}]}, "'input'"),
    "output_type": ({"Definition": "x", "Instances": [{"id": "t-0", "input": "a", "output": [1]}]}, "'output'"),
    "output_empty": ({"Definition": "x", "Instances": [{"id": "t-0", "input": "a", "output": ["b"]},
                                                       {"id": "t-1", "input": "a", "output": []}]}, "t-1"),
    "output_blank": ({"Definition": "x", "Instances": [{"id": "t-7", "input": "a", "output": ["", " "]}]}, "t-7"),
    "positive_no_output": ({"Definition": "x", "Positive Examples": [{"input": "a"}], "Instances": []},
                           "'Positive Examples'[0]"),
    "negative_type": ({"Definition": "x", "Negative Examples": {"input": "a"}, "Instances": []}, "'Negative Examples'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_task_file_names_file_and_field(tmp_path, case):
    content, expected = BAD_FILES[case]
    path = tmp_path / f"bad_{case}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_task(path)
    msg = str(e.value)
    assert path.name in msg and expected in msg and "\n" not in msg
    with pytest.raises(DataError):  # the same through load_tasks (a directory)
        load_tasks(tmp_path)


def test_bad_instance_message_names_the_instance_field(tmp_path):
    path = write_task(tmp_path, {"Definition": "x", "Instances": [{"id": "t-1", "input": "a", "output": []}]})
    with pytest.raises(DataError, match=r"'Instances'\[0\] \(id t-1\): 'output'"):
        load_task(path)


def test_not_utf8_and_no_tasks_and_missing_path(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"Definition": ["caf\u00e9"], "Instances": []}'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json: not valid UTF-8"):
        load_task(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no task .json files"):
        load_tasks(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_tasks(tmp_path / "nowhere")


def test_unknown_task_in_split_file_suggests_closest(ni_dir, tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("# dev\ntask073_commonsenseqa_answer_generation\n\ntask087_new_operator_addsub_arithmetc\n")
    with pytest.raises(DataError) as e:
        load_tasks(split, tasks_dir=ni_dir / "tasks")
    msg = str(e.value)
    assert "split.txt line 4" in msg and "'task087_new_operator_addsub_arithmetc'" in msg
    assert "did you mean 'task087_new_operator_addsub_arithmetic'" in msg and "\n" not in msg


def test_duplicate_task_is_an_error(ni_dir, tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("task073_commonsenseqa_answer_generation\ntask073_commonsenseqa_answer_generation\n")
    with pytest.raises(DataError, match="listed twice"):
        load_tasks(split, tasks_dir=ni_dir / "tasks")


def test_nothing_cached_when_loading_fails(tmp_path, tokenizer):
    bad = tmp_path / "tasks"
    bad.mkdir()
    write_task(bad, {"Definition": "x", "Instances": [{"id": "t-0", "input": "a", "output": []}]})
    cache = tmp_path / "cache"
    with pytest.raises(DataError):
        tasks = load_tasks(bad)
        build_dataset(split_instances(tasks, NISplitConfig())["train"], tokenizer, PromptConfig(), TokenizeConfig(), cache)
    assert not cache.exists()


# -- prompts -------------------------------------------------------------------------------------
def test_default_prompt_is_tk_instruct(tmp_path):
    task = load_task(write_task(tmp_path, TINY))
    expected = (
        "Definition: Answer with the sum of the two numbers.\n\n"
        "Positive Example 1 -\nInput: 1 2\nOutput: 3\n\n"
        "Positive Example 2 -\nInput: 2 2\nOutput: 4\n\n"
        "Now complete the following example -\nInput: 3 4\nOutput: "
    )
    assert encode_prompt(task, task.instances[0].input, PromptConfig()) == expected


def test_prompt_variants(tmp_path):
    task = load_task(write_task(tmp_path, TINY))
    cfg = PromptConfig(num_pos=1, num_neg=1, add_explanation=True)
    assert encode_prompt(task, "3 4", cfg) == (
        "Definition: Answer with the sum of the two numbers.\n\n"
        "Positive Example 1 -\nInput: 1 2\nOutput: 3\nExplanation: 1 plus 2 is 3.\n\n"
        "Negative Example 1 -\nInput: 1 1\nOutput: 11\nExplanation: Do not concatenate.\n\n"
        "Now complete the following example -\nInput: 3 4\nOutput: ")
    assert encode_prompt(task, "3 4", PromptConfig(num_pos=0, add_definition=False)) == \
        "Now complete the following example -\nInput: 3 4\nOutput: "
    assert encode_prompt(task, "3 4", PromptConfig(num_pos=9)).count("Positive Example") == 3
    assert encode_prompt(task, "3 4", PromptConfig(), num_pos=0, definition="Add.") == \
        "Definition: Add.\n\nNow complete the following example -\nInput: 3 4\nOutput: "
    custom = PromptConfig(num_pos=1, template="Task: {definition}\n{examples}Q: {input}\nA:")
    assert encode_prompt(task, "3 4", custom) == \
        "Task: Answer with the sum of the two numbers.\nPositive Example 1 -\nInput: 1 2\nOutput: 3\n\nQ: 3 4\nA:"
    for bad in ("{question}", "no input field {definition}", "{input"):
        with pytest.raises(ConfigError, match="prompt.template"):
            PromptConfig(template=bad)


def test_real_task_prompt(tasks):
    task = next(t for t in tasks if t.name.startswith("task073"))
    prompt = encode_prompt(task, task.instances[0].input, PromptConfig())
    assert prompt.startswith("Definition: You are given a question and some answer options")
    assert "Positive Example 2 -\nInput: What island country is ferret popular?" in prompt
    assert "Positive Example 3" not in prompt and "Negative Example" not in prompt
    assert prompt.endswith(f"Input: {task.instances[0].input}\nOutput: ")


# -- masking -------------------------------------------------------------------------------------
def _check_alignment(ex, mask_prompt=True):
    ids, targets, p = ex["input_ids"], ex["targets"], ex["prompt_len"]
    assert len(targets) == len(ids) and targets[-1] == -100
    for t in range(len(ids) - 1):
        if mask_prompt and t < p - 1:
            assert targets[t] == -100
        else:
            assert targets[t] == ids[t + 1]


def test_targets_masked_exactly_on_the_prompt(tasks, tokenizer):
    pairs = [(t, t.instances[0]) for t in tasks]
    examples, report = tokenize_examples(pairs, tokenizer, PromptConfig(), TokenizeConfig(max_length=2048))
    assert report.total == len(examples) == 16 and report.dropped == 0
    for ex, (task, inst) in zip(examples, pairs):
        _check_alignment(ex)
        assert ex["task"] == task.name and ex["id"] == inst.id
        trained = [t for t in ex["targets"] if t != -100]
        assert tokenizer.decode(trained) == inst.outputs[0] + EOS
        assert tokenizer.decode(ex["input_ids"][:ex["prompt_len"]]) == encode_prompt(task, inst.input, PromptConfig())
    unmasked, _ = tokenize_examples(pairs, tokenizer, PromptConfig(), TokenizeConfig(max_length=2048, mask_prompt=False))
    for ex in unmasked:
        _check_alignment(ex, mask_prompt=False)
        assert sum(t != -100 for t in ex["targets"]) == len(ex["input_ids"]) - 1
    no_eos, _ = tokenize_examples(pairs[:1], tokenizer, PromptConfig(), TokenizeConfig(add_eos=False))
    assert tokenizer.decode([t for t in no_eos[0]["targets"] if t != -100]) == pairs[0][1].outputs[0]


def test_train_on_all_outputs(tmp_path, tokenizer):
    task = load_task(write_task(tmp_path, TINY))
    pairs = [(task, i) for i in task.instances]
    first, _ = tokenize_examples(pairs, tokenizer, PromptConfig(), TokenizeConfig())
    every, report = tokenize_examples(pairs, tokenizer, PromptConfig(), TokenizeConfig(train_on="all"))
    assert [e["id"] for e in first] == ["toy-0", "toy-1"]
    assert [e["id"] for e in every] == ["toy-0", "toy-1", "toy-1#1"] and report.total == 3
    assert tokenizer.decode([t for t in every[2]["targets"] if t != -100]) == "thirty" + EOS
    with pytest.raises(ConfigError, match="train_on"):
        TokenizeConfig(train_on="random")


# -- truncation ----------------------------------------------------------------------------------
def _length(tokenizer, task, cfg, output, **kw):
    return len(tokenizer(encode_prompt(task, task.instances[0].input, cfg, **kw))["input_ids"]) + \
        len(tokenizer(output)["input_ids"]) + 1


def test_truncation_drops_demos_then_definition_never_the_target(tmp_path, tokenizer):
    obj = dict(TINY, Definition=["Answer with the sum of the two numbers. " * 8])
    task = load_task(write_task(tmp_path, obj))
    cfg = PromptConfig(num_pos=2, num_neg=1)
    pairs = [(task, task.instances[0])]
    out = "7"
    full = _length(tokenizer, task, cfg, out)
    one_pos = _length(tokenizer, task, cfg, out, num_pos=1, num_neg=0)
    no_demo = _length(tokenizer, task, cfg, out, num_pos=0, num_neg=0)
    bare = _length(tokenizer, task, cfg, out, num_pos=0, num_neg=0, definition="")

    def run(max_length):
        examples, report = tokenize_examples(pairs, tokenizer, cfg, TokenizeConfig(max_length=max_length))
        return (tokenizer.decode(examples[0]["input_ids"]) if examples else None), report

    text, report = run(full)
    assert "Negative Example 1" in text and report.examples_dropped_demos == 0
    text, report = run(full - 1)  # the negative goes first
    assert "Negative Example" not in text and "Positive Example 2" in text and report.examples_dropped_demos == 1
    text, report = run(one_pos)  # then positives, from the last one
    assert "Positive Example 1" in text and "Positive Example 2" not in text
    text, report = run(no_demo)
    assert "Example" not in text and task.definition in text and report.definition_truncated == 0
    text, report = run(no_demo - 5)  # then the definition, from its end
    assert report.definition_truncated == 1 and report.dropped == 0
    assert text.startswith("Definition: Answer with the sum") and task.definition not in text
    assert text.endswith("Input: 3 4\nOutput: 7" + EOS)
    text, report = run(bare)
    assert text == "Now complete the following example -\nInput: 3 4\nOutput: 7" + EOS
    text, report = run(bare - 1)  # instance + target do not fit: dropped and counted
    assert text is None and report.dropped == 1 and report.dropped_ids == ["toy-0"] and report.total == 1
    assert "1 dropped" in str(report) and "toy-0" in str(report) and "\n" not in str(report)


def test_long_target_is_dropped_not_cut(tmp_path, tokenizer):
    obj = dict(TINY, Instances=[{"id": "ok", "input": "1 1", "output": ["2"]},
                                {"id": "long", "input": "1 1", "output": ["two " * 60]}])
    task = load_task(write_task(tmp_path, obj))
    examples, report = tokenize_examples([(task, i) for i in task.instances], tokenizer, PromptConfig(),
                                         TokenizeConfig(max_length=64))
    assert [e["id"] for e in examples] == ["ok"] and report.dropped == 1 and report.dropped_ids == ["long"]


def test_truncation_on_real_tasks_keeps_every_target(tasks, tokenizer):
    pairs = [(t, i) for t in tasks for i in t.instances[:6]]
    examples, report = tokenize_examples(pairs, tokenizer, PromptConfig(num_neg=1), TokenizeConfig(max_length=160))
    assert report.examples_dropped_demos > 0 and report.definition_truncated > 0
    assert len(examples) == report.total - report.dropped
    outputs = {(t.name, i.id): i.outputs[0] for t, i in pairs}
    for ex in examples:
        assert len(ex["input_ids"]) <= 160
        _check_alignment(ex)
        assert tokenizer.decode([t for t in ex["targets"] if t != -100]) == outputs[ex["task"], ex["id"]] + EOS


def test_batched_tokenization_and_dataset_equal_one_by_one(tasks, tokenizer, tmp_path):
    """The batched tokenizer calls (tokenize_examples, and build_dataset through datasets.map in 1 or 2 processes)
    give exactly the examples and report of encoding each example alone, truncated and dropped ones included."""
    from data_prep.natural_instructions import _fit_prompt

    long = load_task(write_task(tmp_path, dict(TINY, Instances=[{"id": "long", "input": "1 1", "output": ["two " * 90]},
                                                                {"id": "ok", "input": "1 2", "output": ["3", "three"]}])))
    pairs = [(t, i) for t in tasks for i in t.instances[:5]] + [(long, i) for i in long.instances]
    prompt_cfg, tok_cfg = PromptConfig(num_neg=1), TokenizeConfig(max_length=160, train_on="all")
    reference, lost, cut, dropped = [], 0, 0, []
    for task, inst in pairs:
        for k, output in enumerate(inst.outputs):
            ex_id = inst.id if k == 0 else f"{inst.id}#{k}"
            target = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            prompt, lost_demos, cut_def = _fit_prompt(task, inst, prompt_cfg, tokenizer, 160 - len(target))
            if prompt is None:
                dropped.append(ex_id)
                continue
            lost, cut = lost + lost_demos, cut + cut_def
            ids = prompt + target
            reference.append({"input_ids": ids, "targets": [-100] * (len(prompt) - 1) + ids[len(prompt):] + [-100],
                              "task": task.name, "id": ex_id, "prompt_len": len(prompt)})
    examples, report = tokenize_examples(pairs, tokenizer, prompt_cfg, tok_cfg, batch_size=7)
    assert examples == reference
    assert (report.total, report.examples_dropped_demos, report.definition_truncated, report.dropped_ids) == \
        (len(reference) + len(dropped), lost, cut, dropped)
    assert lost > 0 and cut > 0 and "long" in dropped
    assert report.tokens == sum(len(ex["input_ids"]) for ex in reference)
    for num_proc in (1, 2):
        dataset, built = build_dataset(pairs, tokenizer, prompt_cfg, tok_cfg, tmp_path / f"cache{num_proc}", num_proc)
        assert list(dataset) == reference and built == report


@pytest.mark.parametrize("split_at", [len("\nInput:"), len("\nInpu")])
def test_prompts_encoded_per_task_part_equal_whole_prompts(tasks, tokenizer, monkeypatch, split_at):
    """The task's part of the prompts encoded once + the instance's part == each prompt encoded whole; a cut that
    splits a token ("Inpu|t", whose "ut" is one token) fails the per-task comparison and those prompts are encoded whole."""
    import data_prep.natural_instructions as ni

    monkeypatch.setattr(ni, "_TASK_PART_END", split_at)
    cfg = PromptConfig(num_neg=1)
    pairs = [(t, i) for t in tasks for i in t.instances[:12]]
    prompts = [encode_prompt(t, i.input, cfg, min(1 + 1, len(t.positive_examples)), num_neg=min(1, len(t.negative_examples)))
               for t, i in pairs]
    whole = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    calls = []
    real_call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, texts, **kw: calls.append(texts) or real_call(self, texts, **kw))
    assert ni._encode_prompts(tokenizer, [t for t, _ in pairs], prompts, cfg) == whole
    if split_at == len("\nInput:"):  # no prompt was encoded whole but one per task (the check)
        assert not any(isinstance(c, str) for c in calls) and len(calls[-1]) == len(tasks)
    else:
        assert sum(isinstance(c, str) for c in calls) == len(pairs)  # every prompt, whole


# -- splits --------------------------------------------------------------------------------------
def test_splits_hold_out_tasks_and_instances(ni_dir, tasks):
    held = ["task073_commonsenseqa_answer_generation", "task1340_msr_text_compression_compression"]
    cfg = NISplitConfig(train_tasks=None, eval_tasks=held, max_train_instances_per_task=20,
                        max_eval_instances_per_task=7, heldout_instances_per_task=3, seed=1)
    splits = split_instances(tasks, cfg)
    train_tasks = {t.name for t, _ in splits["train"]}
    assert len(train_tasks) == 14 and not train_tasks & set(held)
    assert {t.name for t, _ in splits["heldout_tasks"]} == set(held)
    assert not {i.id for _, i in splits["train"]} & {i.id for _, i in splits["heldout_instances"]}
    for name in train_tasks:
        assert sum(t.name == name for t, _ in splits["heldout_instances"]) == 3
        assert sum(t.name == name for t, _ in splits["train"]) == 20
    by_name = {t.name: t for t in tasks}
    for name in held:
        assert [i for t, i in splits["heldout_tasks"] if t.name == name] == by_name[name].instances[:7]
    again = split_instances(tasks, cfg)
    assert [i.id for _, i in again["train"]] == [i.id for _, i in splits["train"]]
    other = split_instances(tasks, NISplitConfig(train_tasks=None, eval_tasks=held, seed=2))
    assert [i.id for _, i in other["train"]] != [i.id for _, i in splits["train"]]
    # train tasks from a split file; unlisted tasks are ignored
    split = ni_dir / "dev_tasks.txt"
    full = split_instances(tasks, NISplitConfig(train_tasks=str(split), eval_tasks=None, heldout_instances_per_task=0))
    assert len(full["train"]) == 1466 and not full["heldout_instances"]


def test_task_in_train_and_eval_is_a_config_error(tasks):
    name = tasks[0].name
    with pytest.raises(ConfigError, match=name):
        split_instances(tasks, NISplitConfig(train_tasks=[name, tasks[1].name], eval_tasks=[name]))
    with pytest.raises(ConfigError, match="not loaded"):
        split_instances(tasks[:2], NISplitConfig(train_tasks=[tasks[3].name], eval_tasks=None))


# -- cache ---------------------------------------------------------------------------------------
def test_build_dataset_caches_and_keys_on_config_and_tokenizer(tasks, tokenizer, tmp_path, monkeypatch):
    pairs = [(t, i) for t in tasks[:4] for i in t.instances[:5]]
    cache = tmp_path / "cache"
    first, report = build_dataset(pairs, tokenizer, PromptConfig(), TokenizeConfig(max_length=600), cache)
    assert len(first) == report.total - report.dropped == 20
    assert first[0]["input_ids"][:3] and set(first.column_names) >= {"input_ids", "targets", "task", "id", "prompt_len"}

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(ni, "tokenize_examples", no_tokenizing)
    second, report2 = build_dataset(pairs, tokenizer, PromptConfig(), TokenizeConfig(max_length=600), cache)
    assert list(second) == list(first) and report2 == report
    assert len([p for p in cache.iterdir()]) == 1 and not any(p.name.startswith(".tmp") for p in cache.iterdir())
    monkeypatch.undo()

    build_dataset(pairs, tokenizer, PromptConfig(), TokenizeConfig(max_length=300), cache)
    assert len(list(cache.iterdir())) == 2
    build_dataset(pairs, make_tokenizer(400), PromptConfig(), TokenizeConfig(max_length=600), cache)
    assert len(list(cache.iterdir())) == 3
    build_dataset(pairs[:-1], tokenizer, PromptConfig(), TokenizeConfig(max_length=600), cache)
    assert len(list(cache.iterdir())) == 4
    empty, rep = build_dataset([], tokenizer, PromptConfig(), TokenizeConfig(), cache)
    assert len(empty) == 0 and rep.total == 0


def test_unknown_token_rate_is_reported_and_kept_in_the_cache(tmp_path):
    """A character tokenizer that knows the prompt template but no digits, on the two TINY instances:
    toy-0 is 56 prompt characters + "7" + eos (unknown: 3, 4, 7); toy-1 is 58 + "30" + eos (unknown: 1, 0, 2, 0,
    3, 0): 9 unknown of 119 tokens."""
    from data_prep.text import train_char_tokenizer

    task = load_task(write_task(tmp_path, TINY))
    tokenizer = train_char_tokenizer(["Now complete the following example -\nInput: \nOutput: "])
    pairs = [(task, inst) for inst in task.instances]
    prompt_cfg, tok_cfg = PromptConfig(num_pos=0, add_definition=False), TokenizeConfig(max_length=128)
    examples, report = tokenize_examples(pairs, tokenizer, prompt_cfg, tok_cfg)
    assert [len(ex["input_ids"]) for ex in examples] == [58, 61]
    assert (report.tokens, report.unknown_tokens) == (119, 9)
    assert str(report).endswith("; 7.56% unknown tokens")
    cache = tmp_path / "cache"
    _, built = build_dataset(pairs, tokenizer, prompt_cfg, tok_cfg, cache)
    _, cached = build_dataset(pairs, tokenizer, prompt_cfg, tok_cfg, cache)
    assert (built.tokens, built.unknown_tokens) == (cached.tokens, cached.unknown_tokens) == (119, 9)
    # a cache entry written before the count existed gets it recomputed from the stored ids
    (entry,) = cache.iterdir()
    stored = json.loads((entry / "report.json").read_text())
    del stored["tokens"], stored["unknown_tokens"]
    (entry / "report.json").write_text(json.dumps(stored))
    _, old = build_dataset(pairs, tokenizer, prompt_cfg, tok_cfg, cache)
    assert (old.tokens, old.unknown_tokens) == (119, 9)
    # a byte-level BPE encodes any character
    _, bpe = tokenize_examples(pairs, train_bpe_tokenizer(["Now complete 1 2 3"], 300), prompt_cfg, tok_cfg)
    assert bpe.unknown_tokens == 0 and str(bpe).endswith("; 0.00% unknown tokens")


def test_finetune_data_summary_warns_about_unknown_tokens(tmp_path):
    import contextlib
    from types import SimpleNamespace

    from data_prep.text import train_char_tokenizer
    from recipes.finetune import NIDataSection, build_ni_datasets
    from tune.hf import unknown_token_warning

    task = load_task(write_task(tmp_path, TINY))
    tokenizer = train_char_tokenizer(["Now complete the following example -\nInput: \nOutput: "])
    tokenizer.name_or_path = "runs/demo/hf"
    d = NIDataSection(max_length=128, cache_dir=str(tmp_path / "cache"))
    d.prompt.num_pos, d.prompt.add_definition = 0, False
    lines = []
    splits = {"train": [(task, inst) for inst in task.instances], "heldout_instances": [], "heldout_tasks": []}
    build_ni_datasets(d, splits, tokenizer, SimpleNamespace(main_process_first=contextlib.nullcontext), lines.append)
    assert lines[0].endswith("7.56% unknown tokens")
    assert lines[1].startswith("warning: 7.6% of the data's tokens are unknown to the tokenizer runs/demo/hf")
    assert "data.tokenizer=bpe" in lines[1]
    assert unknown_token_warning(0.01, "t") is None and unknown_token_warning(0.0101, "t") is not None


def test_dropped_examples_warning_above_a_tenth():
    """805 of 1,180 examples dropped (the demo export's 40-character vocabulary at max_length 128) gets a warning
    naming the count and data.max_length; 10% or fewer does not."""
    from recipes.finetune import dropped_examples_warning

    warning = dropped_examples_warning(805, 1180, 128)
    assert warning.startswith("warning: 805 of 1180 training examples (68%) do not fit data.max_length=128")
    assert dropped_examples_warning(118, 1180, 128) is None and dropped_examples_warning(0, 0, 128) is None
    assert dropped_examples_warning(119, 1180, 128) is not None
