"""Distillation throughput and peak memory against training the student alone, in one run.

Both sides train the same student (a native GPT) with the shared Engine on the same random-token
batches (every position a target), each in a fresh process:

  student alone          causal_lm_loss (CE)
  distillation, live     KL(teacher ‖ student) at T = 1, α = 1 (distill_ni's settings; the CE is computed and logged
                         too) with a live frozen teacher (HF model, bf16 on GPU)
  distillation, cached   the same loss against the teacher's top-64 log-probs with the tail bucket, computed once
                         beforehand (teacher.cache=true; the one-time teacher pass is timed separately)
  distillation, on-policy  GKD with kd.lmbda = 1 (tune.distill.OnPolicyBatches): every step the student samples
                         the last eighth of each row (KV cache) after the rest, the live teacher scores it

The ratio distillation / student-alone is what a teacher forward pass costs (target ≥ 0.6×, see
../shared/BENCHMARKS.md). Tokens/s counts student tokens. A live teacher is bounded by its forward pass: at
2·N_teacher FLOPs per token beside the student's 6·N_student, the best a live-teacher step can do at the
student's own efficiency is alone × 6·N_s / (6·N_s + 2·N_t) ("bound"; N counts every matmul weight, the output head
included, position tables not); the table gives each figure as a fraction of that bound too (the cached teacher's
bound is the student alone). On-policy steps also pay for sampling an eighth of every row, token by token (NI
answers are short beside their prompts), and train on those tokens only.

    python -m bench.bench_distill --size cpu        # teacher 6 x 256, student 2 x 128, seq 256 (2-core CPU: ~2 min)
    python -m bench.bench_distill --size 1.1b-124m  # GPU: Llama 1.1B teacher -> GPT-2 124M student, seq 1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (PeakMemory, banner, fmt, intervals, isolated, preload_libraries, print_banner, print_table,
                          step_stats, time_steps, write_json)

SIZES = {
    "cpu": {"teacher": dict(kind="gpt2", n_layer=6, n_head=8, n_embd=256), "student": dict(preset="tiny-gpt2",
            n_layer=2, n_head=4, n_embd=128), "vocab": 4096, "seq": 256, "batch": 8, "steps": 25, "warmup": 5},
    "1.1b-124m": {"teacher": dict(kind="llama", n_layer=22, n_embd=2048, mlp=5632, n_head=32, n_kv_head=4),
                  "student": dict(preset="gpt2-124m"), "vocab": 32000, "seq": 1024, "batch": 8, "steps": 40,
                  "warmup": 10},
    "smoke": {"teacher": dict(kind="llama", n_layer=1, n_embd=32, mlp=64, n_head=2, n_kv_head=1),  # gpu_check --smoke
              "student": dict(preset="tiny-gpt2", n_layer=1, n_head=2, n_embd=32), "vocab": 256, "seq": 32,
              "batch": 2, "steps": 4, "warmup": 1},
}


class RandomBatches:
    """Fixed random-token batches, every position a target (bench.common.time_steps times the steps)."""

    def __init__(self, vocab: int, seq: int, batch: int, steps: int):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (steps + 2, batch, seq + 1), generator=g)

    def _batch(self, i):
        x = self.data[i]
        return {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}

    def step_batches(self, step, rank, world):
        return [self._batch(step - 1)]

    def val_batches(self, rank, world, limit):
        yield self._batch(len(self.data) - 1)


class OnPolicyRandom:
    """Random-token rows cut in two: the first 7/8 are the prompt, the last eighth the reference the student replaces
    with its own samples (OnPolicyBatches with lmbda = 1), so every step generates seq/8 tokens per row."""

    def __init__(self, vocab: int, seq: int, batch: int, steps: int, student):
        from tune.distill import OnPolicyBatches, completion_example

        data = RandomBatches(vocab, seq, batch, steps).data
        prompt = seq - seq // 8
        examples = [completion_example(row[:prompt + 1].tolist(), row[prompt + 1:].tolist()) for b in data for row in b]
        self.batches = OnPolicyBatches(examples, examples[-batch:], batch, 1, seed=0, packing=False, max_length=seq,
                                       pad_id=0, student=student, lmbda=1.0, temperature=1.0,
                                       max_new_tokens=seq - prompt, eos_id=None, vocab_size=vocab)

    def step_batches(self, step, rank, world):
        return self.batches.step_batches(step, rank, world)

    def val_batches(self, rank, world, limit):
        return self.batches.val_batches(rank, world, limit)


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token (2 FLOPs each forward): all but the position table."""
    skip = {id(p) for name, p in model.named_parameters() if name.endswith(("pos_emb.weight", "wpe.weight"))}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def build_teacher(spec: dict, vocab: int, seq: int, out: Path):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if spec["kind"] == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=seq, n_layer=spec["n_layer"], n_head=spec["n_head"],
                            n_embd=spec["n_embd"], bos_token_id=0, eos_token_id=0)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=spec["n_embd"], intermediate_size=spec["mlp"],
                             num_hidden_layers=spec["n_layer"], num_attention_heads=spec["n_head"],
                             num_key_value_heads=spec["n_kv_head"], max_position_embeddings=seq,
                             bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


