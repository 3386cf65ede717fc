"""Generation-based evaluation (tune/evaluation.py, recipes/evaluate.py) and `tune generate`, on a tiny random GPT-2.

The model is a 2-layer GPT2LMHeadModel with random weights over a byte-level BPE vocabulary trained on
Natural-Instructions text; real task files from ../shared/data/natural_instructions are evaluated.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tune.cli import main
from tune.errors import ConfigError

from conftest import NI_TASKS, SHARED_DATA

TASKS = ["task073_commonsenseqa_answer_generation", "task1355_sent_comp_summarization", "task363_sst2_polarity_classification"]
MAX_NEW = 8

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")


def task_file(name: str) -> Path:
    return NI_TASKS / f"{name}.json"


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_lm) -> Path:
    """A freshly initialised LoRA on c_attn with non-zero B (init_lora_weights=False), so it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], init_lora_weights=False, task_type="CAUSAL_LM",
                        fan_in_fan_out=True)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_lm):
    from tune.evaluation import load_model, load_tokenizer

    return load_model(tiny_lm), load_tokenizer(tiny_lm)


def write_eval_config(path: Path, model: Path, output_dir: Path, **extra) -> Path:
    lines = ["recipe: evaluate", f"model: {model}", f"output_dir: {output_dir}",
             *(f"{k}: {v}" for k, v in extra.items()),
             "data:", "  tasks:", *(f"    - {task_file(t)}" for t in TASKS), "  max_instances_per_task: 3",
             "generation:", "  batch_size: 4", f"  max_new_tokens: {MAX_NEW}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_lm):
    """`tune run evaluate` of the base model on 3 tasks x 3 instances: (results JSON, stdout)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("eval_base")
    config = write_eval_config(tmp / "eval.yaml", tiny_lm, tmp / "out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["run", "evaluate", "--config", str(config)]) == 0
    return json.loads((tmp / "out" / "eval_results.json").read_text(encoding="utf-8")), stdout.getvalue()


def test_recipe_writes_per_task_and_overall_results_with_baselines(base_run):
    from data_prep.natural_instructions import load_task
    from tune.metrics import load_metric

    results, stdout = base_run
    assert list(results["tasks"]) == TASKS and results["n_instances"] == 9 and results["n_tasks"] == 3
    keys = {"n", "rougeL", "exact_match", "copy_demo_rougeL", "copy_demo_exact_match", "copy_input_rougeL",
            "copy_input_exact_match"}
    for row in results["tasks"].values():
        assert set(row) == keys and row["n"] == 3
        assert all(0 <= row[k] <= 100 for k in keys - {"n"})
    overall = results["overall"]
    for k in keys - {"n"}:  # 3 instances per task: both means agree
        assert overall["mean_over_instances"][k] == pytest.approx(overall["mean_over_tasks"][k])
        assert overall["mean_over_tasks"][k] == pytest.approx(sum(r[k] for r in results["tasks"].values()) / 3)
    # baselines, recomputed by hand for one task
    task = load_task(task_file(TASKS[1]))
    refs = [inst.outputs for inst in task.instances[:3]]
    demo = load_metric("rouge_l").compute(predictions=[task.positive_examples[0].output] * 3, references=refs)
    copy = load_metric("rouge_l").compute(predictions=[inst.input for inst in task.instances[:3]], references=refs)
    assert results["tasks"][TASKS[1]]["copy_demo_rougeL"] == pytest.approx(demo["rougeL"])
    assert results["tasks"][TASKS[1]]["copy_input_rougeL"] == pytest.approx(copy["rougeL"])
    assert results["tasks"][TASKS[1]]["copy_input_rougeL"] > 0
    assert [p["id"] for p in results["predictions"]] == [i.id for t in TASKS for i in load_task(task_file(t)).instances[:3]]
    assert results["n_prompts_fewer_demos"] > 0  # 256-token context: long prompts lost demonstrations
    for name in (*TASKS, "all: mean over instances (as SNI)", "all: mean over tasks", "copy-demo R-L"):
        assert name in stdout


def test_batched_generation_with_left_padding_matches_one_by_one(loaded):
    from data_prep.natural_instructions import PromptConfig, encode_prompt, load_task
    from tune.evaluation import generate_predictions, prompt_ids

    model, tokenizer = loaded
    prompts = [encode_prompt(load_task(task_file(t)), load_task(task_file(t)).instances[i].input,
                             PromptConfig(num_pos=0)) for t in TASKS for i in range(2)]
    prompts.append("Input: short\nOutput: ")
    assert len({len(prompt_ids(tokenizer, p)) for p in prompts}) > 3  # batches really are padded
    side = tokenizer.padding_side
    one = generate_predictions(model, tokenizer, prompts, batch_size=1, max_new_tokens=MAX_NEW)
    three = generate_predictions(model, tokenizer, prompts, batch_size=3, max_new_tokens=MAX_NEW)
    assert one == three
    assert len(set(one)) > 1 and any(one)
    assert tokenizer.padding_side == side and not model.training
    model.train()
    first_lines = generate_predictions(model, tokenizer, prompts, batch_size=3, max_new_tokens=MAX_NEW,
                                       stop_at_newline=True)
    assert first_lines == [p.split("\n", 1)[0].strip() for p in one]
    assert model.training  # the caller's mode is restored
    model.eval()


def test_generation_fits_prompts_into_a_fixed_context(loaded):
    from tune.evaluation import generate_predictions

    model, tokenizer = loaded
    long_prompt = "word " * 2000 + "Output: "  # far beyond the 256 positions of the model
    assert len(generate_predictions(model, tokenizer, [long_prompt, "x"], batch_size=2, max_new_tokens=MAX_NEW)) == 2
    with pytest.raises(ConfigError, match="max_new_tokens=300 leaves no room"):
        generate_predictions(model, tokenizer, ["x"], max_new_tokens=300)


def test_cli_generate_greedy_equals_generate_predictions(tiny_lm, loaded, capsys):
    from data_prep.natural_instructions import PromptConfig, encode_prompt, load_task
    from tune.evaluation import fit_prompt, generate_predictions

    task = load_task(task_file(TASKS[2]))
    assert main(["generate", "--model", str(tiny_lm), "--task", str(task_file(TASKS[2])), "--instance", "1",
                 "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    model, tokenizer = loaded
    # the default Tk-Instruct encoding (definition + 2 demonstrations), fitted into the 256-token context
    prompt, dropped = fit_prompt(tokenizer, task, task.instances[1].input, PromptConfig(), 256 - MAX_NEW)
    assert prompt.startswith(encode_prompt(task, task.instances[1].input, PromptConfig(), num_pos=0)[:200])
    assert dropped and "demonstrations dropped" in captured.err
    assert out.startswith(prompt)
    generated, _, info = out[len(prompt):].rpartition(f"\n--- {task.name}, instance 1 ")
    assert task.instances[1].id in info and task.instances[1].outputs[0] in info
    expected = generate_predictions(model, tokenizer, [prompt], batch_size=1, max_new_tokens=MAX_NEW)[0]
    assert generated.strip() == expected and expected


def test_cli_generate_samples_reproducibly_from_a_prompt(tiny_lm, capsys):
    args = ["generate", "--model", str(tiny_lm), "--prompt", "Definition: say yes", "--max-new-tokens", "6", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("Definition: say yes")


def test_cli_generate_names_model_for_a_missing_path_or_a_run_directory(tmp_path, tiny_lm, capsys, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_lm, run / "hf")
    (run / "config.yaml").write_text("recipe: pretrain\n")
    lora_run = tmp_path / "runs" / "lora"
    (lora_run / "adapter").mkdir(parents=True)
    (lora_run / "config.yaml").write_text("recipe: finetune\nbase_model: runs/base/hf\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for model, error in (
            ("runs/nonexist", "error: --model runs/nonexist does not exist"),
            ("runs/demo", "error: --model runs/demo is a run directory, not a model; use --model runs/demo/hf"),
            ("runs/lora", "error: --model runs/lora is a run directory with an adapter; use --model runs/base/hf "
                          "--adapter runs/lora/adapter"),
            ("empty", "error: --model empty is not a Hugging Face model directory (no config.json)")):
        assert main(["generate", "--model", model, "--prompt", "x", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(error) and err.count("\n") == 1, err
    assert main(["generate", "--model", "runs/demo/hf", "--prompt", "x", "--max-new-tokens", "2"]) == 0


@pytest.fixture(scope="module")
def ctx16_lm(tmp_path_factory) -> Path:
    """A random GPT-2 with a 16-position table over a character vocabulary (as pretrain exports the demo)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_prep.text import train_char_tokenizer

    out = tmp_path_factory.mktemp("ctx16")
    tokenizer = train_char_tokenizer(["the quick brown fox jumps over the lazy dog.\n"])
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.5, eos_token_id=None, bos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ctx16_rope_lm(tmp_path_factory) -> Path:
    """The Llama layout our `modern` preset exports (RoPE), trained on a 16-token context (max_position_embeddings
    16), as shakespeare_char_cpu's export is on 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_prep.text import train_char_tokenizer

    out = tmp_path_factory.mktemp("ctx16_rope")
    tokenizer = train_char_tokenizer(["the quick brown fox jumps over the lazy dog.\n"])
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, initializer_range=0.5, eos_token_id=None,
                         bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("layout", ["learned positions (GPT-2)", "RoPE (Llama)"])
def test_cli_generate_slides_a_window_past_the_context(layout, ctx16_lm, ctx16_rope_lm, capsys):
    """50 new tokens from a model with a 16-token context, greedy: each token is the argmax of model(ids[-16:]),
    the crop nanoGPT samples with (HF generate() covers the first 16 - prompt tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx16_lm = ctx16_lm if layout.startswith("learned") else ctx16_rope_lm
    prompt = "the lazy dog"
    assert main(["generate", "--model", str(ctx16_lm), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "50"]) == 0
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(ctx16_lm)
    model = AutoModelForCausalLM.from_pretrained(ctx16_lm).eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(50):
            ids.append(int(model(torch.tensor([ids[-16:]])).logits[0, -1].argmax()))
            if ids[-1] == tokenizer.eos_token_id:  # generation stops at eos, as generate() does
                break
    assert len(ids) > 16 + 4  # well past the context: the window slid
    expected = prompt + tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)
    assert out == expected + "\n"
    # the defaults (200 new tokens, sampling) run too, and a prompt longer than the context slides from the start
    assert main(["generate", "--model", str(ctx16_lm), "--prompt", prompt * 3]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt * 3)
    if layout.startswith("learned"):  # this model never samples eos here: all 200 tokens
        assert len(out) == len(prompt * 3) + 200 + 1


def test_cli_generate_names_the_prompt_characters_the_tokenizer_does_not_know(ctx16_lm, capsys):
    assert main(["generate", "--model", str(ctx16_lm), "--prompt", "THE dog", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "note: the tokenizer does not know 3 character(s) of the prompt, read as '<|unk|>': 'T' 'H' 'E'" in err
    assert main(["generate", "--model", str(ctx16_lm), "--prompt", "the dog", "--max-new-tokens", "3"]) == 0
    assert "does not know" not in capsys.readouterr().err


def test_streamer_prints_japanese_whole_characters_only(ni_texts):
    from data_prep.text import train_bpe_tokenizer
    from tune.evaluation import PrintStreamer

    tokenizer = train_bpe_tokenizer(ni_texts, 300)
    text = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # characters are split over several byte tokens
    printed = []
    streamer = PrintStreamer(tokenizer, print_fn=lambda piece, end="", flush=False: printed.append(piece))
    streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt, as generate() sends it first: skipped
    for i in ids:
        streamer.put(torch.tensor([i]))  # one new token per step, as generate() sends it
    streamer.put(torch.tensor([tokenizer.eos_token_id]))
    streamer.end()
    assert "".join(printed) == text == streamer.text
    assert all("\ufffd" not in piece for piece in printed)
    assert len(printed) > 5  # streamed piece by piece, not all at the end


def test_lora_adapter_changes_predictions(tiny_lm, lora_adapter, base_run, tmp_path, capsys):
    from recipes.evaluate import CONFIG_CLASS, run
    from tune.config import load_config

    config = write_eval_config(tmp_path / "eval.yaml", tiny_lm, tmp_path / "out", adapter=lora_adapter)
    results = run(load_config(CONFIG_CLASS, str(config)))
    assert results["adapter"] == str(lora_adapter)
    base_preds = [p["prediction"] for p in base_run[0]["predictions"]]
    assert [p["prediction"] for p in results["predictions"]] != base_preds
    common = ["generate", "--model", str(tiny_lm), "--prompt", "Input: hello\nOutput: ", "--temperature", "0",
              "--max-new-tokens", str(MAX_NEW)]
    capsys.readouterr()
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--adapter", str(lora_adapter)]) == 0
    assert capsys.readouterr().out != plain


def test_exclude_train_of_skips_the_instances_a_finetune_run_trained_on(tmp_path, tiny_lm):
    from data_prep.natural_instructions import load_tasks
    from recipes.evaluate import select_pairs, trained_instances

    run_dir = tmp_path / "lora_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        f"recipe: finetune\nbase_model: {tiny_lm}\ndata:\n  train_tasks: [{task_file(TASKS[0])}]\n"
        "  heldout_instances_per_task: 4\n  max_train_instances_per_task: 50\n", encoding="utf-8")
    trained = trained_instances(run_dir)
    assert len(trained) == 50
    tasks = load_tasks([task_file(TASKS[0])])
    pairs = select_pairs(tasks, 100, trained)
    assert len(pairs) == len(tasks[0].instances) - 50 and not {(t.name, i.id) for t, i in pairs} & trained


def test_builtin_eval_configs_are_listed_and_valid(tiny_lm, lora_adapter, capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "evaluate" in out and "eval_ni " in out and "eval_ni_fewshot" in out
    tasks = f"data.tasks={SHARED_DATA / 'natural_instructions' / 'dev_tasks.txt'}"
    assert main(["validate", "eval_ni", f"model={tiny_lm}", f"adapter={lora_adapter}", "data.exclude_train_of=null",
                 tasks]) == 0
    assert main(["validate", "eval_ni_fewshot", f"model={tiny_lm}", tasks]) == 0


def make_bad_dirs(root: Path, tiny_lm: Path) -> dict:
    from transformers import BertConfig, PreTrainedTokenizerFast

    bert = root / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(bert)
    (bert / "model.safetensors").write_bytes(b"")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_lm / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a sound tokenizer: the model file is what is broken
        shutil.copy(tiny_lm / name, corrupt / name)
    no_adapter = root / "not_an_adapter"
    no_adapter.mkdir()
    (no_adapter / "adapter_model.safetensors").write_bytes(b"")
    no_specials = root / "no_specials"
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(no_specials)
    return {"bert": bert, "corrupt": corrupt, "no_adapter": no_adapter, "no_specials": no_specials}


@pytest.mark.parametrize("override,error", [
    ("model={root}/missing", "error: model={root}/missing does not exist"),
    # (a directory without config.json; not {root} itself, which holds output_dir: refused as an input)
    ("model={root}/not_an_adapter", "error: model={root}/not_an_adapter is not a Hugging Face model directory "
                                    "(no config.json)"),
    ("model={root}/bert", "error: model={root}/bert: architectures ['BertForMaskedLM'] is not a causal language model"),
    ("model={root}/corrupt", "error: model={root}/corrupt: AutoModelForCausalLM cannot load it"),
    ("adapter={root}/not_an_adapter", "error: adapter={root}/not_an_adapter is not a peft adapter directory "
                                      "(no adapter_config.json)"),
    ("adapter={root}/missing", "error: adapter={root}/missing does not exist"),
    ("tokenizer={root}/no_specials", "error: tokenizer={root}/no_specials: the tokenizer has neither a pad nor an eos"),
    ("generation.batch_size=0", "error: generation.batch_size must be >= 1"),
    ("data.tasks={root}/nope.txt", "error: data.tasks: {root}/nope.txt does not exist"),
])
def test_bad_input_is_one_line_error(tmp_path, tiny_lm, override, error, capsys):
    make_bad_dirs(tmp_path, tiny_lm)
    config = write_eval_config(tmp_path / "eval.yaml", tiny_lm, tmp_path / "out")
    assert main(["run", "evaluate", "--config", str(config), override.format(root=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(error.format(root=tmp_path)) and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_tokenizer_without_pad_pads_with_eos(tmp_path, tiny_lm):
    from transformers import AutoTokenizer

    from tune.evaluation import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).pad_token == "<|endoftext|>"


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed results table: first column -> the other cells (split on runs of 2+ spaces)."""
    import re

    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("task "))
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith("wrote ") or line.startswith("note:"):
            break
        if not line.startswith("-"):
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[0]] = cells[1:]
    return rows


def test_table_prints_exact_match_of_the_model_and_both_baselines(base_run):
    results, stdout = base_run
    rows = table_rows(stdout)
    assert rows["task"] == ["n", "ROUGE-L", "EM", "copy-demo R-L", "copy-demo EM", "copy-input R-L", "copy-input EM"]
    keys = ["rougeL", "exact_match", "copy_demo_rougeL", "copy_demo_exact_match", "copy_input_rougeL",
            "copy_input_exact_match"]
    for name in TASKS:
        assert rows[name] == ["3", *(f"{results['tasks'][name][k]:.2f}" for k in keys)]
    # by hand: the first sst2 demonstration answers "POS"; the first 3 instances are POS, NEG, NEG. The other
    # tasks' demonstrations ("B"; a sentence) match none of their instances, and no input equals its output.
    em = {name: rows[name][keys.index("copy_demo_exact_match") + 1] for name in TASKS}
    assert em == {TASKS[0]: "0.00", TASKS[1]: "0.00", TASKS[2]: "33.33"}
    for total in ("all: mean over instances (as SNI)", "all: mean over tasks"):
        assert rows[total][keys.index("copy_demo_exact_match") + 1] == "11.11"
        assert rows[total][keys.index("copy_input_exact_match") + 1] == "0.00"


def test_scored_instances_are_said_and_recorded(base_run, tmp_path, tiny_lm, capsys):
    results, stdout = base_run
    assert results["instances_scored"] == "first-3"
    assert ("scoring the first 3 instances of each task; pass data.exclude_train_of=RUN_DIR to score only instances "
            "a fine-tune did not train on") in stdout
    run_dir = tmp_path / "lora_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        f"recipe: finetune\nbase_model: {tiny_lm}\ndata:\n  train_tasks: [{task_file(TASKS[2])}]\n"
        "  heldout_instances_per_task: 4\n  max_train_instances_per_task: 50\n", encoding="utf-8")
    config = write_eval_config(tmp_path / "eval.yaml", tiny_lm, tmp_path / "out")
    assert main(["run", "evaluate", "--config", str(config), f"data.tasks=[{task_file(TASKS[2])}]",
                 "data.max_instances_per_task=2", f"data.exclude_train_of={run_dir}"]) == 0
    assert "scoring the first" not in capsys.readouterr().out
    held_out = json.loads((tmp_path / "out" / "eval_results.json").read_text(encoding="utf-8"))
    assert held_out["instances_scored"] == f"held-out-of {run_dir}" and held_out["n_instances"] == 2


def test_readme_zero_shot_command_prompts_with_the_definition_only(tiny_lm, tmp_path, capsys):
    from data_prep.natural_instructions import load_task

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    zero_shot = "eval_ni_fewshot model=... prompt.add_definition=true prompt.num_pos=0"
    assert f"tune run evaluate --config {zero_shot}" in readme
    overrides = zero_shot.split()[2:]
    common = ["run", "evaluate", "--config", "eval_ni_fewshot", f"model={tiny_lm}", f"output_dir={tmp_path / 'out'}",
              f"data.tasks=[{task_file(TASKS[2])}]", "data.max_instances_per_task=1", f"generation.max_new_tokens={MAX_NEW}"]
    assert main([*common, *overrides]) == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text(encoding="utf-8"))
    task = load_task(task_file(TASKS[2]))
    assert results["example_prompts"] == {TASKS[2]: f"Definition: {task.definition.strip()}\n\nNow complete the "
                                                    f"following example -\nInput: {task.instances[0].input.strip()}\n"
                                                    "Output: "}
    # the old README line (num_pos=0 alone on this k-shot config) prompted with neither definition nor demonstration
    capsys.readouterr()
    assert main([*common, "prompt.num_pos=0"]) == 2
    assert capsys.readouterr().err.startswith("error: prompt.add_definition=false with prompt.num_pos=0 leaves the "
                                              "prompts with neither the task definition nor a demonstration")


def test_cli_generate_notes_an_adapter_trained_on_another_base(ctx16_lm, tmp_path, capsys):
    """An adapter applied to a base of the same shape but another directory than the one it records: a note
    naming both (the weights may differ); none on its own base."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(ctx16_lm), LoraConfig(r=2, target_modules=["c_attn"])
                   ).save_pretrained(adapter)
    other = tmp_path / "other_base"
    shutil.copytree(ctx16_lm, other)
    args = ["--prompt", "the dog", "--max-new-tokens", "2"]
    assert main(["generate", "--model", str(other), "--adapter", str(adapter), *args]) == 0
    err = capsys.readouterr().err
    assert f"note: adapter={adapter} was trained on {ctx16_lm}, not on model={other}" in err
    assert main(["generate", "--model", str(ctx16_lm), "--adapter", str(adapter), *args]) == 0
    assert "was trained on" not in capsys.readouterr().err
