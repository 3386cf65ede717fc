"""train.log_with (experiment trackers through accelerate's tracker classes, tune/trackers.py) and the sample
completions written at every evaluation (samples.jsonl and the trackers' text / table APIs)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NI_TASKS, rewind_to_step_4
from test_engine import resume_setup

REPO = Path(__file__).resolve().parents[1]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def scalars_of(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl rows as {name: [(step, value)]}: what every tracker must hold."""
    series: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                series.setdefault(key, []).append((row["step"], value))
    return series


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_texts(run_dir: Path) -> dict[str, list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode())
                                                for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"] if tag.startswith("samples/")}


def assert_same_series(tracker: dict, jsonl: dict):
    """The tracker holds exactly metrics.jsonl's scalars: same names, steps, and values (float32 in TensorBoard)."""
    assert sorted(tracker) == sorted(jsonl)
    for name, series in jsonl.items():
        assert [s for s, _ in tracker[name]] == [s for s, _ in series], name
        for (_, got), (_, want) in zip(tracker[name], series):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-6), name


def last_per_step(series: dict) -> dict:
    """wandb keeps one value per name and step: at an evaluation step, the evaluation row's elapsed_s (logged after
    the training row's)."""
    return {name: sorted(dict(values).items()) for name, values in series.items()}


def fake_samples(model):
    """A samples callable whose prediction depends on the weights, so each evaluation's is its own."""
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    return [{"prompt": "p0", "reference": "r0", "prediction": f"{total:.6f}"},
            {"prompt": "p1 | `x`", "reference": "r1", "prediction": "second"}]


def test_engine_sends_metrics_jsonl_scalars_and_samples_to_tensorboard_and_resume_continues_the_steps(tmp_path):
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=2)
    engine.samples = fake_samples
    engine.fit()
    run = tmp_path / "run"
    full_rows, full_samples = rows_of(run / "metrics.jsonl"), rows_of(run / "samples.jsonl")
    assert_same_series(tensorboard_scalars(run), scalars_of(full_rows))
    assert [s["step"] for s in full_samples] == [2, 2, 4, 4, 6, 6, 8, 8]
    texts = tensorboard_texts(run)
    assert [step for step, _ in texts["samples/0"]] == [2, 4, 6, 8]
    assert all(f"**prediction**: {s['prediction']}" in text for (_, text), s in zip(texts["samples/0"],
                                                                                   full_samples[::2]))
    assert json.loads((run / "trackers.json").read_text()) == {"tensorboard": {}}

    # stopped at step 4, resumed: the tracker continues at step 5 (TensorBoard drops the old 5..8 events), the
    # rows and samples of steps 5..8 move aside, and everything ends equal to the uninterrupted run
    rewind_to_step_4(run)
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=2, resume=True)
    engine.samples = fake_samples
    engine.fit()
    resumed_rows = rows_of(run / "metrics.jsonl")
    loss = lambda rows: [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]
    assert loss(resumed_rows) == loss(full_rows)
    assert_same_series(tensorboard_scalars(run), scalars_of(resumed_rows))
    assert [(s["step"], s["prediction"]) for s in rows_of(run / "samples.jsonl")] == \
        [(s["step"], s["prediction"]) for s in full_samples]
    moved = list(run.glob("samples.jsonl.superseded-*"))
    assert len(moved) == 1 and [s["step"] for s in rows_of(moved[0])] == [6, 6, 8, 8]


def test_samples_change_nothing_of_the_training(tmp_path):
    """A samples callable that draws random numbers (as building a model to generate with does) leaves the run's
    random stream alone: the losses of a model with dropout equal those of a run without samples."""
    import torch

    def drawing_samples(model):
        torch.randn(1000)
        return [{"prompt": "p", "reference": "r", "prediction": "x"}]

    losses = lambda result: [(r["step"], r.get("loss"), r.get("val_loss")) for r in result.history]
    plain = losses(resume_setup(tmp_path, "plain", 6, eval_every=2)[0].fit())
    engine, _ = resume_setup(tmp_path, "samples", 6, eval_every=2)  # seeds the generators as the first did
    engine.samples = drawing_samples
    assert losses(engine.fit()) == plain
    assert len(rows_of(tmp_path / "samples" / "samples.jsonl")) == 3


def test_log_with_empty_writes_metrics_jsonl_alone_and_num_samples_is_checked(tmp_path):
    from tune.errors import ConfigError
    from tune.train_config import TrainConfig

    engine, _ = resume_setup(tmp_path, "run", 2, log_with=[])
    engine.fit()
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()
    with pytest.raises(ConfigError, match=r"train.num_samples must be >= 0"):
        TrainConfig(num_samples=-1)


