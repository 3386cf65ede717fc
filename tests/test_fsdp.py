"""FSDP2 through Accelerate, on two CPU processes (gloo), with the shipped recipes/accelerate/fsdp.yaml.

Accelerate enables FSDP only on GPU backends, so tests/fsdp_cpu.py switches its state to FSDP on CPU;
the parameters really are sharded DTensors (transformer-based auto-wrap, sharded AdamW state,
meta-device loading on the non-zero rank). With the same global batch as one process (2 x 1 against
1 x 2 accumulation steps), the losses agree to 1e-4 relative, for the reason given in
test_multiprocess.py (on this machine they agree to ~1e-7: the reduce-scatter sums the two ranks'
gradients in another order than a single process accumulates them). Checkpoints hold whole tensors,
so they move between an FSDP run and a single process both ways.
"""

import pytest
import torch

from conftest import NI_TASKS, assert_losses_close, losses, rewind_to_step_4, tune_run

needs_data = pytest.mark.skipif(not NI_TASKS.is_dir(), reason="needs ../shared/data (see README: Data)")

# distill: off-policy (on-policy sampling is refused under FSDP: test_on_policy_distillation_is_refused_under_fsdp)
NO_DROPOUT = {"pretrain": ["model.dropout=0.0"], "finetune": ["lora.dropout=0.0"], "distill": ["kd.lmbda=0"]}


def run(recipe, recipe_configs, out, fsdp, extra=()):
    config, overrides = recipe_configs[recipe]
    accum = "train.grad_accum_steps=1" if fsdp else "train.grad_accum_steps=2"
    done = tune_run(recipe, config, [*overrides, *NO_DROPOUT[recipe], accum, "train.keep_checkpoints=4", *extra],
                    out, fsdp=fsdp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("FSDP: parameters sharded over 2 processes" in done.stdout) == fsdp
    return losses(out)


def assert_same_weights(dir_a, dir_b, name):
    from safetensors.torch import load_file

    a, b = load_file(dir_a / name), load_file(dir_b / name)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key  # whole tensors, not one rank's shard
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@needs_data
def test_fsdp_pretrain_matches_one_process_and_exports_whole_weights(recipe_configs, tmp_path):
    one = run("pretrain", recipe_configs, tmp_path / "one", False, ["export=true"])
    two = run("pretrain", recipe_configs, tmp_path / "fsdp", True, ["export=true"])
    assert len(one[0]) == 8 and len(one[1]) == 3
    assert_losses_close(one[0], two[0])
    assert_losses_close(one[1], two[1])
    assert_same_weights(tmp_path / "one" / "checkpoints" / "step_0000008", tmp_path / "fsdp" / "checkpoints" / "step_0000008",
                        "model.safetensors")
    assert_same_weights(tmp_path / "one" / "hf", tmp_path / "fsdp" / "hf", "model.safetensors")
    assert (tmp_path / "fsdp" / "samples.txt").read_text().strip()


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["finetune", "distill"])
def test_fsdp_matches_one_process(recipe, recipe_configs, tmp_path):
    one = run(recipe, recipe_configs, tmp_path / "one", False)
    two = run(recipe, recipe_configs, tmp_path / "fsdp", True)
    assert_losses_close(one[0], two[0])
    assert_losses_close(one[1], two[1])
    artifact = {"finetune": ("adapter", "adapter_model.safetensors"), "distill": ("student", "model.safetensors")}[recipe]
    assert_same_weights(tmp_path / "one" / artifact[0], tmp_path / "fsdp" / artifact[0], artifact[1])


@pytest.mark.slow  # ~35 s: three FSDP / one-process LoRA runs
@needs_data
def test_lora_checkpoints_move_between_fsdp_and_one_process(recipe_configs, tmp_path):
    fsdp = run("finetune", recipe_configs, tmp_path / "fsdp", True)
    one = run("finetune", recipe_configs, tmp_path / "one", False)
    rewind_to_step_4(tmp_path / "fsdp")
    rewind_to_step_4(tmp_path / "one")
    fsdp_then_one = run("finetune", recipe_configs, tmp_path / "fsdp", False, ["train.resume=true"])
    one_then_fsdp = run("finetune", recipe_configs, tmp_path / "one", True, ["train.resume=true"])
    assert_losses_close(fsdp_then_one[0], fsdp[0])
    assert_losses_close(one_then_fsdp[0], one[0])
    assert_losses_close(fsdp_then_one[1], one[1])
    assert_same_weights(tmp_path / "fsdp" / "adapter", tmp_path / "one" / "adapter", "adapter_model.safetensors")


class _FakeFSDPAccelerator:
    """Just enough of an Accelerator in FSDP mode for the engine's setup checks (no process group)."""

    def __init__(self, fsdp_version):
        from types import SimpleNamespace

        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.FSDP
        self.state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version))
        self.is_main_process = True


@pytest.mark.parametrize("fsdp_version, rebuild, message", [(1, True, "fsdp_version: 2"), (2, False, "use DDP")])
def test_unsupported_fsdp_setups_are_refused_before_training(fsdp_version, rebuild, message, tmp_path):
    from tune.engine import Engine, TrainConfig
    from tune.errors import ConfigError
    from tune.models.gpt import GPT, config_from_preset

    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64))
    engine = Engine(TrainConfig(max_steps=2, progress=False), tmp_path / "run", model, source=None,
                    accelerator=_FakeFSDPAccelerator(fsdp_version), rebuild=(lambda: model) if rebuild else None)
    with pytest.raises(ConfigError, match=message):
        engine.fit()
    assert not (tmp_path / "run" / "checkpoints").exists()



