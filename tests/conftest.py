import json
import subprocess
import sys
from pathlib import Path
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NI_TASKS = SHARED_DATA / "natural_instructions" / "tasks"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (see README: getting the data)")
    return SHARED_DATA


@pytest.fixture
def shakespeare_slice(shared_data, tmp_path) -> Path:
    """The first 200 kB of Tiny Shakespeare as its own corpus file."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    path = tmp_path / "shakespeare_slice.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ni_texts():
    texts = []
    for path in sorted(NI_TASKS.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        texts.append(data["Definition"][0])
        texts += [s for ex in data["Positive Examples"] for s in (ex["input"], ex["output"])]
        texts += [s for inst in data["Instances"][:20] for s in (inst["input"], *inst["output"])]
    return texts


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, ni_texts) -> Path:
    """HF dir: random 2-layer GPT-2 (context 256, so long prompts must be fitted) + byte-level BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_prep.text import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = train_bpe_tokenizer(ni_texts, 512)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.3,  # large enough that greedy continuations vary with the prompt
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory, ni_texts) -> Path:
    """A tiny GPT-2 pretrained by our pretrain recipe on NI text (BPE 512, ctx 256), as its HF export."""
    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    tmp = tmp_path_factory.mktemp("gpt2_base")
    corpus = tmp / "ni.txt"
    corpus.write_text("\n\n".join(ni_texts), encoding="utf-8")
    cfg = load_config(PretrainConfig, data={
        "output_dir": str(tmp / "run"), "model": {"preset": "tiny-gpt2", "block_size": 256},
        "data": {"corpus": str(corpus), "tokenizer": "bpe", "vocab_size": 512, "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": 120, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 10, "eval_every": 0,
                  "eval_batches": 2, "progress": False, "log_every": 20},
        "sample": {"max_new_tokens": 8}})
    run(cfg)
    return tmp / "run" / "hf"


# -- tiny subprocess runs of every recipe (crash/resume and multi-process tests) -----------------------
TRAIN = ["train.max_steps=8", "train.save_every=2", "train.eval_every=3", "train.eval_batches=2", "train.log_every=1",
         "train.progress=false", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.warmup_steps=2"]


@pytest.fixture(scope="session")
def recipe_configs(tmp_path_factory, gpt2_base) -> dict[str, tuple[str, list[str]]]:
    """recipe -> (config name, overrides): tiny runs of each recipe on real data."""
    tmp = tmp_path_factory.mktemp("crash_data")
    corpus = tmp / "shakespeare.txt"
    corpus.write_text((SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000])
    ni = [f"data.train_tasks=[{NI_TASKS / 'task363_sst2_polarity_classification.json'}]",
          "data.max_train_instances_per_task=24", "data.heldout_instances_per_task=4", "data.max_length=256",
          f"data.cache_dir={tmp / 'ni_cache'}"]
    return {
        "pretrain": ("demo", [f"data.corpus={corpus}", "data.tokenizer=char", f"data.cache_dir={tmp / 'text_cache'}",
                              "model.preset=tiny-gpt2", "model.block_size=32", "sample.max_new_tokens=4",
                              "export=false"]),
        # short sample completions at each evaluation (eval.max_new_tokens, compare.max_new_tokens: only their length)
        "finetune": ("lora_ni", [f"base_model={gpt2_base}", "lora.r=4", "eval.enabled=false", "eval.max_new_tokens=8",
                                 *ni]),
        # on-policy GKD on half the steps (kd.lmbda): resume, multi-process and FSDP tests cover both kinds of step
        "distill": ("distill_ni", [f"teacher.model={gpt2_base}", "student.n_layer=1", "student.n_embd=32",
                                   "student.n_head=2", "compare.ce_only=false", "kd.lmbda=0.5", "kd.max_new_tokens=6",
                                   "compare.max_new_tokens=8",
                                   *ni]),
        "classify": ("classify_ni", [f"base_model={gpt2_base}", f"data.ni_task={NI_TASKS / 'task363_sst2_polarity_classification.json'}",
                                     "epochs=null", "warmup_ratio=null", "eval.generation_baseline=false",
                                     "data.heldout_instances=8", "data.max_instances=24", "data.max_length=128"]),
    }


def tune_run(recipe, config, overrides, output_dir, kill_at=None, nproc=1, fsdp=False):
    """`tune run` in a subprocess (one torch thread per process), with the tiny TRAIN settings.
    fsdp=True: 2 processes under Accelerate's FSDP2 with recipes/accelerate/fsdp.yaml (tests/fsdp_cpu.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TUNE_KILL_AT", None)
    if kill_at:
        env["TUNE_KILL_AT"] = kill_at
    args = ["run", recipe, "--config", config, *TRAIN, *overrides, f"output_dir={output_dir}"]
    if fsdp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "tests" / "fsdp_cpu.py")]
    else:
        command = [sys.executable, "-m", "tune.cli"]
        args += ["--nproc", str(nproc)]
    return subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> tuple[list, list]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"]) for r in rows if "loss" in r],
            [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r])


def assert_losses_close(a, b, rel=1e-4):
    """Same steps, and values equal to `rel` (see test_multiprocess.py for why 1e-4 across process counts)."""
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=rel)


def rewind_to_step_4(run_dir: Path):
    """Make the step-4 checkpoint of an 8-step run (saved every 2) the latest, as if the run had stopped there."""
    import shutil

    checkpoints = run_dir / "checkpoints"
    for later in ("step_0000006", "step_0000008"):
        shutil.rmtree(checkpoints / later)
    (checkpoints / "latest").write_text("step_0000004")


def dequantized_base(base_path, quantized):
    """The fp32 base whose quantized layers hold exactly the dequantized 4-bit weights of `quantized`."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from tune.adapters import dequantized_weights

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    modules = dict(model.named_modules())
    for name, weight in dequantized_weights(quantized).items():
        modules[name].weight.data = (weight.t() if isinstance(modules[name], Conv1D) else weight).contiguous()
    return model.eval()


@pytest.fixture
def model_dir(tmp_path):
    """A directory `tune validate` accepts as a GPT-2 model (config.json is read as JSON; weights are not read)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": 1024}')
    (model / "model.safetensors").write_bytes(b"")
    return model


class ListSource:
    """Fixed micro-batches per step, for exact comparisons."""

    def __init__(self, steps):
        self.steps = steps

    def step_batches(self, step, rank, world):
        return self.steps[step - 1]

    def val_batches(self, rank, world, limit):
        return self.steps[0][:limit]
