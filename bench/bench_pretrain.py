"""Pretraining benchmark: HF Trainer + GPT2LMHeadModel vs tune's Engine + native GPT, same shape.

    python -m bench.bench_pretrain [--size cpu|gpt2-124m] [--steps N] [--plain-loop] [--compile-compare] [--json OUT]
    python -m bench.bench_pretrain --loss-memory 32000,50257 [--width 256 --seq 512 --batch 8 --steps 6]

1. Throughput: both train the same GPT-2 shape on the same random-token batches for N steps; each runs
   in a fresh process. Step time = interval between the starts of consecutive optimizer steps (so it
   includes data, optimizer, clipping and logging), median over the steps after the warm-up ones.
2. Time to target (--size cpu only, --no-target skips it): the real recipe shakespeare_char_cpu through
   recipes.pretrain.run with train.stop_at_val_loss, timed from the run() call (data prep included,
   cold tokenizer cache) to the first evaluation at or below the target.
3. --compile-compare: our Engine alone with train.compile off and on (each transformer block compiled), in fresh
   processes with inductor's caches disabled: tokens/s side by side, and the compile warm-up time separately.
4. Loss memory (--loss-memory V1,V2,..., instead of 1 and 2): tune's Engine + native GPT at each vocabulary,
   once with the plain full-logits loss (F.cross_entropy over model(x), all (B, T, V) logits at once) and once
   with the Engine's default (train.ce_kernel=chunked: tune.losses' fused chunks), each in a fresh process:
   peak memory and tokens/s side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (PeakMemory, banner, default_peak_tflops, fmt, intervals, isolated, mfu, preload_libraries,
                          print_banner, print_table, step_stats, sync, time_steps, transformer_flops_per_token,
                          write_json)

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# Model shape and run length per size. gpt2-124m is the GPU workload of BENCHMARKS.md.
SIZES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, seq=256, batch=4, vocab=8192, steps=15, warmup=3),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, seq=1024, batch=12, vocab=50304, steps=50, warmup=10),
    "smoke": dict(n_layer=2, n_head=2, n_embd=32, seq=32, batch=2, vocab=256, steps=4, warmup=1),  # gpu_check --smoke
}
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP, SEED = 6e-4, 0.1, (0.9, 0.95), 1.0, 1234


def native_config(shape: dict):
    """The GPT-2 layout (pre-LN, learned positions, GELU, tied embeddings) at the benchmark shape, no dropout."""
    from tune.models.gpt import config_from_preset

    return config_from_preset("gpt2-124m", n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                              block_size=shape["seq"], vocab_size=shape["vocab"], dropout=0.0)


def random_tokens(shape: dict, steps: int) -> torch.Tensor:
    """(steps * batch, seq + 1) random token ids; row block k is the batch of step k + 1."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(shape["vocab"], (steps * shape["batch"], shape["seq"] + 1), generator=g)


