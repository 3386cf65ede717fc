"""The quick start's built-in data (data_prep/demo.py): the corpus covers every character the built-in tasks' prompts
use, the tasks are well-formed NI tasks, and data.train_tasks=builtin:demo reaches the finetune and distill recipes."""

import json

import pytest

from data_prep.demo import DEMO_TASKS, demo_tasks, demo_text, write_demo_tasks
from data_prep.natural_instructions import PromptConfig, encode_prompt, load_tasks
from tune.config import load_config


def test_demo_corpus_has_every_character_of_the_demo_tasks_prompts(tmp_path):
    """The demo model's char tokenizer is built from the corpus: a character missing there would be <|unk|>."""
    chars = set(demo_text())
    for task in load_tasks(write_demo_tasks(tmp_path)):
        for num_pos in (0, 1):  # as the corpus has them (the configs use 0)
            for inst in task.instances:
                text = encode_prompt(task, inst.input, PromptConfig(num_pos=num_pos)) + inst.outputs[0]
                assert set(text) <= chars, (task.name, set(text) - chars)
    assert "Definition: " in demo_text() and "Now complete the following example -\nInput: " in demo_text()


def test_demo_tasks_are_deterministic_distinct_and_balanced():
    tasks = demo_tasks()
    assert tasks == demo_tasks() and list(tasks) == [name for name, _, _ in DEMO_TASKS]
    for name, task in tasks.items():
        inputs = [inst["input"] for inst in task["Instances"]]
        assert len(inputs) == 300 and len(set(inputs)) == 300, name  # no instance twice (held out means unseen)
        assert len(task["Positive Examples"]) == 2 and task["Definition"][0].strip()
        assert not {ex["input"] for ex in task["Positive Examples"]} & set(inputs), name
        for inst in task["Instances"]:
            answer = inst["output"][0]
            assert answer in ("yes", "no") if name == "demo_question" else answer in inst["input"], (name, inst)
    answers = [inst["output"][0] for inst in tasks["demo_question"]["Instances"]]
    assert answers.count("yes") == answers.count("no") == 150
    assert tasks["demo_question"]["Instances"][0] == {
        "id": "demo_question-0", "input": "does a tired horse see a wooden boat? yes, a tired horse feeds it by the sea.",
        "output": ["yes"]}
    assert tasks["demo_where"]["Instances"][1]["output"] == ["by the sea"]


def test_write_demo_tasks_rewrites_and_removes_stale_task_files(tmp_path):
    out = tmp_path / "demo_tasks"
    out.mkdir()
    (out / "demo_old.json").write_text("{}")
    (out / "demo_who.json").write_text("{}")
    assert write_demo_tasks(out) == out
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(name for name, _, _ in DEMO_TASKS)
    assert json.loads((out / "demo_who.json").read_text()) == demo_tasks()["demo_who"]
    assert [t.name for t in load_tasks(out)] == sorted(name for name, _, _ in DEMO_TASKS)


def test_builtin_demo_train_tasks_reach_finetune_and_distill(tmp_path, capsys):
    from recipes.distill import DistillConfig
    from recipes.finetune import FinetuneConfig, load_splits

    for config_class, name, n_train in ((FinetuneConfig, "demo_lora", 800), (DistillConfig, "demo_distill", 80)):
        cfg = load_config(config_class, name, [f"data.cache_dir={tmp_path / 'cache'}"])
        assert cfg.data.train_tasks == "builtin:demo"
        splits = load_splits(cfg)
        assert {t.name for t, _ in splits["heldout_instances"]} == {name for name, _, _ in DEMO_TASKS}
        assert len(splits["heldout_instances"]) == 80 and len(splits["train"]) == n_train
        train_ids = {(t.name, i.id) for t, i in splits["train"]}
        assert not train_ids & {(t.name, i.id) for t, i in splits["heldout_instances"]}
        assert (tmp_path / "cache" / "builtin" / "demo_tasks" / "demo_who.json").is_file()
    # builtin:demo is no path: validate does not call it missing (the base model is what is missing here)
    from recipes.finetune import validate
    from tune.errors import ConfigError

    cfg = load_config(FinetuneConfig, "demo_lora", [f"base_model={tmp_path / 'none'}",
                                                    f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert "base_model" in str(error.value) and "builtin:demo" not in str(error.value)