def test_a_tracker_that_fails_to_start_is_one_line(tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    from tune.errors import TuneError

    def refuse(self):
        raise RuntimeError("no place to write\nsecond line")

    monkeypatch.setattr(TensorBoardTracker, "start", refuse)
    engine, _ = resume_setup(tmp_path, "run", 2)
    with pytest.raises(TuneError, match=r"^train.log_with: tensorboard did not start: no place to write \(its own"):
        engine.fit()


def test_unknown_or_missing_tracker_is_one_line_at_validation_without_torch(tmp_path, model_dir):
    """`tune validate` names the key and what to install, and imports no torch to say so."""
    code = ("import sys; from tune import trackers; from tune.cli import main; "
            "trackers.TRACKERS['aim'] = ('no_such_module_for_aim', 'aim'); "
            f"args = ['validate', 'lora_ni', 'base_model={model_dir}', 'data.train_tasks={model_dir}']; "
            "assert main([*args, 'train.log_with=[tensorboard, wandbx]']) == 2; "
            "assert main([*args, 'train.log_with=[tensorboard, aim]']) == 2; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    unknown, missing = result.stderr.strip().splitlines()
    assert unknown.startswith("error: ") and "train.log_with: unknown tracker 'wandbx'; choose from tensorboard, " \
        "wandb, mlflow" in unknown, unknown
    assert missing.startswith("error: ") and "train.log_with: aim is not installed: pip install aim" in missing


@pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")
def test_finetune_samples_equal_a_greedy_generation_of_the_saved_adapter(tmp_path, gpt2_base):
    """The final step's samples are the held-out prompts (one task after another, prompted as evaluation prompts
    them), their first references, and what the saved adapter generates for them greedily."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recipes.finetune import load_splits, prompt_config, run
    from test_finetune import finetune_config
    from tune.evaluation import evaluate_tasks
    from tune.hf import load_tokenizer

    cfg = finetune_config(tmp_path, gpt2_base, "lora", **{"train.max_steps": 4, "train.eval_every": 2,
                                                          "train.num_samples": 2, "eval.max_new_tokens": 6})
    run(cfg)
    out = tmp_path / "lora"
    assert_same_series(tensorboard_scalars(out), scalars_of(rows_of(out / "metrics.jsonl")))
    samples = rows_of(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2, 4, 4]

    first_per_task = {}
    for task, instance in load_splits(cfg)["heldout_instances"]:
        first_per_task.setdefault(task.name, (task, instance))
    pairs = list(first_per_task.values())[:2]
    tokenizer = load_tokenizer(str(out / "adapter"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), out / "adapter").eval()
    expected = evaluate_tasks(model, tokenizer, pairs, prompt_config(cfg.data), batch_size=cfg.eval.batch_size,
                              max_new_tokens=6)
    assert [s["prompt"] for s in samples[2:]] == [expected["example_prompts"][t.name] for t, _ in pairs]
    assert [s["reference"] for s in samples[2:]] == [i.outputs[0] for _, i in pairs]
    assert [s["prediction"] for s in samples[2:]] == [p["prediction"] for p in expected["predictions"]]


@pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")
def test_distill_samples_of_a_native_student_equal_a_greedy_generation_of_the_saved_student(tmp_path, gpt2_base):
    """A fresh native student generates through an HF copy of its weights during training: its final samples are
    what the saved (exported) student generates greedily, and the samples' prompts are evaluation's."""
    from transformers import AutoModelForCausalLM

    from recipes.distill import run
    from recipes.finetune import load_splits, prompt_config
    from test_distill import distill_config
    from tune.evaluation import evaluate_tasks
    from tune.hf import load_tokenizer

    cfg = distill_config(tmp_path, gpt2_base, "kd", **{"train.max_steps": 4, "train.eval_every": 2,
                                                       "train.num_samples": 2})
    result = run(cfg)
    samples = rows_of(result.run_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    first_per_task = {}
    for task, instance in load_splits(cfg)["heldout_instances"]:
        first_per_task.setdefault(task.name, (task, instance))
    pairs = list(first_per_task.values())[:2]
    student = AutoModelForCausalLM.from_pretrained(result.run_dir / "student").eval()
    expected = evaluate_tasks(student, load_tokenizer(str(gpt2_base)), pairs, prompt_config(cfg.data),
                              batch_size=cfg.compare.batch_size, max_new_tokens=cfg.compare.max_new_tokens)
    assert [s["prompt"] for s in samples[2:]] == [expected["example_prompts"][t.name] for t, _ in pairs]
    assert [s["prediction"] for s in samples[2:]] == [p["prediction"] for p in expected["predictions"]]


def test_wandb_offline_holds_the_same_scalars_and_the_samples_table_and_resume_continues_its_run(tmp_path,
                                                                                               monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=4, log_with=["wandb"])
    engine.samples = fake_samples
    engine.fit()
    run = tmp_path / "run"
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    full = wandb_history(run, run_id)
    assert_same_series(full["scalars"], last_per_step(scalars_of(rows_of(run / "metrics.jsonl"))))
    assert full["tables"] == {4: 2, 8: 2}  # one samples table (of 2 rows) per evaluation

    rewind_to_step_4(run)
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=4, log_with=["wandb"],
                             resume=True)
    engine.samples = fake_samples
    engine.fit()
    assert json.loads((run / "trackers.json").read_text())["wandb"]["id"] == run_id  # the same wandb run
    resumed = wandb_history(run, run_id, last_only=True)
    assert min(step for series in resumed["scalars"].values() for step, _ in series) == 5  # not from 0
    assert_same_series(resumed["scalars"],
                       last_per_step(scalars_of([r for r in rows_of(run / "metrics.jsonl") if r["step"] > 4])))


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file (wandb's LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
    a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes)."""
    import struct

    data, records, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def wandb_history(run_dir: Path, run_id: str, last_only: bool = False) -> dict:
    """The scalars ({name: [(step, value)]}) and samples tables ({step: rows}) of an offline wandb run, read back
    from its run-<id>.wandb file(s) (the last one only: the resumed part)."""
    from wandb.proto import wandb_internal_pb2

    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, list((run_dir / "wandb").iterdir())
    scalars, tables = {}, {}
    for file in files[-1:] if last_only else files:
        for data in wandb_records(file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            for key, value in items.items():
                if key == "samples/nrows":  # a wandb.Table is logged as its shape and a file in files/media
                    tables[step] = value
                elif not key.startswith(("_", "samples/")):
                    scalars.setdefault(key, []).append((step, float("nan") if value in ("NaN", None) else value))
    return {"scalars": scalars, "tables": tables}


def test_mlflow_file_store_holds_the_same_scalars_and_the_samples_table_and_resume_continues_its_run(tmp_path,
                                                                                                   monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store unless told
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=4, log_with="mlflow")
    engine.samples = fake_samples
    engine.run_config = engine.cfg  # a dataclass config: stored as the run's parameters
    engine.fit()
    run = tmp_path / "run"
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    client = mlflow.MlflowClient()

    def history():
        return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                        key=lambda m: (m.step, m.timestamp))]
                for key in client.get_run(run_id).data.metrics}

    full = rows_of(run / "metrics.jsonl")
    assert_same_series(history(), scalars_of(full))
    params = client.get_run(run_id).data.params
    assert params["max_steps"] == "8" and params["log_with"] == "mlflow" and params["betas"] == "[0.9, 0.95]"
    table = json.loads(Path(client.download_artifacts(run_id, "samples.json", str(tmp_path))).read_text())
    assert [row[0] for row in table["data"]] == [4, 4, 8, 8]

    rewind_to_step_4(run)
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=4, log_with="mlflow",
                             resume=True)
    engine.samples = fake_samples
    engine.fit()
    assert json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"] == run_id  # the same MLflow run
    resumed = history()  # steps 5..8 logged twice (MLflow keeps every value), nothing from step 1 again
    assert [s for s, _ in resumed["loss"]] == [1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8]


def test_trackio_local_holds_the_same_scalars_and_resume_continues_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    monkeypatch.setattr("trackio.sqlite_storage.TRACKIO_DIR", tmp_path / "trackio")
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=4, log_with="trackio")
    engine.samples = fake_samples
    engine.fit()
    run = tmp_path / "run"
    name = json.loads((run / "trackers.json").read_text())["trackio"]["name"]

    def history():
        series = {}
        for log in SQLiteStorage.get_logs("gpt-tune", name):
            for key, value in log.items():
                if key not in ("step", "timestamp") and not key.startswith("_") and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((log["step"], value))
        return series

    assert_same_series(history(), scalars_of(rows_of(run / "metrics.jsonl")))
    rewind_to_step_4(run)
    engine, _ = resume_setup(tmp_path, "run", 8, save_every=2, keep_checkpoints=4, eval_every=4, log_with="trackio",
                             resume=True)
    engine.samples = fake_samples
    engine.fit()
    assert json.loads((run / "trackers.json").read_text())["trackio"]["name"] == name  # the same trackio run
    # trackio keeps every value, in the order logged: the resumed part starts at step 5, not at 1
    assert [s for s, _ in history()["loss"]] == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8]
