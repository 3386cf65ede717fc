"""lm-evaluation-harness in `tune run evaluate` (harness.* keys, tune/harness.py), checked against hand computations.

The tasks are lm_eval task YAMLs on local JSON lines files (tests/harness_tasks; no hub): a multiple-choice task
scored by loglikelihood (acc, acc_norm) and a generation task scored by exact match, both 1-shot from their train
split. The model is a random 2-layer GPT-2 whose byte-level BPE tokenizer is trained on those files. The hand
computation scores the same prompts with the model's own forward pass: the choices' summed log-probabilities for
acc / acc_norm / perplexity, greedy decoding cut at the first line break for exact match (the generation task's
targets are made the model's own predictions on half the documents, so its exact match must be exactly 0.5).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tune.cli import main

from conftest import NI_TASKS

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "harness_tasks"
MAX_GEN = 8  # tiny_gen.yaml's max_gen_toks
# lm_eval comes with the test extra; an environment installed without it skips what needs it
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason='lm_eval not installed (pip install -e ".[harness]")')


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """HF dir: random 2-layer GPT-2 (context 128) + byte-level BPE trained on the harness task files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_prep.text import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("harness_lm")
    texts = [json.dumps(r) for name in ("tiny_mc_train", "tiny_mc_test", "tiny_gen_train", "tiny_gen_test")
             for r in rows(name)]
    tokenizer = train_bpe_tokenizer(texts, 300)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.3, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens (fp32, one sequence)."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits[len(ctx) - 1:-1], dim=-1)
    return logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()


def greedy(model, tokenizer, context: str) -> str:
    """Greedy continuation of at most MAX_GEN tokens (stopping at eos), decoded and cut at the first line break."""
    ids = tokenizer(context)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(MAX_GEN):
            token = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]


def mc_context(doc: dict) -> str:
    demo = rows("tiny_mc_train")[0]  # the train split's one document: the 1-shot demonstration
    return (f"Question: {demo['question']}\nAnswer: {demo['choices'][demo['label']]}\n\n"
            f"Question: {doc['question']}\nAnswer:")


def gen_context(doc: dict) -> str:
    demo = rows("tiny_gen_train")[0]
    return f"Write the word in capitals: {demo['word']}\nAnswer: {demo['answer']}\n\nWrite the word in capitals: " \
           f"{doc['word']}\nAnswer:"


def mean_and_stderr(values) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def hand_scores(model, tokenizer) -> dict:
    """1-shot, from the model's loglikelihoods: acc / acc_norm of tiny_mc (each with its standard error), and the
    log-perplexity of tiny_ll."""
    acc, acc_norm = [], []
    for doc in rows("tiny_mc_test"):
        lls = [loglikelihood(model, tokenizer, mc_context(doc), " " + c) for c in doc["choices"]]
        acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]))
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]  # lm_eval: per character of the choice
        acc_norm.append(float(max(range(len(lls)), key=lambda i: normed[i]) == doc["label"]))
    return {"acc": mean_and_stderr(acc), "acc_norm": mean_and_stderr(acc_norm),
            "log_perplexity": log_perplexity(model, tokenizer)}


def log_perplexity(model, tokenizer) -> float:
    """tiny_ll's log-perplexity: minus the mean loglikelihood of tiny_mc's gold answers, 1-shot (a loglikelihood
    task's target follows the prompt without a delimiter)."""
    lls = [loglikelihood(model, tokenizer, mc_context(doc), doc["choices"][doc["label"]])
           for doc in rows("tiny_mc_test")]
    return -sum(lls) / len(lls)