class CachedBatches:
    """The same batches, carrying the teacher's cached top-k for every position (tune.distill.CachedTeacherBatches)."""

    def __init__(self, source: RandomBatches, cache: dict):
        self.source, self.cache = source, cache

    def _attach(self, batch, index):
        n = batch["targets"].numel()
        rows = slice(index * n, (index + 1) * n)
        return {**batch, "teacher_logprobs": self.cache["logprobs"][rows], "teacher_ids": self.cache["ids"][rows]}

    def step_batches(self, step, rank, world):
        return [self._attach(b, step - 1) for b in self.source.step_batches(step, rank, world)]

    def val_batches(self, rank, world, limit):
        for b in self.source.val_batches(rank, world, limit):
            yield self._attach(b, len(self.source.data) - 1)


def teacher_cache(size: dict, teacher_dir: str, out: str, top_k: int = 64) -> float:
    """Write the teacher's top-k log-probs for every batch position to `out` (safetensors, as
    tune.distill.build_teacher_cache stores them); returns the seconds the teacher pass took."""
    from safetensors.torch import save_file

    from tune.distill import load_teacher, teacher_topk
    from tune.hf import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(teacher_dir, resolve_dtype("auto"), "none", device)
    source = RandomBatches(size["vocab"], size["seq"], size["batch"], size["steps"])
    examples = [{"input_ids": x[:-1].tolist(), "targets": x[1:].tolist()} for batch in source.data for x in batch]
    start = time.perf_counter()
    cache = teacher_topk(teacher, examples, top_k, size["vocab"], pad_id=0, batch_size=size["batch"], device=device)
    seconds = time.perf_counter() - start
    save_file({"logprobs": cache["logprobs"], "ids": cache["ids"]}, out)
    return seconds


def train(size: dict, teacher_dir: str | None, cache_file: str | None = None, on_policy: bool = False) -> dict:
    """One side, in a fresh process: Engine + native student, alone, with the live teacher (on-policy too), or from
    the cache."""
    from tune.distill import kd_loss_fn, load_teacher
    from tune.engine import Engine, TrainConfig
    from tune.hf import resolve_dtype
    from tune.losses import causal_lm_loss
    from tune.models.gpt import GPT, config_from_preset

    preload_libraries()
    cuda = torch.cuda.is_available()
    source = RandomBatches(size["vocab"], size["seq"], size["batch"], size["steps"])
    cfg = TrainConfig(max_steps=size["steps"], micro_batch_size=size["batch"], lr=1e-3, warmup_steps=0, eval_every=0,
                      eval_batches=1, log_every=10, mixed_precision="auto", progress=False)
    teacher_params = None
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        torch.manual_seed(0)
        s = size["student"]
        student = GPT(config_from_preset(s["preset"], vocab_size=size["vocab"], block_size=size["seq"],
                                         **{k: v for k, v in s.items() if k != "preset"}))
        if on_policy:
            student.to("cuda" if cuda else "cpu")  # it samples before the engine moves it
            source = OnPolicyRandom(size["vocab"], size["seq"], size["batch"], size["steps"], student)
        loss_fn = causal_lm_loss
        if cache_file is not None:
            from safetensors.torch import load_file

            source = CachedBatches(source, load_file(cache_file))
            loss_fn = kd_loss_fn(None, 1.0, 1.0, "forward_kl", 0.5, size["vocab"])
        elif teacher_dir:
            device = torch.device("cuda" if cuda else "cpu")
            teacher = load_teacher(teacher_dir, resolve_dtype("auto"), "none", device)
            teacher_params = matmul_parameters(teacher)
            loss_fn = kd_loss_fn(teacher, 1.0, 1.0, "forward_kl", 0.5, size["vocab"], log_on_policy=on_policy)
        engine = Engine(cfg, Path(tmp) / "run", student, source, loss_fn=loss_fn, log=lambda s: None)
        engine.save_at_end = False  # the final checkpoint is no part of the measurement
        engine.prefetch = not on_policy  # as the recipe: on-policy batches are sampled by the student of their step
        stamps = time_steps(engine)
        engine.fit()
    return {"step_times": intervals(stamps), "peak_bytes": mem.bytes, "memory_method": mem.method,
            "student_params": matmul_parameters(student), "teacher_params": teacher_params}