# -- baseline: HF Trainer --------------------------------------------------------------------------------
class RandomLMDataset(torch.utils.data.Dataset):
    """Fixed-length rows with labels = input_ids (the HF model shifts them itself)."""

    def __init__(self, tokens: torch.Tensor):
        self.rows = tokens[:, :-1].contiguous()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def run_baseline(shape: dict, steps: int) -> dict:
    """GPT2LMHeadModel (SDPA) trained by transformers.Trainer; runs in a subprocess."""
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tune.models.export import hf_config

    transformers.logging.set_verbosity_error()
    preload_libraries()
    cuda = torch.cuda.is_available()

    class StepTimes(TrainerCallback):
        """Timestamps the start of every optimizer step (after the GPU has finished the previous one)."""

        def __init__(self):
            self.begins = []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.begins.append(time.perf_counter())

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        model = AutoModelForCausalLM.from_config(hf_config(native_config(shape)), attn_implementation="sdpa")
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=shape["batch"], learning_rate=LR,
            weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=GRAD_CLIP,
            warmup_steps=0, bf16=cuda, use_cpu=not cuda, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=SEED)
        trainer = Trainer(model=model, args=args, train_dataset=RandomLMDataset(random_tokens(shape, steps)),
                          callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
        trainer.train()
    return {"impl": "HF Trainer + GPT2LMHeadModel", "step_times": intervals(timer.begins),
            "peak_bytes": mem.bytes, "memory_method": mem.method,
            "details": f"optim={getattr(args.optim, 'value', args.optim)}, bf16={args.bf16}, "
                       f"attn={model.config._attn_implementation}, compile=False"}


# -- ours: tune Engine + native GPT ----------------------------------------------------------------------
class RandomTokenSource:
    """A BatchSource over pre-drawn random tokens (bench.common.time_steps timestamps the steps)."""

    def __init__(self, tokens: torch.Tensor, batch: int):
        self.tokens, self.batch = tokens, batch

    def _batch(self, i: int) -> dict:
        rows = self.tokens[i * self.batch:(i + 1) * self.batch]
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def step_batches(self, step: int, rank: int, world: int) -> list[dict]:
        return [self._batch(step - 1)]

    def val_batches(self, rank: int, world: int, limit: int):
        for i in range(min(limit, 2)):
            yield self._batch(i)


def run_ours(shape: dict, steps: int, compile_: bool | None = None) -> dict:
    """tune.engine.Engine training tune.models.gpt.GPT; runs in a subprocess. The final evaluation and
    checkpoint the Engine always does come after the last timestamp, so they are not timed. compile_: train.compile
    (default: on CUDA only)."""
    from tune.engine import Engine, TrainConfig
    from tune.models.gpt import GPT

    preload_libraries()
    cuda = torch.cuda.is_available()
    cfg = TrainConfig(max_steps=steps, micro_batch_size=shape["batch"], lr=LR, min_lr=LR / 10, warmup_steps=0,
                      weight_decay=WEIGHT_DECAY, betas=list(BETAS), grad_clip=GRAD_CLIP, eval_every=0,
                      eval_batches=2, save_every=0, log_every=10, mixed_precision="auto",
                      compile=cuda if compile_ is None else compile_,
                      progress=False)
    source = RandomTokenSource(random_tokens(shape, steps), shape["batch"])
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        torch.manual_seed(SEED)
        model = GPT(native_config(shape))
        engine = Engine(cfg, Path(tmp) / "run", model, source, log=lambda s: None)
        engine.save_at_end = False  # the final checkpoint is no part of the measurement
        stamps = time_steps(engine)
        engine.fit()
    return {"impl": "tune Engine + native GPT", "step_times": intervals(stamps),
            "peak_bytes": mem.bytes, "memory_method": mem.method,
            "details": f"mixed_precision={engine.accelerator.mixed_precision}, compile={cfg.compile}, "
                       f"fused AdamW=True, log_every={cfg.log_every}"}


def full_logits_loss(model, batch):
    """The plain loss the fused one replaces: (B, T, V) fp32 logits of the whole batch, then F.cross_entropy."""
    import torch.nn.functional as F

    logits = model(batch["input_ids"]).float()
    targets = batch["targets"]
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=-100)
    return loss, (targets != -100).sum()


def run_loss_variant(shape: dict, steps: int, loss: str) -> dict:
    """run_ours with `loss` "full" (full_logits_loss) or "chunked" (the Engine's default); in a subprocess."""
    from tune.engine import Engine, TrainConfig
    from tune.models.gpt import GPT

    preload_libraries()
    cfg = TrainConfig(max_steps=steps, micro_batch_size=shape["batch"], lr=LR, min_lr=LR / 10, warmup_steps=0,
                      weight_decay=WEIGHT_DECAY, betas=list(BETAS), grad_clip=GRAD_CLIP, eval_every=0,
                      eval_batches=1, save_every=0, log_every=10, mixed_precision="auto", progress=False)
    source = RandomTokenSource(random_tokens(shape, steps), shape["batch"])
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        torch.manual_seed(SEED)
        model = GPT(native_config(shape))
        engine = Engine(cfg, Path(tmp) / "run", model, source, loss_fn=full_logits_loss if loss == "full" else None,
                        log=lambda s: None)
        engine.save_at_end = False  # the final checkpoint is no part of the measurement
        engine.fit()
    return {"step_times": intervals(source.stamps), "peak_bytes": mem.bytes, "memory_method": mem.method}


def loss_memory(shape: dict, vocabs: list[int], steps: int, warmup: int) -> dict:
    """Full-logits vs chunked loss at each vocabulary size, each run in a fresh process."""
    results = {}
    for vocab in vocabs:
        at = {}
        for loss in ("full", "chunked"):
            print(f"running vocab {vocab}, {loss} loss ({steps} steps) ...", flush=True)
            r = isolated(run_loss_variant, {**shape, "vocab": vocab}, steps, loss)
            r.update(step_stats(r["step_times"], warmup, shape["batch"] * shape["seq"]))
            at[loss] = r
        at["ratio_chunked_over_full"] = {"peak_bytes": at["chunked"]["peak_bytes"] / at["full"]["peak_bytes"],
                                         "tokens_per_s": at["chunked"]["tokens_per_s"] / at["full"]["tokens_per_s"]}
        results[str(vocab)] = at
    return results


