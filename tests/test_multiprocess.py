"""Two CPU processes (gloo, started by `tune run --nproc 2` through torch.distributed.run) against one.

With the same global batch (1 process x 2 accumulation steps vs 2 processes x 1), every step trains on
the same examples, so the losses agree. On this machine they were bit-identical (2 ranks: the gloo
all-reduce adds the same two partial gradients a single process accumulates). The tolerance stays at
1e-4 relative because that is not guaranteed in general: with more ranks or NCCL's ring all-reduce the
summation order differs from sequential accumulation, and Adam's division by sqrt(v) carries such
1e-7-relative differences on from step to step. Dropout is off: each rank draws its own dropout masks, so runs with
dropout are equivalent in distribution but not equal.
"""

import pytest

from conftest import NI_TASKS, assert_losses_close, losses, rewind_to_step_4, tune_run

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason="needs ../shared/data (see README: Data)")

NO_DROPOUT = {"pretrain": ["model.dropout=0.0"], "finetune": ["lora.dropout=0.0"], "distill": []}  # native presets have no dropout by default


def run(recipe, recipe_configs, out, nproc, extra=()):
    config, overrides = recipe_configs[recipe]
    accum = "train.grad_accum_steps=2" if nproc == 1 else "train.grad_accum_steps=1"
    done = tune_run(recipe, config, [*overrides, *NO_DROPOUT[recipe], accum, "train.keep_checkpoints=4", *extra],
                    out, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(out)


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "distill"])
def test_two_processes_match_one_with_the_same_global_batch(recipe, recipe_configs, tmp_path):
    one = run(recipe, recipe_configs, tmp_path / "one", 1)
    two = run(recipe, recipe_configs, tmp_path / "two", 2)
    assert len(one[0]) == 8 and len(one[1]) == 3
    assert_losses_close(one[0], two[0])
    assert_losses_close(one[1], two[1])


def test_checkpoints_move_between_one_and_two_processes(recipe_configs, tmp_path):
    two = run("finetune", recipe_configs, tmp_path / "two", 2)
    one = run("finetune", recipe_configs, tmp_path / "one", 1)
    rewind_to_step_4(tmp_path / "two")
    rewind_to_step_4(tmp_path / "one")
    two_then_one = run("finetune", recipe_configs, tmp_path / "two", 1, ["train.resume=true"])
    one_then_two = run("finetune", recipe_configs, tmp_path / "one", 2, ["train.resume=true"])
    assert_losses_close(two_then_one[0], two[0])
    assert_losses_close(one_then_two[0], one[0])
    assert_losses_close(two_then_one[1], one[1])