def measure(size: dict, timeout: float | None = None) -> dict:
    """The three sides in fresh processes, after the teacher and its cache are built; `timeout` (seconds) for all of
    it. Returns {"sides": {name: figures}, "ratio": {name: vs alone}, "cache_seconds": teacher pass seconds}."""
    tokens_per_step = size["batch"] * size["seq"]
    start = time.time()
    left = (lambda parts: None if timeout is None else max(1.0, (timeout - (time.time() - start)) / parts))  # noqa: E731
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = str(build_teacher(size["teacher"], size["vocab"], size["seq"], Path(tmp) / "teacher"))
        print("building the teacher cache (top-64) ...", flush=True)
        cache_file = str(Path(tmp) / "teacher_top64.safetensors")
        cache_seconds = isolated(teacher_cache, size, teacher_dir, cache_file, timeout=left(4))
        sides = (("student alone", None, None, False), ("distillation, live", teacher_dir, None, False),
                 ("distillation, cached", None, cache_file, False), ("distillation, on-policy", teacher_dir, None, True))
        for i, (name, teacher, cached, on_policy) in enumerate(sides):
            print(f"running {name} ...", flush=True)
            r = isolated(train, size, teacher, cached, on_policy, timeout=left(len(sides) - i))
            r.update(step_stats(r["step_times"], size["warmup"], tokens_per_step))
            results[name] = r
    alone = results["student alone"]
    n_s, n_t = alone["student_params"], results["distillation, live"]["teacher_params"]
    live_bound = alone["tokens_per_s"] * 6 * n_s / (6 * n_s + 2 * n_t)
    bounds = {"distillation, live": live_bound, "distillation, cached": alone["tokens_per_s"],
              "distillation, on-policy": live_bound}
    ratio = {name: {"tokens_per_s": r["tokens_per_s"] / alone["tokens_per_s"],
                    "of_bound": r["tokens_per_s"] / bounds[name],
                    "peak_bytes": r["peak_bytes"] / alone["peak_bytes"] if alone["peak_bytes"] > 0 else None}
             for name, r in results.items() if name != "student alone"}
    return {"sides": results, "ratio": ratio, "cache_seconds": cache_seconds, "live_bound_tokens_per_s": live_bound,
            "student_params": n_s, "teacher_params": n_t}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--json", help="write all numbers to this JSON file")
    args = p.parse_args(argv)
    size = dict(SIZES[args.size])
    if args.steps:
        size["steps"] = args.steps
    print("Distillation vs the student alone")
    print_banner(banner(), {"size": args.size, "teacher": size["teacher"], "student": size["student"],
                            "tokens/step": f"{size['batch']} x {size['seq']}", "steps": size["steps"]})
    res = measure(size)
    results, ratio, cache_seconds = res["sides"], res["ratio"], res["cache_seconds"]
    tokens_per_step = size["batch"] * size["seq"]
    alone = results["student alone"]
    rows = []
    for name, r in results.items():
        q = ratio.get(name)
        rows.append([name, fmt(r["tokens_per_s"]), fmt(r["step_s_median"] * 1e3, ".1f"),
                     fmt(r["peak_bytes"] / 2**20, ",.0f"), f"{q['tokens_per_s']:.2f}x" if q else "",
                     f"{q['of_bound']:.2f}" if q else "", fmt(q and q["peak_bytes"], ".2f") + "x" if q else ""])
    print()
    print_table(["workload", "student tokens/s", "step ms (median)", "peak MiB", "tok/s vs alone", "of bound",
                 "mem vs alone"], rows,
                title=f"median over {alone['steady_steps']} steady steps; target: distillation >= 0.6x")
    print(f"  bound: the student alone slowed only by the teacher's forward FLOPs, alone x 6·N_s / (6·N_s + 2·N_t) = "
          f"{res['live_bound_tokens_per_s']:,.0f} tokens/s (N_s {res['student_params'] / 1e6:.2f}M, "
          f"N_t {res['teacher_params'] / 1e6:.2f}M); the cached teacher's bound is the student alone")
    print(f"  teacher cache: one pass over {size['steps'] + 2} batches took {cache_seconds:.1f} s "
          f"({(size['steps'] + 2) * tokens_per_step / cache_seconds:,.0f} tokens/s), not included above")
    print(f"  peak memory: {alone['memory_method']}")
    if args.json:
        write_json(args.json, {"size": args.size, "settings": size, "results": results, "ratio": ratio,
                               "cache_seconds": cache_seconds})


if __name__ == "__main__":
    main()