def print_loss_memory(res: dict, shape: dict):
    mib = 1024 ** 2
    rows = []
    for vocab, at in res.items():
        for loss in ("full", "chunked"):
            r = at[loss]
            rows.append([vocab, {"full": "full logits", "chunked": "chunked (fused)"}[loss], fmt(r["tokens_per_s"]),
                         fmt(r["step_s_median"] * 1e3, ".0f"), fmt(r["peak_bytes"] / mib, ",.0f")])
        q = at["ratio_chunked_over_full"]
        rows.append([vocab, "chunked / full", f"{q['tokens_per_s']:.2f}x", "", f"{q['peak_bytes']:.2f}x"])
    print()
    print_table(["vocab", "loss", "tokens/s", "step ms (median)", "peak MiB"], rows,
                title=f"Loss memory: {shape['n_layer']}L/{shape['n_embd']}d, seq {shape['seq']}, batch {shape['batch']}")
    print(f"  peak memory: {next(iter(res.values()))['full']['memory_method']}, whole run (model, AdamW, activations)")


# -- reference: a compiled plain loop (nanoGPT's train.py) ----------------------------------------------
def run_plain_loop(shape: dict, steps: int) -> dict:
    """The same native GPT in the loop nanoGPT uses: the whole model under torch.compile (on CUDA), bf16
    autocast, full-logits cross-entropy, fused AdamW, clipping, no host sync but at the end; runs in a subprocess."""
    import torch.nn.functional as F

    from tune.models.gpt import GPT

    preload_libraries()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokens = random_tokens(shape, steps)
    stamps = []
    with PeakMemory() as mem:
        torch.manual_seed(SEED)
        model = GPT(native_config(shape)).to(device)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, fused=True)
        step_fn = torch.compile(model) if cuda else model
        for i in range(steps):
            sync()
            stamps.append(time.perf_counter())
            rows = tokens[i * shape["batch"]:(i + 1) * shape["batch"]].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = step_fn(rows[:, :-1])
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        stamps.append(time.perf_counter())
    return {"impl": "plain loop (nanoGPT-style)", "step_times": intervals(stamps), "peak_bytes": mem.bytes,
            "memory_method": mem.method, "final_loss": loss.item(),
            "details": f"torch.compile(whole model)={cuda}, bf16 autocast={cuda}, fused AdamW, full logits"}


def throughput(shape: dict, steps: int, warmup: int, peak_tflops: float | None, plain_loop: bool = False,
               timeout: float | None = None) -> dict:
    """Run the implementations in fresh processes and summarise them: the HF Trainer baseline, ours, and with
    `plain_loop` the compiled plain loop too. `timeout`: seconds for all of them together (each gets its share).
    Returns per side {impl, step_times, tokens_per_s, step_s_median, peak_bytes, mfu, ...} and `ratios`
    {side: ours tokens/s / that side's}, both only from sides that finished.

    With a `timeout` (bench/gpu_check.py) a side that fails or is killed, ours included, is recorded as
    {"error": message} and the others still run; without one (the standalone benchmark, which needs every side)
    the failure is raised."""
    from tune.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(native_config(shape))
    n_params = model.num_parameters() - model.pos_emb.weight.numel()
    flops_tok = transformer_flops_per_token(n_params, shape["n_layer"], shape["seq"], shape["n_embd"])
    tokens_per_step = shape["batch"] * shape["seq"]
    results = {}
    sides = [("baseline", run_baseline), ("ours", run_ours)] + ([("plain_loop", run_plain_loop)] if plain_loop else [])
    for name, fn in sides:
        print(f"running {name} ({steps} steps) ...", flush=True)
        try:
            r = isolated(fn, shape, steps, timeout=timeout and timeout / len(sides))
            r.update(step_stats(r["step_times"], warmup, tokens_per_step))
        except Exception as e:
            if timeout is None:  # the standalone benchmark needs every side
                raise
            r = {"error": str(e).strip() or type(e).__name__}
            print(f"  FAILED: {r['error'].splitlines()[-1]}", flush=True)
        if "tokens_per_s" in r:
            r["mfu"] = mfu(r["tokens_per_s"], flops_tok, peak_tflops)
        results[name] = r
    b, o = results["baseline"], results["ours"]
    if "tokens_per_s" in b and "tokens_per_s" in o:
        results["ratio_ours_over_baseline"] = {
            "tokens_per_s": o["tokens_per_s"] / b["tokens_per_s"],
            "step_s_median": o["step_s_median"] / b["step_s_median"],
            "peak_bytes": o["peak_bytes"] / b["peak_bytes"] if b["peak_bytes"] > 0 else None,
        }
    results["ratios"] = {name: o["tokens_per_s"] / results[name]["tokens_per_s"] for name, _ in sides
                         if name != "ours" and "tokens_per_s" in results[name] and "tokens_per_s" in o}
    results["n_params_for_flops"] = n_params
    results["flops_per_token"] = flops_tok
    results["tokens_per_step"] = tokens_per_step
    results["peak_tflops"] = peak_tflops
    return results


