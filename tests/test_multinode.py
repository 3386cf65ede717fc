"""Two "nodes" on one machine: two torchrun agents (--nnodes 2, one process each) meeting at a c10d rendezvous on
127.0.0.1, gloo on CPU, against the 2-process single-node run.

Node 0 is started with our launcher (`tune run ... --nnodes 2 --rdzv-endpoint`), node 1 with plain torchrun
(`python -m torch.distributed.run ... -m tune.cli run ...`), the two documented forms, which must agree with
each other. Both write one output_dir: the shared-disk case (what a cluster's shared filesystem gives);
only global rank 0 writes the run's files, every rank its own rng_rank{global rank}.pt. The world is the same
two processes as `--nproc 2`, so losses and weights agree to the tolerance of test_multiprocess.py.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import NI_TASKS, REPO, TRAIN, assert_losses_close, losses, tune_run

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason="needs ../shared/data (see README: Data)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(recipe, config, overrides, out, timeout=600):
    """Start node 0 (`tune run --nnodes 2`) and node 1 (torchrun) as separate processes; wait for both."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = [recipe, "--config", config, *TRAIN, *overrides, f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    node0 = [sys.executable, "-m", "tune.cli", "run", *args, "--nproc", "1", "--nnodes", "2", "--node-rank", "0",
             "--rdzv-endpoint", endpoint, "--rdzv-id", "test"]
    node1 = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--nproc_per_node",
             "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test",
             "-m", "tune.cli", "run", *args]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (node0, node1)]
    try:
        done = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, done):
        assert p.returncode == 0, stderr[-3000:]
    return done


def assert_same_weights(a_file, b_file):
    from safetensors.torch import load_file

    a, b = load_file(a_file), load_file(b_file)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_nodes_of_one_process_match_two_processes_on_one_node(recipe_configs, tmp_path):
    config, overrides = recipe_configs["pretrain"]
    overrides = [*overrides, "model.dropout=0.0", "train.grad_accum_steps=1", "train.keep_checkpoints=4"]
    single = tune_run("pretrain", config, overrides, tmp_path / "one_node", nproc=2)
    assert single.returncode == 0, single.stderr[-3000:]
    (out0, _), (out1, _) = two_nodes("pretrain", config, overrides, tmp_path / "two_nodes")
    assert "threads: 1 intra-op per process" in out0 + out1  # one of them is global rank 0, which prints

    one, two = losses(tmp_path / "one_node"), losses(tmp_path / "two_nodes")
    assert len(two[0]) == 8 and len(two[1]) == 3  # one row per step: only one process writes metrics.jsonl
    assert_losses_close(one[0], two[0])
    assert_losses_close(one[1], two[1])
    final = "checkpoints/step_0000008"
    assert_same_weights(tmp_path / "one_node" / final / "model.safetensors",
                        tmp_path / "two_nodes" / final / "model.safetensors")
    # every global rank saved its own RNG state into the one (shared) checkpoint directory
    assert sorted(p.name for p in (tmp_path / "two_nodes" / final).glob("rng_rank*.pt")) == ["rng_rank0.pt",
                                                                                              "rng_rank1.pt"]


