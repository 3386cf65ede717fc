"""QLoRA under FSDP2, checked where it matters (the GPU) and in CI (--smoke: CPU, gloo).

    python -m bench.qlora_fsdp_check --out DIR --base-model HF_DIR --ni-tasks DIR [--smoke]

Two checks; `check(out, ni_tasks, smoke)` runs both and returns {"ok", "detail", ...} as bench/gpu_check.py's
CHECKS do (the JSON result also goes to DIR/qlora_fsdp_check.json):

1. `probe_linear4bit_under_fully_shard(device, storage)`: one bitsandbytes Linear4bit with its 4-bit weights
   stored in `storage`, its output before and after FSDP2's `fully_shard` (1 process, MixedPrecisionPolicy in
   that dtype), compared exactly. bitsandbytes#1945 reports FSDP2 rewriting the ~0.1% of packed codes that read
   as bf16 NaNs, which changes the output: the probe counts those codes and reports the largest difference.
2. `qlora_fsdp_check(...)`: the finetune recipe (qlora, qlora.quant_storage=auto) on one process against
   FSDP2 with recipes/accelerate/fsdp.yaml (on GPUs `accelerate launch`, one process per GPU; with --smoke 2
   CPU processes through tests/fsdp_cpu.py), the same global batch: losses within `rel` (1e-4 on CPU fp32;
   2e-2 on a GPU, where FSDP computes in bf16 parameters and one process under bf16 autocast), every loss
   above 0 and every grad norm finite (the symptoms of broken 4-bit storage: loss 0, grad norm NaN).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def probe_linear4bit_under_fully_shard(device: str, storage: str = "bf16", features: int = 512) -> dict:
    """Output of one Linear4bit (nf4, `storage` packing, compute in the same dtype) before and after fully_shard,
    in a 1-process group (nccl on CUDA, gloo on CPU; created here when none exists). Returns a dict:
    nan_codes (packed storage elements that are NaN in `storage`), max_abs_diff, exact (bool)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import bitsandbytes as bnb

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[storage]
    if not dist.is_initialized():  # under torchrun: its world (then every rank holds a shard), else 1 process
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(features, features, bias=False, compute_dtype=dtype, quant_type="nf4",
                              quant_storage=dtype)
    layer.weight = bnb.nn.Params4bit(torch.randn(features, features) * 0.05, requires_grad=False,
                                     quant_type="nf4", quant_storage=dtype, module=layer)
    if hasattr(layer, "support_avx512bf16_for_cpu"):  # the training kernel, as tune.adapters.keep_4bit_training_kernel
        layer.support_avx512bf16_for_cpu = False
    layer = layer.to(device)  # quantizes
    x = torch.randn(4, features, device=device, dtype=dtype)
    with torch.no_grad():
        before = layer(x).float()
    nan_codes = int(torch.isnan(layer.weight.data.view(dtype)).sum())
    container = torch.nn.Sequential(layer)
    fully_shard(container, mp_policy=MixedPrecisionPolicy(param_dtype=dtype))
    with torch.no_grad():
        after = container(x).float()
    diff = float((after - before).abs().max())
    return {"device": device, "storage": storage, "processes": dist.get_world_size(), "nan_codes": nan_codes,
            "max_abs_diff": diff, "exact": bool(torch.equal(after, before))}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TASK = "task363_sst2_polarity_classification.json"


