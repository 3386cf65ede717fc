"""`tune export`: any kept checkpoint of a run written as the run's final artifact."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import NI_TASKS, REPO, tune_run

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason="needs ../shared/data (see README: Data)")


def tune_export(*args):
    return subprocess.run([sys.executable, "-m", "tune.cli", "export", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def same_tensors(file_a, file_b):
    from safetensors.torch import load_file

    a, b = load_file(file_a), load_file(file_b)
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_of_the_last_pretrain_checkpoint_is_the_runs_own_export(recipe_configs, tmp_path):
    from transformers import AutoModelForCausalLM

    config, overrides = recipe_configs["pretrain"]
    run = tmp_path / "run"
    done = tune_run("pretrain", config, [*overrides, "export=true"], run)
    assert done.returncode == 0, done.stderr[-2000:]
    last = tune_export(run, "--out", tmp_path / "last")
    assert last.returncode == 0, last.stderr[-2000:]
    assert same_tensors(run / "hf" / "model.safetensors", tmp_path / "last" / "model.safetensors")

    earlier = tune_export(run, "--step", 6)  # default place: RUN/exports/step_0000006
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    out = run / "exports" / "step_0000006"
    assert not same_tensors(run / "hf" / "model.safetensors", out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()

    again = tune_export(run, "--step", 6)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    missing = tune_export(run, "--step", 3)
    assert missing.returncode == 2 and "no complete checkpoint of step 3" in missing.stderr
    assert "step_0000006, step_0000008" in missing.stderr
    assert not list((run / "exports").glob(".tmp-*"))


@pytest.mark.parametrize("recipe, artifact", [("finetune", "adapter/adapter_model.safetensors"),
                                              pytest.param("distill", "student/model.safetensors", marks=pytest.mark.slow)])
def test_export_of_the_last_checkpoint_is_the_runs_artifact(recipe, artifact, recipe_configs, tmp_path):
    """A LoRA adapter (finetune) and a fresh native student (distill)."""
    config, overrides = recipe_configs[recipe]
    run = tmp_path / "run"
    done = tune_run(recipe, config, overrides, run)
    assert done.returncode == 0, done.stderr[-2000:]
    last = tune_export(run, "--out", tmp_path / "export")
    assert last.returncode == 0, last.stderr[-2000:]
    folder, name = artifact.split("/")
    assert same_tensors(run / folder / name, tmp_path / "export" / name)
    if recipe == "finetune":  # the adapter loads onto its base with peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = json.loads((run / folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "export")
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_export_needs_a_run_directory(tmp_path):
    done = tune_export(tmp_path)
    assert done.returncode == 2 and "no config.yaml; give the output_dir of a `tune run`" in done.stderr
