"""Third-party messages that ask nothing of the user stay out of ordinary runs (tune/hf.py: quiet_third_party),
while our own notes still show. Each command runs in a fresh process: most of these messages fire once per
process (at an import, or as a once-per-location Python warning)."""

import os
import subprocess
import sys

import pytest

from conftest import NI_TASKS, REPO

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason=f"{NI_TASKS} not present (see README: Data)")

# torchrun's OMP_NUM_THREADS banner: test_multiprocess.py (the launcher sets it for its processes)
NOISE = ["pip install kernels", "is_gradient_checkpointing", "Saving the dataset", "FutureWarning"]
TASK = NI_TASKS / "task363_sst2_polarity_classification.json"


def tune(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "tune.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, ni_texts):
    from test_finetune import make_base

    tmp = tmp_path_factory.mktemp("noise")
    base = make_base(tmp / "base", ni_texts, "tiny-gpt2")
    done = tune("run", "finetune", "--config", "lora_ni", f"base_model={base}", f"output_dir={tmp / 'run'}",
                f"data.train_tasks=[{TASK}]", "data.max_train_instances_per_task=8", "data.heldout_instances_per_task=2",
                "data.max_length=256", f"data.cache_dir={tmp / 'cache'}", "lora.r=2", "train.max_steps=2",
                "train.eval_every=0", "train.eval_batches=1", "train.micro_batch_size=2", "train.progress=false",
                "train.gradient_checkpointing=true", "train.resume=true", "eval.enabled=true",
                "eval.max_new_tokens=2", "eval.max_instances_per_task=2", "merge=true")
    return base, tmp / "run", done


def test_lora_finetune_shows_our_notes_and_no_third_party_noise(lora_run):
    _, run_dir, done = lora_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume=true but no checkpoint in" in done.stdout  # ours, actionable: still shown
    for noise in NOISE:
        assert noise not in done.stderr + done.stdout, noise


def test_generate_with_an_adapter_shows_our_note_and_no_third_party_noise(lora_run):
    base, run_dir, _ = lora_run
    done = tune("generate", "--model", str(base), "--adapter", str(run_dir / "adapter"), "--task", str(TASK),
                "--temperature", "0", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: demonstrations dropped to fit the model's context" in done.stderr  # ours: still shown
    for noise in NOISE:
        assert noise not in done.stderr + done.stdout, noise