def tiny_base(out: Path, ni_tasks: Path) -> Path:
    """A random 2-layer GPT-2 (64 wide, context 256, no dropout) with a 512-entry BPE tokenizer trained on one NI
    task, saved to `out`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_prep.natural_instructions import load_task
    from data_prep.text import train_bpe_tokenizer
    from tune.hf import quiet_third_party

    task = load_task(ni_tasks / TASK)
    texts = [task.definition, *[s for inst in task.instances[:200] for s in (inst.input, *inst.outputs)]]
    tokenizer = train_bpe_tokenizer(texts, 512)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # each rank would draw its own masks
    with quiet_third_party():  # no progress bars
        GPT2LMHeadModel(config).save_pretrained(out)
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def qlora_fsdp_check(out: Path, ni_tasks: Path, smoke: bool = False, nproc: int | None = None,
                     steps: int = 8, timeout: float = 600) -> dict:
    """QLoRA fine-tuning (qlora_ni, quant_storage=auto) on one process against FSDP2 on `nproc` processes (GPUs:
    all visible, via `accelerate launch --config_file recipes/accelerate/fsdp.yaml`; smoke: 2 CPU processes via
    tests/fsdp_cpu.py), the same global batch, `steps` steps of a tiny random GPT-2 on one NI task.
    Returns a dict with `ok`, the per-step losses and grad norms of both runs, the largest relative loss
    difference and the tolerance used; raises RuntimeError with the run's stderr tail when a run fails."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not smoke
    nproc = nproc or (torch.cuda.device_count() if gpu else 2)
    rel = 2e-2 if gpu else 1e-4
    base = tiny_base(out / "base", ni_tasks)
    common = [f"base_model={base}", f"data.train_tasks=[{ni_tasks / TASK}]", "data.max_train_instances_per_task=64",
              "data.heldout_instances_per_task=4", "data.max_length=256", f"data.cache_dir={out / 'cache'}",
              "lora.r=4", "lora.dropout=0.0", "eval.enabled=false", f"train.max_steps={steps}", "train.log_every=1",
              "train.eval_every=4", "train.eval_batches=2", "train.progress=false", "train.micro_batch_size=4",
              "train.warmup_steps=2", "train.save_every=0", "overwrite=true"]
    if not gpu:
        common.append("qlora.compute_dtype=fp32")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    tune = ["run", "finetune", "--config", "qlora_ni", *common]
    one = [sys.executable, "-m", "tune.cli", *tune, f"train.grad_accum_steps={nproc}", f"output_dir={out / 'one'}"]
    if gpu:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", str(nproc), "-m", "tune.cli"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    str(REPO / "tests" / "fsdp_cpu.py")]
    sharded = [*launcher, *tune, "train.grad_accum_steps=1", f"output_dir={out / 'fsdp'}"]
    runs = {}
    for name, command in (("one", one), ("fsdp", sharded)):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"qlora_fsdp_check: the {name} run failed ({' '.join(command[:6])} ...):\n"
                               + done.stderr[-3000:])
        runs[name] = done
    rows = {name: _metrics(out / name) for name in runs}
    losses = {name: [r["loss"] for r in rows[name] if "loss" in r] for name in rows}
    norms = {name: [r["grad_norm"] for r in rows[name] if "grad_norm" in r] for name in rows}
    val = {name: [r["val_loss"] for r in rows[name] if "val_loss" in r] for name in rows}
    pairs = list(zip(losses["one"] + val["one"], losses["fsdp"] + val["fsdp"]))
    worst = max((abs(a - b) / abs(a) for a, b in pairs), default=math.inf)
    checks = {
        "fsdp_sharded": "FSDP: parameters sharded" in runs["fsdp"].stdout,
        "4bit_weights_sharded": "Params4bit" not in runs["fsdp"].stderr,  # accelerate warns when it leaves them whole
        "same_steps": len(losses["one"]) == len(losses["fsdp"]) == steps and len(val["one"]) == len(val["fsdp"]),
        "losses_positive_finite": all(0 < v < math.inf for v in losses["fsdp"] + val["fsdp"]),
        "grad_norms_finite": all(math.isfinite(v) for v in norms["fsdp"]) and len(norms["fsdp"]) == steps,
        "losses_close": worst <= rel,
    }
    return {"ok": all(checks.values()), "checks": checks, "device": "cuda" if gpu else "cpu", "processes": nproc,
            "rel_tolerance": rel, "max_rel_loss_diff": worst, "losses": losses, "val_losses": val, "grad_norms": norms}


def check(out: Path, ni_tasks: Path, smoke: bool = False, nproc: int | None = None, timeout: float = 1500) -> dict:
    """Both checks, for bench/gpu_check.py's CHECKS (`{"ok", "detail", ...}`): the probe runs in its own process
    (it creates a process group), bf16 and fp32 storage; then qlora_fsdp_check. Writes out/qlora_fsdp_check.json.
    `timeout`: seconds for all three processes (the probe 20%, each recipe run 40%); one still running then is
    killed and subprocess.TimeoutExpired raised."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    cpu = smoke or not torch.cuda.is_available()
    probe = subprocess.run([sys.executable, "-m", "bench.qlora_fsdp_check", "--probe", "bf16", "fp32"], cwd=REPO,
                           capture_output=True, text=True, timeout=0.2 * timeout,
                           env={**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})})
    probes = [json.loads(line) for line in probe.stdout.splitlines() if line.startswith("{")]
    recipe = qlora_fsdp_check(out, ni_tasks, smoke=smoke, nproc=nproc, timeout=0.4 * timeout)
    ok = recipe["ok"] and len(probes) == 2 and all(p["exact"] for p in probes)
    failed = [name for name, passed in recipe["checks"].items() if not passed]
    detail = (f"FSDP2 on {recipe['processes']} {recipe['device']} process(es) vs 1: max loss gap "
              f"{recipe['max_rel_loss_diff']:.1e} (tolerance {recipe['rel_tolerance']:.0e})"
              + (f", failed: {', '.join(failed)}" if failed else "") + "; Linear4bit under fully_shard: "
              + (", ".join(f"{p['storage']} {'exact' if p['exact'] else 'DIFFERS by %.1e' % p['max_abs_diff']} "
                           f"({p['nan_codes']} NaN-pattern codes)" for p in probes)
                 or f"probe failed: {probe.stderr.strip().splitlines()[-1:]}"))
    result = {"ok": ok, "detail": detail, "probe": probes, "recipe": recipe}
    (out / "qlora_fsdp_check.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--ni-tasks", type=Path, default=REPO.parent / "shared" / "data" / "natural_instructions" / "tasks")
    parser.add_argument("--smoke", action="store_true", help="CPU: 2 processes (gloo) through tests/fsdp_cpu.py")
    parser.add_argument("--nproc", type=int, default=None, help="FSDP processes (default: every GPU; smoke: 2)")
    args = parser.parse_args(argv)
    result = check(args.out, args.ni_tasks, smoke=args.smoke, nproc=args.nproc)
    print(("ok   " if result["ok"] else "FAIL ") + result["detail"])
    return 0 if result["ok"] else 1


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    import torch

    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    for storage in sys.argv[2:] or ["bf16", "fp32"]:
        print(json.dumps(probe_linear4bit_under_fully_shard(device, storage)))
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
