"""Quantized inference of the models this toolkit produces: fp32 / bf16 / int8 / nf4 / fp4 side by side.

    python -m bench.bench_quant [--base DIR] [--adapter DIR | --lora-steps 300] [--new-tokens 64]
                                [--val-windows 16] [--eval-instances 10] [--threads 1] [--parts base,ni,124m] [--json OUT]

Models: --base, an HF export of `tune run pretrain` (default ../ci-clone/runs/shakespeare_bpe_cpu/hf, the CPU BPE
Tiny-Shakespeare model), and a LoRA fine-tune of it on the 16 Natural-Instructions tasks (--adapter, or trained
here first by `tune run finetune --config lora_ni` for --lora-steps steps).

For each precision, in a fresh process, the model is loaded by tune.hf.load_model as `tune generate` and the
evaluate recipe load it (fp32 / bf16: dtype; int8 / nf4 / fp4: bitsandbytes, 4-bit computing in fp32 on CPU, the
adapter on top of the quantized base), and measured:
- weights: model.get_memory_footprint() (parameters + buffers in memory) and the bytes on disk of the checkpoint
  `tune quantize` writes (fp32 / bf16: save_pretrained in that dtype);
- generation tokens/s: greedy, batch 1, the prompt "ROMEO:", exactly --new-tokens new tokens (min = max), the
  median of 3 calls after a warm-up one, --threads torch threads;
- val loss of the base: mean cross-entropy over --val-windows windows of 512 tokens from the last 10% of Tiny
  Shakespeare (the pretrain run's val split), every position a target;
- ROUGE-L / exact match of the LoRA model: `tune run evaluate` (recipes.evaluate.run) with `quant=`, on
  --eval-instances held-out instances of each of the 16 tasks (exclude_train_of the fine-tune run), greedy,
  max_new_tokens 24, as eval_ni.yaml.
Deltas are against fp32. Last, the weight memory alone of a random GPT-2 124M-shaped model (--parts: which tables),
where the quantized linear layers are most of the weights (in the 4096-token BPE model the embeddings are 43%).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import banner, isolated, print_banner, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO.parent / "ci-clone" / "runs" / "shakespeare_bpe_cpu" / "hf"
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NI = REPO.parent / "shared" / "data" / "natural_instructions"
PRECISIONS = ("fp32", "bf16", "int8", "nf4", "fp4")
PROMPT = "ROMEO:"


def load(base: str, precision: str, adapter: str | None = None):
    from tune.hf import load_model

    if precision in ("fp32", "bf16"):
        return load_model(base, adapter, dtype=precision)
    return load_model(base, adapter, dtype="fp32", quant=precision)


def disk_bytes(base: str, precision: str, workdir: str) -> int:
    """Bytes of the safetensors a checkpoint of `base` takes in `precision` (`tune quantize` for int8 / 4-bit)."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM

    from tune.cli import main, weight_bytes

    out = Path(workdir) / f"disk_{precision}"
    if precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        AutoModelForCausalLM.from_pretrained(base, dtype=dtype).save_pretrained(out)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["quantize", base, str(out), "--quant", precision, "--dtype", "fp32", "--force"]) == 0
    return weight_bytes(out)


def generation_speed(model, tokenizer, new_tokens: int, repeats: int = 3) -> float:
    """Greedy tokens/s for exactly `new_tokens` new tokens after PROMPT, batch 1: the median of `repeats` calls
    after a warm-up one (the shared CPU's other processes make single calls noisy)."""
    import statistics

    import torch

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    speeds = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up (4-bit CPU repacking, caches)
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            speeds.append(new_tokens / (time.perf_counter() - start))
            assert out.shape[1] - ids.shape[1] == new_tokens
    return statistics.median(speeds)


