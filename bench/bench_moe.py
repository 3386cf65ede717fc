"""Mixture of Experts vs dense on CPU: the same tokens and the same time, val loss and tokens/s side by side.

    python -m bench.bench_moe [--steps 600] [--experts 4] [--top-k 2] [--eval-every 50] [--json OUT]

Three native GPTs in the modern layout (4 layers x 128, 4 heads, 2 KV heads, context 64), trained on Tiny Shakespeare
(characters) by `tune run pretrain` with the shakespeare_moe_cpu settings, each in a fresh process, one after another:
- moe: --experts SwiGLU experts of mlp_hidden 384 per block, top --top-k routing;
- dense, same active parameters: one SwiGLU MLP of top_k x 384 (what a token passes through in the MoE);
- dense, same total parameters: one SwiGLU MLP of experts x 384.
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
EXPERT_HIDDEN = 384


def train(name: str, model: dict, steps: int, eval_every: int, workdir: str) -> dict:
    """One pretrain run (in its own process); its metrics rows and the model line."""
    import contextlib
    import io

    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    out = Path(workdir) / name
    cfg = load_config(PretrainConfig, "shakespeare_moe_cpu", [
        f"data.corpus={CORPUS}", f"data.cache_dir={Path(workdir) / 'cache'}", f"output_dir={out}", "overwrite=true",
        f"train.max_steps={steps}", f"train.eval_every={eval_every}", "train.progress=false", "export=false",
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    variants = {
        f"moe ({args.experts} experts, top-{args.top_k})": {"n_experts": args.experts, "moe_top_k": args.top_k,
                                                            "mlp_hidden": EXPERT_HIDDEN},
        "dense, same active parameters": {"n_experts": 0, "mlp_hidden": args.top_k * EXPERT_HIDDEN},
        "dense, same total parameters": {"n_experts": 0, "mlp_hidden": args.experts * EXPERT_HIDDEN},
    }
    print_banner(banner(), {"steps": args.steps, "experts": args.experts, "top_k": args.top_k})
    workdir = tempfile.mkdtemp(prefix="bench_moe_")
    runs = {name: isolated(train, name.split(" ")[0] + str(i), model, args.steps, args.eval_every, workdir)
            for i, (name, model) in enumerate(variants.items())}
    time_cap = min(summarize(r["rows"], float("inf"))["elapsed_s"] for r in runs.values())
    results = {name: {**summarize(r["rows"], time_cap), "model": r["model"]} for name, r in runs.items()}
    moe = results[next(iter(results))]
    rows = [[name, r["model"].split(": ", 1)[-1], f"{r['tokens_per_s']:,.0f}",
             f"{r['tokens_per_s'] / moe['tokens_per_s']:.2f}x", f"{r['val_loss_same_tokens']:.4f}",
             f"{r['val_loss_same_time']:.4f} (step {r['step_same_time']})"] for name, r in results.items()]
    print_table(["model", "parameters", "tokens/s", "vs moe", f"val loss at step {args.steps}",
                 f"val loss within {time_cap:.0f} s"], rows,
                title="Tiny Shakespeare (characters), same batches; each run in a fresh process")
    if args.json:
        write_json(args.json, {"settings": vars(args), "results": results, "time_cap_s": time_cap})


if __name__ == "__main__":
    main()
