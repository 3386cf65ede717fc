"""Mixture of Experts vs dense: the same tokens and the same time, val loss and tokens/s side by side.

    python -m bench.bench_moe [--size cpu|gpu] [--steps N] [--experts 4] [--top-k 2] [--eval-every N] [--json OUT]

Three native GPTs in the modern layout, trained on Tiny Shakespeare (characters) by `tune run pretrain` with the
shakespeare_moe_cpu settings (mixed precision: the recipe's auto, bf16 on a GPU), each in a fresh process, one after
another:
- moe: --experts SwiGLU experts of the size's expert hidden width per block, top --top-k routing;
- dense, same active parameters: one SwiGLU MLP of top_k x that width (what a token passes through in the MoE);
- dense, same total parameters: one SwiGLU MLP of experts x that width.
Sizes (SIZES): cpu = 4 layers x 128, 4 heads (2 KV), context 64, micro-batch 12, experts of 384, 600 steps;
gpu = 8 layers x 512, 8 heads (4 KV), context 256, micro-batch 32, experts of 1408, 400 steps (bench.gpu_check runs
it); smoke = a seconds-long dry run.
Same batches (data seed), same optimizer and schedule, --steps each. Reported: tokens/s (training tokens over the
training time), the val loss after the same tokens (the last step), and the val loss each reached within the time
the fastest run took (its last evaluation before then): a model that is better per token can be worse per second.
Expert dispatch here is a loop over experts (tune.models.gpt.MoE), so its cost grows with the number of experts that
receive tokens, not with tokens x experts; --experts 8 vs 4 shows the scaling.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import banner, isolated, print_banner, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SIZES = {
    "cpu": dict(model=dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, block_size=64), micro_batch=12,
                expert_hidden=384, steps=600, eval_every=50, log_every=50),
    "gpu": dict(model=dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=4, block_size=256), micro_batch=32,
                expert_hidden=1408, steps=400, eval_every=50, log_every=10),
    "smoke": dict(model=dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=16), micro_batch=2,
                  expert_hidden=32, steps=4, eval_every=2, log_every=1),
}


def train(name: str, model: dict, steps: int, eval_every: int, workdir: str, micro_batch: int = 12,
          corpus: str = str(CORPUS), log_every: int = 50) -> dict:
    """One pretrain run (in its own process); its metrics rows and the model line."""
    import contextlib
    import io

    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    out = Path(workdir) / name
    cfg = load_config(PretrainConfig, "shakespeare_moe_cpu", [
        f"data.corpus={corpus}", f"data.cache_dir={Path(workdir) / 'cache'}", f"output_dir={out}", "overwrite=true",
        f"train.max_steps={steps}", f"train.eval_every={eval_every}", f"train.micro_batch_size={micro_batch}",
        f"train.log_every={log_every}", "train.progress=false", "export=false",
        "sample.num_samples=0", *[f"model.{k}={v}" for k, v in model.items()]])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    line = next((x for x in log.getvalue().splitlines() if x.startswith("GPT ")), "")
    return {"rows": rows, "model": line}


def summarize(rows: list[dict], time_cap: float) -> dict:
    evals = [r for r in rows if "val_loss" in r]
    train_rows = [r for r in rows if "tokens_per_s" in r]
    within = [r for r in evals if r["elapsed_s"] <= time_cap + 1e-9]
    return {"val_loss_same_tokens": evals[-1]["val_loss"], "elapsed_s": evals[-1]["elapsed_s"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in train_rows) / max(len(train_rows), 1),
            "val_loss_same_time": within[-1]["val_loss"] if within else float("nan"),
            "step_same_time": within[-1]["step"] if within else 0}


def compare(size: str = "cpu", steps: int | None = None, experts: int = 4, top_k: int = 2,
            eval_every: int | None = None, corpus: str = str(CORPUS), timeout: float | None = None) -> dict:
    """The three runs of one SIZES entry (each in a fresh process, at most `timeout` s each); per run: tokens/s,
    val loss after the same steps and within the time the fastest run took, its model line."""
    shape = SIZES[size]
    steps = steps or shape["steps"]
    eval_every = eval_every or shape["eval_every"]
    width = shape["expert_hidden"]
    variants = {
        f"moe ({experts} experts, top-{top_k})": {"n_experts": experts, "moe_top_k": top_k, "mlp_hidden": width},
        "dense, same active parameters": {"n_experts": 0, "mlp_hidden": top_k * width},
        "dense, same total parameters": {"n_experts": 0, "mlp_hidden": experts * width},
    }
    workdir = tempfile.mkdtemp(prefix="bench_moe_")
    runs = {name: isolated(train, name.split(" ")[0] + str(i), {**shape["model"], **model}, steps, eval_every,
                           workdir, shape["micro_batch"], corpus, shape["log_every"], timeout=timeout)
            for i, (name, model) in enumerate(variants.items())}
    time_cap = min(summarize(r["rows"], float("inf"))["elapsed_s"] for r in runs.values())
    results = {name: {**summarize(r["rows"], time_cap), "model": r["model"]} for name, r in runs.items()}
    return {"settings": {"size": size, "steps": steps, "experts": experts, "top_k": top_k, **shape["model"],
                         "micro_batch": shape["micro_batch"], "expert_hidden": width},
            "results": results, "time_cap_s": time_cap}


def table_rows(out: dict) -> list[list[str]]:
    """compare()'s results as table rows, with tokens/s relative to the MoE run."""
    results = out["results"]
    moe = results[next(iter(results))]
    return [[name, r["model"].split(": ", 1)[-1], f"{r['tokens_per_s']:,.0f}",
             f"{r['tokens_per_s'] / moe['tokens_per_s']:.2f}x", f"{r['val_loss_same_tokens']:.4f}",
             f"{r['val_loss_same_time']:.4f} (step {r['step_same_time']})"] for name, r in results.items()]


HEADERS = ["model", "parameters", "tokens/s", "vs moe", "val loss, same steps", "val loss, same time"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="default: the size's")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=None, help="default: the size's")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print_banner(banner(), {"size": args.size, "experts": args.experts, "top_k": args.top_k})
    out = compare(args.size, args.steps, args.experts, args.top_k, args.eval_every, args.corpus)
    print_table(HEADERS, table_rows(out), title=f"Tiny Shakespeare (characters), same batches, {out['settings']['steps']} "
                f"steps each (same time: within {out['time_cap_s']:.0f} s); each run in a fresh process")
    if args.json:
        write_json(args.json, {**out, "settings": {**out["settings"], **vars(args)}})


if __name__ == "__main__":
    main()