@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "0"], "--nnodes must be >= 1 (machines taking part), got 0"),
    (["--nnodes", "2", "--rdzv-endpoint", "node1"], "--rdzv-endpoint must be HOST:PORT (e.g. node1:29500), got 'node1'"),
    (["--nnodes", "2", "--rdzv-endpoint", "node1:29500", "--node-rank", "2"], "--node-rank must be in [0, --nnodes=2)"),
    (["--nnodes", "2", "--rdzv-endpoint", "node1:70000"], "--rdzv-endpoint port must be in 1..65535 (e.g. node1:29500), "
                                                          "got 'node1:70000'"),
    (["--nnodes", "2", "--rdzv-endpoint", "[::1]:0"], "--rdzv-endpoint port must be in 1..65535"),
])
def test_multinode_flags_are_checked_before_anything_starts(flags, message, capsys):
    from tune.cli import main

    assert main(["run", "pretrain", "--config", "demo", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_the_launcher_passes_multinode_flags_to_torchrun():
    from tune.cli import build_parser, torchrun_command

    args, overrides = build_parser().parse_known_args(["run", "finetune", "--config", "lora_ni", "--nproc", "8",
                                                       "--nnodes", "4", "--rdzv-endpoint", "node1:29500",
                                                       "--rdzv-id", "1234", "train.lr=1e-4"])
    args.overrides += overrides  # as tune.cli.main: overrides may follow the options
    assert torchrun_command(args)[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "4", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node1:29500", "--rdzv-id", "1234", "-m", "tune.cli", "run", "finetune", "--config",
        "lora_ni", "train.lr=1e-4"]


SBATCH = REPO / "recipes" / "slurm" / "finetune_multinode.sbatch"


def test_slurm_example_parses_and_starts_a_real_recipe_with_the_launchers_flags(tmp_path):
    """The sbatch script cannot run here (no SLURM): `bash -n` it, then run it with stand-ins for `scontrol` and
    `srun` (which records the command it would start on every node) and check that command with tune's own
    parser, flag checks and config loading."""
    from tune.cli import build_parser, check_node_args, load_recipe_config, torchrun_command

    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    bin_dir, record = tmp_path / "bin", tmp_path / "srun_args"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-01\\ngpu-node-02\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n")
    for stub in ("scontrol", "srun"):
        (bin_dir / stub).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[01-02]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO)}
    done = subprocess.run(["bash", str(SBATCH), "train.lr=1e-3"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = record.read_text().splitlines()
    assert argv[:3] == ["--kill-on-bad-exit=1", "tune", "run"]
    args, extra = build_parser().parse_known_args(argv[2:])
    args.overrides += extra
    check_node_args(args)
    assert (args.recipe, args.config, args.nproc, args.overrides) == ("finetune", "lora_ni", 8, ["train.lr=1e-3"])
    command = " ".join(torchrun_command(args))
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint gpu-node-01:29500 --rdzv-id 4242" in command
    load_recipe_config(args.config, args.overrides, args.recipe, check=False)  # a built-in config of that recipe


@pytest.mark.slow
def test_nodes_that_do_not_share_output_dir_are_refused_before_training(recipe_configs, tmp_path):
    """Each node with its own disk is simulated by giving node 1 another directory under the same key: the run
    stops on every process before training, in one line naming output_dir and the fix."""
    config, overrides = recipe_configs["pretrain"]
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test", "-m", "tune.cli", "run", "pretrain", "--config",
         config, *TRAIN, *overrides, f"output_dir={tmp_path / f'disk{node}' / 'run'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        done = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode != 0 for p in procs)
    errors = [line for _, stderr in done for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("is not one directory for all processes: process(es) 1 on " in e and
                                    "put output_dir (and data.cache_dir) on a filesystem every node mounts" in e
                                    for e in errors), errors
    assert not any((tmp_path / f"disk{node}" / "run" / "checkpoints").exists() for node in (0, 1))


def test_a_process_that_sees_another_lock_record_is_named():
    from tune.run_lock import unshared_processes

    lock = {"pid": 7, "host": "node1", "since": "2026-11-30 22:00:00 UTC", "command": "tune run"}
    assert unshared_processes([lock, dict(lock), {}, {**lock, "pid": 8}]) == [2, 3]
    assert unshared_processes([lock, dict(lock)]) == []


def test_slurm_example_accelerate_variant_passes_the_overrides(tmp_path):
    """The commented `accelerate launch` variant, run with a stand-in for `accelerate` on one "node": the
    overrides given to sbatch reach tune.cli, as with the srun line."""
    lines = SBATCH.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   export RECIPE"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[4:].replace("srun --kill-on-bad-exit=1 ", ""))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    (bin_dir / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "RECIPE": "finetune", "CONFIG": "lora_ni", "GPUS_PER_NODE": "8", "MASTER_ADDR": "node1",
           "MASTER_PORT": "29500"}
    script = "\n".join(block)
    done = subprocess.run(["bash", "-c", script, "sbatch", "train.lr=1e-3", "data.name=a b"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[argv.index("tune.cli") + 1:] == ["run", "finetune", "--config", "lora_ni", "train.lr=1e-3", "data.name=a b"]
    assert argv[argv.index("--machine_rank") + 1] == "1" and argv[argv.index("--num_processes") + 1] == "16"