def val_loss(model, tokenizer, windows: int, length: int = 512) -> float:
    """Mean next-token cross-entropy over `windows` consecutive windows of the last 10% of Tiny Shakespeare."""
    import torch

    text = CORPUS.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    val = torch.tensor(ids[int(len(ids) * 0.9):])
    total = count = 0.0
    with torch.no_grad():
        for i in range(min(windows, (len(val) - 1) // length)):
            chunk = val[i * length:(i + 1) * length + 1]
            logits = model(input_ids=chunk[None, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[1:], reduction="sum")
            total, count = total + float(loss), count + length
    return total / count


def measure_base(base: str, precision: str, new_tokens: int, windows: int, threads: int, workdir: str) -> dict:
    import torch

    from tune.hf import load_tokenizer

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(base)
    model = load(base, precision)
    return {"memory_bytes": model.get_memory_footprint(), "disk_bytes": disk_bytes(base, precision, workdir),
            "tokens_per_s": generation_speed(model, tokenizer, new_tokens),
            "val_loss": val_loss(model, tokenizer, windows)}


def measure_ni(base: str, adapter: str, run_dir: str, precision: str, instances: int, threads: int,
               workdir: str) -> dict:
    import contextlib
    import io

    import torch

    from recipes.evaluate import CONFIG_CLASS, run
    from tune.config import load_config
    from tune.hf import load_tokenizer

    torch.set_num_threads(threads)
    overrides = [f"model={base}", f"adapter={adapter}", f"output_dir={Path(workdir) / ('eval_' + precision)}",
                 f"data.tasks={NI / 'dev_tasks.txt'}", f"data.exclude_train_of={run_dir}",
                 f"data.max_instances_per_task={instances}", "generation.max_new_tokens=24"]
    overrides += ["dtype=fp32", f"quant={precision}"] if precision not in ("fp32", "bf16") else [f"dtype={precision}"]
    cfg = load_config(CONFIG_CLASS, str(REPO / "recipes" / "configs" / "eval_ni.yaml"), overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        results = run(cfg)
    model = load(base, precision, adapter)
    overall = results["overall"]["mean_over_instances"]
    return {"rougeL": overall["rougeL"], "exact_match": overall["exact_match"], "n_instances": results["n_instances"],
            "generation_s": results["generation_s"], "memory_bytes": model.get_memory_footprint(),
            "tokens_per_s": generation_speed(model, load_tokenizer(base), 24)}


def make_gpt2_124m(workdir: str) -> str:
    """A random-init HF export in the gpt2_124m preset's layout (GPT2Config's defaults: 12 x 768, vocab 50257)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(workdir) / "gpt2_124m"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
    return str(out)


def measure_memory(model_dir: str, precision: str) -> dict:
    """get_memory_footprint of `model_dir` in `precision`, the layers bitsandbytes leaves alone in fp32 and in bf16."""
    from tune.hf import load_model

    if precision in ("fp32", "bf16"):
        return {"fp32_rest": load_model(model_dir, dtype=precision).get_memory_footprint(), "bf16_rest": None}
    return {rest: load_model(model_dir, dtype=dtype, quant=precision).get_memory_footprint()
            for rest, dtype in (("fp32_rest", "fp32"), ("bf16_rest", "bf16"))}


def train_lora(base: str, steps: int, run_dir: str, threads: int) -> str:
    """`tune run finetune --config lora_ni` on `base` for `steps` steps; the adapter directory."""
    import contextlib
    import io

    from recipes.finetune import CONFIG_CLASS, run
    from tune.config import load_config

    cfg = load_config(CONFIG_CLASS, str(REPO / "recipes" / "configs" / "lora_ni.yaml"), [
        f"base_model={base}", f"output_dir={run_dir}", f"data.train_tasks={NI / 'tasks'}",
        f"data.cache_dir={Path(run_dir).parent / 'ni_cache'}", f"train.max_steps={steps}", "train.eval_every=0",
        "train.progress=false", f"train.num_threads={threads}", "eval.enabled=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg)
    return str(Path(run_dir) / "adapter")


def mib(x: int) -> str:
    return f"{x / 2**20:.2f}"


def print_base(args, base_results: dict) -> None:
    """The table of the pretrained base: weights, generation tokens/s and val loss, with ratios / deltas to fp32."""
    ref = base_results.get("fp32")
    rows = [[p, mib(r["memory_bytes"]), mib(r["disk_bytes"]),
             f"{r['memory_bytes'] / ref['memory_bytes']:.2f}x" if ref else "", f"{r['tokens_per_s']:.1f}",
             f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "", f"{r['val_loss']:.4f}",
             f"{r['val_loss'] - ref['val_loss']:+.4f}" if ref else ""] for p, r in base_results.items()]
    print_table(["precision", "memory MiB", "disk MiB", "memory vs fp32", "gen tokens/s", "vs fp32", "val loss",
                 "delta"], rows, title=f"\n{args.base}: weights, greedy generation ({args.new_tokens} tokens, batch 1), "
                                       f"Tiny Shakespeare val loss ({args.val_windows} x 512 tokens)")


def measure_all_ni(args, precisions: list[str], workdir: str) -> dict:
    """The LoRA fine-tune (--adapter, or trained here) evaluated in every precision; prints its table."""
    run_dir = str(Path(args.adapter).parent) if args.adapter else str(Path(workdir) / "lora_ni")
    adapter = args.adapter
    if adapter is None:
        start = time.time()
        adapter = isolated(train_lora, args.base, args.lora_steps, run_dir, args.threads)
        print(f"\ntrained the LoRA adapter ({args.lora_steps} steps of lora_ni) in {time.time() - start:.0f} s")
    ni_results = {p: isolated(measure_ni, args.base, adapter, run_dir, p, args.eval_instances, args.threads, workdir)
                  for p in precisions}
    ref = ni_results.get("fp32")
    rows = [[p, mib(r["memory_bytes"]), f"{r['tokens_per_s']:.1f}", f"{r['rougeL']:.2f}",  # scores are x100
             f"{r['rougeL'] - ref['rougeL']:+.2f}" if ref else "", f"{r['exact_match']:.2f}",
             f"{r['exact_match'] - ref['exact_match']:+.2f}" if ref else "", f"{r['generation_s']:.1f}"]
            for p, r in ni_results.items()]
    n = next(iter(ni_results.values()))["n_instances"]
    print_table(["precision", "memory MiB", "gen tokens/s", "ROUGE-L", "delta", "EM", "delta", "eval s"], rows,
                title=f"\nLoRA fine-tune on NI (base + adapter on top): evaluate recipe, {n} held-out instances of "
                      "the 16 tasks, greedy, 24 new tokens")
    return ni_results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--adapter", default=None, help="a LoRA adapter of --base from `tune run finetune` (its run "
                                                        "directory must hold config.yaml); default: train one")
    parser.add_argument("--lora-steps", type=int, default=300)  # lora_ni.yaml's
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--eval-instances", type=int, default=10)  # all 10 held out per task
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--parts", default="base,ni,124m",
                        help="which tables: base (the pretrained model), ni (its LoRA fine-tune), 124m (weight memory "
                             "of a GPT-2 124M-shaped model)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",")]
    print_banner(banner(), {"base": args.base, "threads": args.threads, "new tokens": args.new_tokens})
    workdir = tempfile.mkdtemp(prefix="bench_quant_")
    parts = {p.strip() for p in args.parts.split(",")}
    base_results, ni_results, memory = {}, {}, {}
    if "base" in parts:
        base_results = {p: isolated(measure_base, args.base, p, args.new_tokens, args.val_windows, args.threads,
                                    workdir) for p in precisions}
        print_base(args, base_results)
    if "ni" in parts:
        ni_results = measure_all_ni(args, precisions, workdir)
    if "124m" in parts:
        model_dir = isolated(make_gpt2_124m, workdir)
        memory = {p: isolated(measure_memory, model_dir, p) for p in precisions}
        ref = memory["fp32"]["fp32_rest"] if "fp32" in memory else None
        rows = [[p, mib(r["fp32_rest"]), f"{r['fp32_rest'] / ref:.2f}x" if ref else "",
                 mib(r["bf16_rest"]) if r["bf16_rest"] else "", f"{r['bf16_rest'] / ref:.2f}x" if ref and r["bf16_rest"]
                 else ""] for p, r in memory.items()]
        print_table(["precision", "MiB (rest fp32)", "vs fp32", "MiB (rest bf16)", "vs fp32"], rows,
                    title="\nweights in memory of the gpt2_124m layout (12 x 768, vocab 50257; random init: memory "
                          "only); rest = embeddings, norms, biases, which bitsandbytes leaves in the load dtype")
    if args.json:
        write_json(args.json, {"settings": vars(args), "base": base_results, "ni": ni_results, "gpt2_124m": memory})


if __name__ == "__main__":
    main()