def write_test_tasks(root: Path, model=None, tokenizer=None) -> Path:
    """Tasks built on the shipped YAMLs (`include:`) in `root`: tiny_ll (tiny_mc's gold answers as a loglikelihood
    task, scored by perplexity) and, given a model, tiny_gen_own (tiny_gen whose even documents' targets are the
    model's own greedy predictions and odd ones' differ from them). Datasets are cached under `root`."""
    root.mkdir()
    cache = f"  cache_dir: {root / 'cache'}\n"
    (root / "tiny_ll.yaml").write_text(
        f"include: {TASKS / 'tiny_mc.yaml'}\ntask: tiny_ll\noutput_type: loglikelihood\n"
        "doc_to_target: '{{choices[label]}}'\n"
        f"dataset_kwargs:\n{cache}  data_files:\n    train: {TASKS / 'tiny_mc_train.jsonl'}\n"
        f"    test: {TASKS / 'tiny_mc_test.jsonl'}\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    if model is None:
        return root
    docs = rows("tiny_gen_test")
    for i, doc in enumerate(docs):
        prediction = greedy(model, tokenizer, gen_context(doc))
        doc["answer"] = prediction if i % 2 == 0 else prediction + "x"
    (root / "own.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_gen_own.yaml").write_text(
        f"include: {TASKS / 'tiny_gen.yaml'}\ntask: tiny_gen_own\n"
        "doc_to_target: answer\ntarget_delimiter: ' '\n"  # the raw prediction; the demonstration as in tiny_gen
        f"dataset_kwargs:\n{cache}  data_files:\n    train: {TASKS / 'tiny_gen_train.jsonl'}\n"
        f"    test: {root / 'own.jsonl'}\n")
    return root


def evaluate(lm_dir: Path, out: Path, *overrides) -> dict:
    """`tune run evaluate --config eval_harness` (harness only, 1-shot) in this process; its eval_results.json."""
    args = ["run", "evaluate", "--config", "eval_harness", f"model={lm_dir}", "adapter=null", f"output_dir={out}",
            "harness.batch_size=4", *overrides]
    assert main(args) == 0
    return json.loads((out / "eval_results.json").read_text())


@needs_lm_eval
def test_harness_scores_equal_a_hand_computation(lm, tmp_path, monkeypatch, capsys):
    from tune.hf import load_model, load_tokenizer

    monkeypatch.chdir(REPO)  # the shipped YAMLs name their data files relative to the repository root
    model, tokenizer = load_model(lm, device="cpu"), load_tokenizer(lm)
    own = write_test_tasks(tmp_path / "tasks", model, tokenizer)
    results = evaluate(lm, tmp_path / "out", "harness.tasks=[tiny_mc,tiny_ll,tiny_gen_own]",
                       f"harness.include_path=[tests/harness_tasks,{own}]")
    harness = results["harness"]["tasks"]
    hand = hand_scores(model, tokenizer)
    for metric in ("acc", "acc_norm"):
        assert harness["tiny_mc"]["metrics"][metric] == pytest.approx(hand[metric][0], abs=1e-9)
        assert harness["tiny_mc"]["stderr"][metric] == pytest.approx(hand[metric][1], rel=1e-9)
    assert 0 < hand["acc"][0] < 1  # a random model: some right, some wrong
    assert math.log(harness["tiny_ll"]["metrics"]["perplexity"]) == pytest.approx(hand["log_perplexity"], abs=1e-4)
    assert harness["tiny_gen_own"]["metrics"]["exact_match"] == 0.5  # every prediction equals the hand one
    assert harness["tiny_gen_own"]["stderr"]["exact_match"] == pytest.approx(mean_and_stderr([1, 0] * 5)[1])
    assert {name: (row["n"], row["num_fewshot"]) for name, row in harness.items()} == {
        "tiny_mc": (12, 1), "tiny_ll": (12, 1), "tiny_gen_own": (10, 1)}
    assert results["harness"]["tasks_requested"] == ["tiny_mc", "tiny_ll", "tiny_gen_own"]
    assert set(results) == {"model", "adapter", "quant", "tokenizer", "harness"}  # data.tasks=null: no NI scores
    out = capsys.readouterr().out
    assert "lm-evaluation-harness on 3 task(s): tiny_mc, tiny_ll, tiny_gen_own (1-shot)" in out
    table = [line.split() for line in out.splitlines()]
    assert ["task", "n", "shots", "metric", "value", "stderr"] in table
    assert ["tiny_mc", "12", "1", "acc", f"{hand['acc'][0]:.4f}", f"{hand['acc'][1]:.4f}"] in table
    assert ["acc_norm", f"{hand['acc_norm'][0]:.4f}", f"{hand['acc_norm'][1]:.4f}"] in table
    assert ["tiny_gen_own", "10", "1", "exact_match", "0.5000", "0.1667"] in table


@needs_lm_eval
@pytest.mark.parametrize("kind", ["adapter", "nf4"])
def test_harness_scores_the_model_as_loaded_with_an_adapter_or_quantized(kind, lm, tmp_path, monkeypatch):
    """The harness scores the model evaluate loaded: base + a LoRA adapter (the hand perplexity of that peft model,
    not the base's), or the base quantized to nf4 (the hand perplexity of the quantized model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tune.hf import load_model, load_tokenizer

    monkeypatch.chdir(REPO)
    adapter, quant = None, None
    if kind == "adapter":
        torch.manual_seed(1)
        adapter = tmp_path / "adapter"
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True,
                          task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(lm), lora).save_pretrained(adapter)
    else:
        quant = "nf4"
    tokenizer = load_tokenizer(lm)
    model = load_model(lm, adapter, quant=quant, device="cpu")
    own = write_test_tasks(tmp_path / "tasks")
    results = evaluate(lm, tmp_path / "out", "harness.tasks=[tiny_ll]", f"harness.include_path={own}",
                       f"adapter={adapter}" if adapter else "adapter=null", f"quant={quant}" if quant else "quant=null",
                       "harness.bootstrap_iters=0")
    row = results["harness"]["tasks"]["tiny_ll"]
    assert math.log(row["metrics"]["perplexity"]) == pytest.approx(log_perplexity(model, tokenizer), abs=1e-4)
    assert abs(math.log(row["metrics"]["perplexity"]) - log_perplexity(load_model(lm, device="cpu"), tokenizer)) > 0.1
    assert row["stderr"] == {"perplexity": None}  # bootstrap_iters=0: lm_eval's "N/A"
    assert (results["adapter"], results["quant"]) == (str(adapter) if adapter else None, quant)


@needs_lm_eval
@pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")
def test_harness_results_join_the_natural_instructions_scores(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    task = NI_TASKS / "task363_sst2_polarity_classification.json"
    args = ["run", "evaluate", "--config", "eval_ni", f"model={tiny_lm}", "adapter=null", "data.exclude_train_of=null",
            f"data.tasks=[{task}]", "data.max_instances_per_task=2", "generation.max_new_tokens=4",
            f"output_dir={tmp_path}", "harness.tasks=[tiny_mc]", "harness.include_path=tests/harness_tasks",
            "harness.limit=4"]
    assert main(args) == 0
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["n_instances"] == 2 and "task363_sst2_polarity_classification" in results["tasks"]
    assert results["harness"]["tasks"]["tiny_mc"]["n"] == 4 and results["harness"]["limit"] == 4
    assert results["harness"]["tasks"]["tiny_mc"]["num_fewshot"] == 0  # the task's default


def test_missing_lm_eval_is_a_one_line_error_naming_the_extra(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: find_spec gives None
    assert main(["validate", "eval_ni", f"model={model_dir}", "adapter=null", "data.exclude_train_of=null",
                 "data.tasks=null", "harness.tasks=[tiny_mc]", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err == ('error: harness.tasks needs lm-evaluation-harness, which is not installed: run pip install -e '
                   '".[harness]" (or pip install lm_eval) in this environment\n')


@needs_lm_eval
@pytest.mark.parametrize("overrides,error", [
    (["harness.limit=1.5"], "harness.limit=1.5: give a whole number of documents (e.g. 100) or a fraction below 1"),
    (["harness.limit=0"], "harness.limit must be > 0, got 0"),
    (["harness.num_fewshot=-1"], "harness.num_fewshot must be >= 0, got -1"),
    (["harness.batch_size=0"], "harness.batch_size must be >= 1, got 0"),
    (["harness.include_path=[{root}/nope]"], "harness.include_path: {root}/nope does not exist"),
    (["harness.tasks=[]"], "data.tasks is null and harness.tasks is empty: nothing to evaluate"),
    (["data.exclude_train_of={root}/run"], "data.exclude_train_of applies to the Natural-Instructions tasks, and "
                                       "data.tasks is null"),
])
def test_bad_harness_settings_are_one_line_errors(overrides, error, model_dir, tmp_path, capsys):
    root = str(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("recipe: finetune\n")
    args = ["validate", "eval_ni", f"model={model_dir}", "adapter=null", "data.exclude_train_of=null",
            "data.tasks=null", "harness.tasks=[tiny_mc]", f"output_dir={tmp_path / 'out'}",
            *(o.format(root=root) for o in overrides)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert error.format(root=root) in err and err.count("\n") == 1, err


@needs_lm_eval
def test_a_task_whose_data_file_is_missing_is_a_one_line_error(lm, tmp_path, monkeypatch, capsys):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "broken.yaml").write_text(
        f"include: {TASKS / 'tiny_mc.yaml'}\ntask: broken\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'gone.jsonl'}\n")
    args = ["run", "evaluate", "--config", "eval_ni", f"model={lm}", "adapter=null", "data.exclude_train_of=null",
            "data.tasks=null", f"output_dir={tmp_path / 'out'}", "harness.tasks=[broken]",
            f"harness.include_path={tmp_path / 'tasks'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: harness.tasks=['broken']: cannot load a task's data (Unable to find ")
    assert str(tmp_path / "gone.jsonl") in err and "relative to where you run tune" in err


@needs_lm_eval
def test_unreadable_task_yamls_and_templates_are_one_line_errors_naming_the_file(lm, tmp_path, monkeypatch, capsys):
    """lm_eval skips a task YAML it cannot parse (and *.yml files) without a word, so the task was just "not found";
    a Jinja template that does not render was a traceback after the model loaded. Both are one-line errors now, and
    nothing is written."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: json\n  oops: [\n")
    (tasks / "other.yml").write_text(f"include: {TASKS / 'tiny_mc.yaml'}\ntask: other\n")
    (tasks / "badtpl.yaml").write_text(f"include: {TASKS / 'tiny_mc.yaml'}\ntask: badtpl\n"
                                       "doc_to_text: \"Question: {{question.nope(}}\"\n")
    args = ["run", "evaluate", "--config", "eval_ni", f"model={lm}", "adapter=null", "data.exclude_train_of=null",
            "data.tasks=null", f"output_dir={tmp_path / 'out'}", f"harness.include_path={tasks}"]
    assert main([*args, "harness.tasks=[broken]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: harness.tasks: no task named 'broken', and lm_eval skipped "
                                                   f"task YAML(s) it could not read: {tasks / 'broken.yaml'} "
                                                   "(ScannerError: mapping values are not allowed"), err
    assert f"{tasks / 'other.yml'} (lm_eval reads *.yaml files only: rename it); fix them" in err
    assert main([*args, "harness.tasks=[badtpl]", "harness.limit=0.25"]) == 2
    captured = capsys.readouterr()
    assert "lm-evaluation-harness on 1 task(s): badtpl, the first 25% of each task's documents" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err == ("error: harness.tasks=['badtpl']: a task's Jinja template does not render (line 1): "
                   "TemplateSyntaxError: unexpected '}', expected ')'; fix the doc_to_* templates of its task YAML")
    assert not (tmp_path / "out").exists()
    # tiny_mc's train split (its fewshot_split) holds fewer documents than 5 demonstrations: a ValueError traceback
    monkeypatch.chdir(REPO)  # the shipped YAMLs name their data files relative to the repository root
    assert main([*args, f"harness.include_path={TASKS}", "harness.tasks=[tiny_mc]", "harness.num_fewshot=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: harness.num_fewshot=5: a task of ['tiny_mc'] has fewer documents than that to draw "
                          "demonstrations from"), err
    assert not (tmp_path / "out").exists()


@needs_lm_eval
@pytest.mark.slow  # indexes lm_eval's ~15,000 task YAMLs (5-15 s)
def test_an_unknown_task_name_is_a_one_line_error_with_close_names(lm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = ["run", "evaluate", "--config", "eval_ni", f"model={lm}", "adapter=null", "data.exclude_train_of=null",
            "data.tasks=null", f"output_dir={tmp_path / 'out'}", "harness.tasks=[tiny_mcc,arc_easyy]",
            "harness.include_path=tests/harness_tasks"]
    assert main(args) == 2  # before the model is loaded
    err = capsys.readouterr().err
    assert err.startswith("error: harness.tasks: no task, group or tag named 'tiny_mcc' (did you mean 'tiny_mc', ")
    assert "'arc_easyy' (did you mean 'arc_easy', " in err and err.count("\n") == 1
    assert err.endswith("in lm_eval or in harness.include_path=['tests/harness_tasks']; `lm_eval ls tasks` lists "
                        "lm_eval's, and harness.include_path takes the directory of your own task YAMLs\n"), err
    assert not (tmp_path / "out").exists()


def test_readme_task_example_is_the_shipped_task():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- harness-task -->\n```yaml\n", 1)[1].split("```", 1)[0]
    lines = (TASKS / "tiny_mc.yaml").read_text().splitlines(True)
    shipped = "".join(line for line in lines if not line.startswith("#"))
    assert block == shipped