QLORA = ["method=qlora", "qlora.compute_dtype=fp32"]  # CPU: fp32 compute (auto's choice here), said explicitly


@needs_data
@pytest.mark.slow
def test_fsdp_qlora_matches_one_process_with_float_storage_chosen_automatically(recipe_configs, tmp_path):
    """qlora.quant_storage=auto: uint8 on one process, fp32 (the compute dtype) under FSDP2, where the 4-bit
    weights are then sharded like the other parameters (accelerate warns about, and leaves unsharded, 4-bit
    weights in uint8). Same losses as one process (1e-4 relative, as above; equal to ~1e-7 here), positive
    losses and finite grad norms at every step, the same adapter; an explicit uint8 is refused under FSDP."""
    import json

    one = run("finetune", recipe_configs, tmp_path / "one", False, QLORA)
    config, overrides = recipe_configs["finetune"]
    fsdp = [*overrides, "lora.dropout=0.0", "train.grad_accum_steps=1", "train.keep_checkpoints=4", *QLORA]
    done = tune_run("finetune", config, fsdp, tmp_path / "fsdp", fsdp=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP: parameters sharded over 2 processes" in done.stdout and "Params4bit" not in done.stderr
    two = losses(tmp_path / "fsdp")
    assert_losses_close(one[0], two[0])
    assert_losses_close(one[1], two[1])
    rows = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    assert len(norms) == 8 and all(0 < n < float("inf") for n in norms)
    assert all(loss > 0 for _, loss in two[0])
    assert_same_weights(tmp_path / "one" / "adapter", tmp_path / "fsdp" / "adapter", "adapter_model.safetensors")

    refused = tune_run("finetune", config, [*fsdp, "qlora.quant_storage=uint8"], tmp_path / "uint8", fsdp=True)
    assert refused.returncode != 0
    assert ("error: qlora.quant_storage=uint8 cannot be sharded by FSDP (the 4-bit weights must be stored in the "
            "compute dtype, fp32 here); set qlora.quant_storage=auto (or fp32)") in refused.stderr
    assert not (tmp_path / "uint8" / "checkpoints").exists()


@pytest.mark.parametrize("storage, compute, fsdp, expected", [
    ("auto", "fp32", False, torch.uint8), ("auto", "bf16", False, torch.uint8),  # one process: as before
    ("auto", "fp32", True, torch.float32), ("auto", "bf16", True, torch.bfloat16),  # FSDP: the compute dtype
    ("uint8", "fp32", False, torch.uint8), ("bf16", "bf16", True, torch.bfloat16), ("fp16", "fp32", False, torch.float16),
])
def test_quant_storage_auto_is_the_compute_dtype_under_fsdp_only(storage, compute, fsdp, expected):
    from tune.adapters import QuantSection, bnb_config, quant_storage

    quant = QuantSection(compute_dtype=compute, quant_storage=storage)
    assert quant_storage(quant, fsdp) == expected
    assert bnb_config(quant, fsdp).bnb_4bit_quant_storage == expected


@pytest.mark.parametrize("storage, compute", [("uint8", "fp32"), ("uint8", "bf16"), ("bf16", "fp32"), ("fp32", "bf16")])
def test_a_quant_storage_fsdp_cannot_shard_is_refused_naming_the_key_and_fix(storage, compute):
    from tune.adapters import QuantSection, quant_storage
    from tune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        quant_storage(QuantSection(compute_dtype=compute, quant_storage=storage), fsdp=True)
    assert str(e.value) == (f"qlora.quant_storage={storage} cannot be sharded by FSDP (the 4-bit weights must be stored "
                            f"in the compute dtype, {compute} here); set qlora.quant_storage=auto (or {compute})")


def test_fsdp_is_detected_from_accelerates_state_or_the_launchers_environment(monkeypatch):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from tune.adapters import fsdp_active

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # no Accelerator yet: `accelerate launch`'s variable
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_active()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_active()
    for kind, expected in [(DistributedType.FSDP, True), (DistributedType.MULTI_GPU, False)]:  # the state decides
        monkeypatch.setattr(AcceleratorState, "_shared_state", {"distributed_type": kind})
        assert fsdp_active() == expected


@needs_data
@pytest.mark.slow
def test_the_gpu_qlora_fsdp_check_runs_end_to_end_on_cpu(tmp_path):
    """bench/qlora_fsdp_check.py --smoke (what the GPU check runs, on 2 CPU processes): it passes, with the
    FSDP losses equal to one process's and the Linear4bit probe exact for bf16 and fp32 storage."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "-m", "bench.qlora_fsdp_check", "--out", str(tmp_path), "--smoke",
                           "--ni-tasks", str(NI_TASKS)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "qlora_fsdp_check.json").read_text())
    assert result["ok"] and all(result["recipe"]["checks"].values())
    assert result["recipe"]["max_rel_loss_diff"] <= 1e-4
    assert [(p["storage"], p["exact"]) for p in result["probe"]] == [("bf16", True), ("fp32", True)]


@needs_data
@pytest.mark.slow
def test_on_policy_distillation_is_refused_under_fsdp(recipe_configs, tmp_path):
    config, overrides = recipe_configs["distill"]  # kd.lmbda=0.5
    done = tune_run("distill", config, overrides, tmp_path / "run", fsdp=True)
    assert done.returncode != 0  # each process exits 2; torch.distributed.run reports 1
    assert "error: on-policy distillation (kd.lmbda > 0 or compare.methods=[on_policy]) does not run under FSDP" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before the output directory is made