def compile_comparison(shape: dict, steps: int, warmup: int, repeats: int) -> dict:
    """Our Engine with train.compile off and on (regional: each block compiled), alternately `repeats` times, each
    run in a fresh process with inductor's on-disk caches disabled, so every compiled run pays a cold compile.
    Per setting the run of median tokens/s is kept (all runs' tokens/s in `all_tokens_per_s`: a busy machine's
    noise shows there). warmup_s: the first `warmup` step intervals (the compile happens in step 1);
    compile_warmup_s: how much longer they take compiled."""
    import os
    import statistics

    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # inherited by the spawned children
    tokens_per_step = shape["batch"] * shape["seq"]
    runs = {"eager": [], "compiled": []}
    for i in range(repeats):
        for name, flag in (("eager", False), ("compiled", True)):
            print(f"running ours, train.compile={str(flag).lower()} ({steps} steps, run {i + 1}/{repeats}) ...",
                  flush=True)
            r = isolated(run_ours, shape, steps, flag)
            r.update(step_stats(r["step_times"], warmup, tokens_per_step))
            r["warmup_s"] = sum(r["step_times"][:warmup])
            runs[name].append(r)
    results = {}
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        results[name] = {**rs[(len(rs) - 1) // 2], "all_tokens_per_s": [r["tokens_per_s"] for r in runs[name]],
                         "warmup_s": statistics.median(r["warmup_s"] for r in rs)}
    e, c = results["eager"], results["compiled"]
    results["speedup_tokens_per_s"] = c["tokens_per_s"] / e["tokens_per_s"]
    results["compile_warmup_s"] = c["warmup_s"] - e["warmup_s"]
    return results


def print_compile_comparison(res: dict):
    mib = 1024 ** 2
    rows = [[f"train.compile={name == 'compiled'}".lower(), fmt(r["tokens_per_s"]), fmt(r["step_s_median"] * 1e3, ".1f"),
             fmt(r["warmup_s"], ".1f"), fmt(r["peak_bytes"] / mib, ",.0f")]
            for name, r in ((n, res[n]) for n in ("eager", "compiled"))]
    rows.append(["compiled / eager", f"{res['speedup_tokens_per_s']:.2f}x", "", "", ""])
    print()
    print_table(["tune Engine + native GPT", "tokens/s", "step ms (median)", "warm-up s", "peak MiB"], rows,
                title=f"train.compile off vs on, median over {res['eager']['steady_steps']} steady steps, "
                      f"median of {len(res['eager']['all_tokens_per_s'])} runs each")
    print(f"  compile warm-up: {res['compile_warmup_s']:.1f} s more than eager over the warm-up steps "
          "(cold: inductor caches disabled; medians)")
    for name in ("eager", "compiled"):
        print(f"  {name}: tokens/s of each run " + ", ".join(f"{t:,.0f}" for t in res[name]["all_tokens_per_s"]))


def print_throughput(res: dict):
    mib = 1024 ** 2
    rows = []
    sides = [name for name in ("baseline", "plain_loop", "ours") if "tokens_per_s" in res.get(name, {})]
    for name in sides:
        r = res[name]
        rows.append([f"{name}: {r['impl']}", fmt(r["tokens_per_s"]), fmt(r["step_s_median"] * 1e3, ".1f"),
                     fmt(r["peak_bytes"] / mib, ",.0f"), fmt(r["mfu"] and 100 * r["mfu"], ".1f")])
    for name in ("baseline", "plain_loop", "ours"):
        if "error" in res.get(name, {}):
            rows.append([f"{name}: FAILED", res[name]["error"].splitlines()[-1][:60], "", "", ""])
    q = res.get("ratio_ours_over_baseline")
    if q:
        rows.append(["ours / baseline", f"{q['tokens_per_s']:.2f}x", f"{q['step_s_median']:.2f}x",
                     fmt(q["peak_bytes"], ".2f") + "x", ""])
    if "plain_loop" in res["ratios"]:
        rows.append(["ours / plain loop", f"{res['ratios']['plain_loop']:.2f}x", "", "", ""])
    print()
    steady = next((res[name]["steady_steps"] for name in sides), 0)
    print_table(["implementation", "tokens/s", "step ms (median)", "peak MiB", "MFU %"], rows,
                title=f"Throughput, median over {steady} steady steps")
    for name in sides:
        print(f"  {name}: {res[name]['details']}")
    if sides:
        print(f"  peak memory: {res[sides[-1]]['memory_method']}")
    print(f"  FLOPs/token {res['flops_per_token'] / 1e6:,.1f} M (6N + 12LTC, N = {res['n_params_for_flops']:,} "
          f"without position embeddings); MFU peak: {fmt(res['peak_tflops'], '.4g')} TFLOP/s"
          + ("" if res["peak_tflops"] else " (pass --peak-tflops)"))


# -- time to target on Tiny Shakespeare ---------------------------------------------------------------
def run_to_target(target: float, workdir: str) -> dict:
    """recipes.pretrain.run on shakespeare_char_cpu until val_loss <= target; runs in a subprocess.

    Libraries are imported before the clock starts; the tokenizer cache starts empty (data prep is
    timed). The recipe's own output (log lines, progress bar, sample) is discarded."""
    import transformers  # noqa: F401  (imported up front: the clock measures the run, not imports)

    import data_prep.text  # noqa: F401
    import tune.engine
    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    fit_start = []
    original_fit = tune.engine.Engine.fit

    def timed_fit(self):  # the Engine's elapsed_s counts from fit(); record where fit() began
        fit_start.append(time.time())
        return original_fit(self)

    tune.engine.Engine.fit = timed_fit
    work = Path(workdir)
    overrides = [f"output_dir={work / 'run'}", f"data.corpus={SHAKESPEARE}", f"data.cache_dir={work / 'cache'}",
                 f"train.stop_at_val_loss={target}", "overwrite=true"]
    cfg = load_config(PretrainConfig, "shakespeare_char_cpu", overrides)
    with open(work / "run.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        t0 = time.time()
        result = run(cfg)
        total = time.time() - t0
    evals = [{"step": r["step"], "val_loss": r["val_loss"], "wall_s": fit_start[0] - t0 + r["elapsed_s"]}
             for r in result.history if "val_loss" in r]
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    train_rows = [r for r in result.history if "tokens_per_s" in r]
    return {"target": target, "reached": hit is not None, "step": hit and hit["step"], "wall_s": hit and hit["wall_s"],
            "best_val_loss": min(e["val_loss"] for e in evals), "setup_s": fit_start[0] - t0,
            "run_total_s": total, "max_steps": cfg.train.max_steps, "evals": evals,
            "train_tokens_per_s_median": sorted(r["tokens_per_s"] for r in train_rows)[len(train_rows) // 2],
            "settings": f"{cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}d ctx={cfg.model.block_size}, "
                        f"batch {cfg.train.micro_batch_size}, max_steps {cfg.train.max_steps}, "
                        f"eval every {cfg.train.eval_every} ({cfg.train.eval_batches} batches), "
                        f"mixed_precision={cfg.train.mixed_precision}, compile={cfg.train.compile}"}


def print_target(res: dict, anchor_s: float = 118.0, goal_s: float = 60.0):
    print()
    print_table(["step", "val_loss", "wall s"],
                [[e["step"], f"{e['val_loss']:.4f}", f"{e['wall_s']:.1f}"] for e in res["evals"]],
                title=f"Time to target: shakespeare_char_cpu, val_loss <= {res['target']}")
    print(f"  settings: {res['settings']}")
    if res["reached"]:
        print(f"  reached {res['target']} at step {res['step']} after {res['wall_s']:.1f} s "
              f"(anchor: plain PyTorch loop 118 s -> {anchor_s / res['wall_s']:.2f}x; goal <= {goal_s:.0f} s: "
              f"{'met' if res['wall_s'] <= goal_s else 'NOT met'})")
    else:
        print(f"  did NOT reach {res['target']} within {res['max_steps']} steps; "
              f"best val_loss {res['best_val_loss']:.4f}")
    print(f"  setup before the first step (data prep from a cold cache, model, accelerator): {res['setup_s']:.1f} s; "
          f"run() total incl. final checkpoint, sampling, HF export: {res['run_total_s']:.1f} s")
    print(f"  training tokens/s (median of log rows): {res['train_tokens_per_s_median']:,.0f}")


# -- CLI ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--steps", type=int, help="optimizer steps per implementation (default: per size)")
    p.add_argument("--warmup", type=int, help="leading steps left out of the statistics (default: per size)")
    p.add_argument("--layers", type=int, help="override the size's n_layer")
    p.add_argument("--heads", type=int, help="override the size's n_head")
    p.add_argument("--width", type=int, help="override the size's n_embd")
    p.add_argument("--seq", type=int, help="override the size's sequence length")
    p.add_argument("--batch", type=int, help="override the size's batch size")
    p.add_argument("--vocab", type=int, help="override the size's vocabulary size")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU (default: 989 on CUDA, none on CPU)")
    p.add_argument("--no-target", action="store_true", help="skip the time-to-target run")
    p.add_argument("--plain-loop", action="store_true", help="also time a nanoGPT-style plain loop (compiled on CUDA)")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput comparison")
    p.add_argument("--compile-compare", action="store_true",
                   help="also run our Engine with train.compile off and on, side by side (tokens/s, compile warm-up)")
    p.add_argument("--compile-repeats", type=int, default=3, help="runs per setting for --compile-compare (median)")
    p.add_argument("--target-loss", type=float, default=1.88)
    p.add_argument("--loss-memory", metavar="V1,V2", help="only compare the full-logits and the chunked loss at "
                   "these vocabulary sizes (comma-separated)")
    p.add_argument("--json", help="write all numbers to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shape = dict(SIZES[args.size])
    default_steps, default_warmup = shape.pop("steps"), shape.pop("warmup")
    overrides = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.width, seq=args.seq, batch=args.batch,
                     vocab=args.vocab)
    shape.update({k: v for k, v in overrides.items() if v is not None})
    steps = args.steps or default_steps
    warmup = args.warmup if args.warmup is not None else min(default_warmup, max(steps - 2, 0))
    peak = args.peak_tflops or default_peak_tflops()

    info = banner()
    vocab = args.loss_memory or shape["vocab"]
    settings = {"size": args.size, "shape": f"{shape['n_layer']}L/{shape['n_head']}H/{shape['n_embd']}d, "
                                            f"vocab {vocab}, seq {shape['seq']}, batch {shape['batch']}",
                "steps": f"{steps} per implementation, first {warmup} intervals skipped as warm-up",
                "optimizer": f"AdamW lr {LR}, betas {BETAS}, weight decay {WEIGHT_DECAY}, grad clip {GRAD_CLIP}",
                "data": "random tokens, fixed length, identical for both"}
    print("bench_pretrain")
    print_banner(info, settings)
    out = {"banner": info, "settings": {**settings, "shape_dict": shape, "warmup": warmup}}

    if args.loss_memory:
        res = loss_memory(shape, [int(v) for v in args.loss_memory.split(",")], steps, warmup)
        print_loss_memory(res, shape)
        out["loss_memory"] = res
    elif not args.no_throughput:
        res = throughput(shape, steps, warmup, peak, plain_loop=args.plain_loop)
        print_throughput(res)
        out["throughput"] = res
    if args.compile_compare:
        res = compile_comparison(shape, steps, warmup, args.compile_repeats)
        print_compile_comparison(res)
        out["compile_comparison"] = res
    if args.size == "cpu" and not args.no_target and not args.loss_memory:
        if not SHAKESPEARE.is_file():
            print(f"\nTime to target skipped: {SHAKESPEARE} not found")
        else:
            print(f"\nrunning shakespeare_char_cpu to val_loss <= {args.target_loss} ...", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                res = isolated(run_to_target, args.target_loss, tmp)
            print_target(res)
            out["time_to_target"] = res
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
