"""The GPU check: one prepared command that proves the GPU path and measures it against the baselines.

    python -m bench.gpu_check --out DIR [--ni-tasks DIR] [--budget-s 480] [--smoke]

1. Dependencies, first, in seconds: every package gpt-tune needs (pyproject.toml) must import, a CUDA device
   must exist (unless --smoke) and --ni-tasks must hold the NI task JSON files. Otherwise it stops with the
   list of what is missing and the fix (pip command with the versions from constraints.txt), exit status 2.
   TRL and Liger-Kernel are optional.
2. The fast correctness checks on the device (seconds each, no time cap): the engine's bf16 step against
   fp32, torch.compile on/off, FlexAttention against the dense-mask packed path, exact resume under bf16,
   QLoRA forward/backward and merge, a distillation step with a 4-bit teacher, int8 / nf4 inference (load,
   generate, logits against the unquantized model, `tune quantize` reload), 8-bit / paged AdamW, CPU
   activation offloading, Liger's fused cross-entropy against ours (when installed), the classify recipe (GPT-1
   task head) end to end in bf16 with its HF export, a Mixture-of-Experts GPT in bf16 against fp32 with its Mixtral
   export, `tune plan`'s peak memory against max_memory_allocated for full / LoRA / QLoRA (bench/bench_plan.py;
   three fresh processes, the slowest fast check). Each states its tolerance.
3. Benchmarks at the GPU shapes of bench/ (each side in a fresh process), capped at shares of the budget left
   (pretraining 25%, fine-tuning 55%, distillation 20%): GPT-2 124M pretraining against HF Trainer and a
   compiled plain loop; LoRA / QLoRA / full fine-tuning on the real NI prompts with Llama-1.1B shapes against
   HF Trainer + PEFT (+ TRL SFT with packing when TRL is importable); distillation 1.1B -> 124M, live and
   cached, against the student alone. Opt-in (`--only moe`, about 3 minutes): bench/bench_moe.py at its gpu size,
   the MoE against dense models with its active and its total parameters on Tiny Shakespeare (--corpus).
4. The long checks with what is left of --budget-s (each skipped, and named so, under 60 s): QLoRA under
   FSDP2 (bench/qlora_fsdp_check.py) and the test suite's CUDA tests plus the fast-path / flex / loss test
   files on the GPU.

Every check reports ok, FAIL or skipped (and why). Writes DIR/gpu_check.md (the report for BENCHMARKS.md) and
DIR/gpu_check.json and ends with a one-line summary; exit status 1 when a check FAILED or a benchmark (or one
of its sides) errored. The benchmarks and long checks end within --budget-s (counted from the start; the fast
checks take seconds on a GPU); the default 480 s fits one 600 s device command with start-up. --smoke runs the same script end to end on CPU with tiny
shapes (CI runs it, so it cannot rot); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NI_TASKS = REPO.parent / "shared" / "data" / "natural_instructions" / "tasks"
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
OPTIONAL = {"trl": "trl", "liger-kernel": "liger_kernel"}  # pip name -> module
MODULE_OF = {"pyyaml": "yaml", "rouge-score": "rouge_score"}  # pip names whose module is named otherwise

# Targets from ../shared/BENCHMARKS.md (one H100, 2026-11-23), which the report compares against.
PLAIN_LOOP_TOKENS_S = 438_000  # GPT-2 124M, compiled nanoGPT-style loop
LORA_NI_ANCHOR = {"impl": "TRL SFTTrainer + PEFT, packing", "tokens_per_s": 8_522, "peak_gib": 4.3}


# -- 1. dependencies ------------------------------------------------------------------------------------------
def required_packages() -> list[str]:
    """The pip names of pyproject.toml's [project] dependencies."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip() for d in deps]


def pinned_versions() -> dict[str, str]:
    """{pip name (lower case): version} from constraints.txt."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def missing_packages(names: list[str]) -> list[str]:
    """The pip names among `names` whose module cannot be found."""
    def module(name):
        return MODULE_OF.get(name, name.replace("-", "_"))

    return [n for n in names if importlib.util.find_spec(module(n)) is None]


def check_dependencies(smoke: bool) -> list[str]:
    """Problems that stop the check before it starts (one line each), or []."""
    import torch  # the one package the GPU image is sure to have

    problems = []
    missing = [n for n in missing_packages(required_packages()) if n != "torch"]
    if missing:
        pins = pinned_versions()
        spec = " ".join(f"{n}=={pins[n.lower()]}" if n.lower() in pins else n for n in missing)
        problems.append(f"missing packages: {', '.join(missing)}; install them with: "
                        f"pip install {spec}  (no internet on the machine: bring them as wheels)")
    if not smoke and not torch.cuda.is_available():
        problems.append("no CUDA device is visible (torch.cuda.is_available() is False); "
                        "run with --smoke for the CPU dry run")
    return problems


# -- the device context ----------------------------------------------------------------------------------------
class Context:
    """Shapes and settings of one run: real ones on a GPU, tiny ones with --smoke."""

    def __init__(self, smoke: bool, ni_tasks: Path, workdir: Path, corpus: Path = DEFAULT_CORPUS):
        import torch

        self.smoke, self.ni_tasks, self.workdir, self.corpus = smoke, ni_tasks, workdir, corpus
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        # the native model of the correctness checks: GPT-2 layout (learned positions) and the modern one
        self.native = (dict(n_layer=2, n_head=2, n_embd=64, vocab=256, seq=32, batch=2) if smoke else
                       dict(n_layer=4, n_head=8, n_embd=512, vocab=8192, seq=512, batch=8))
        self.steps = 4 if smoke else 12
        self.precision = "bf16"  # CPU autocast has bf16 too, so --smoke runs the same path

    def tmp(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class TokenBatches:
    """`distinct` fixed random-token batches (every position a target) cycled by step, as the engine wants them;
    few enough that a model memorises them, so a working step visibly lowers the loss."""

    def __init__(self, vocab: int, seq: int, batch: int, distinct: int = 2, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (distinct + 1, batch, seq + 1), generator=g)

    def _batch(self, i: int) -> dict:
        x = self.data[i]
        return {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}

    def step_batches(self, step, rank, world):
        return [self._batch((step - 1) % (len(self.data) - 1))]

    def val_batches(self, rank, world, limit):
        yield self._batch(len(self.data) - 1)


def native_model(ctx: Context, preset: str = "gpt2-124m", **overrides):
    import torch

    from tune.models.gpt import GPT, config_from_preset

    s = ctx.native
    torch.manual_seed(0)
    return GPT(config_from_preset(preset, **{**dict(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                                                   block_size=s["seq"], vocab_size=s["vocab"], dropout=0.0),
                                             **overrides}))


def train_native(ctx: Context, name: str, preset: str = "gpt2-124m", model=None, loss_fn=None, **train) -> dict:
    """Train a native GPT on TokenBatches with the Engine; returns its per-step losses, grad norms, metrics rows and
    model."""
    from accelerate.state import AcceleratorState

    from tune.engine import Engine, TrainConfig
    from tune.losses import causal_lm_loss

    AcceleratorState._reset_state(True)  # Accelerate keeps one state per process; each run sets its own precision
    s = ctx.native
    settings = dict(max_steps=ctx.steps, micro_batch_size=s["batch"], lr=1e-3, min_lr=1e-4, warmup_steps=0,
                    eval_every=0, eval_batches=1, log_every=1, mixed_precision=ctx.precision, progress=False)
    cfg = TrainConfig(**{**settings, **train})
    source = TokenBatches(s["vocab"], s["seq"], s["batch"])
    model = model if model is not None else native_model(ctx, preset)
    result = Engine(cfg, ctx.tmp(name), model, source, loss_fn=loss_fn or causal_lm_loss, log=lambda line: None).fit()
    rows = [r for r in result.history if "loss" in r]
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows], "rows": rows,
            "model": result.model}


def relative_gap(a: list[float], b: list[float]) -> float:
    """max_i |a_i - b_i| / |b_i| (inf when a value is not finite or the lengths differ)."""
    if len(a) != len(b) or not all(math.isfinite(x) for x in a + b):
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def outcome(ok: bool, detail: str, **values) -> dict:
    return {"ok": bool(ok), "detail": detail, **values}


# -- 2. correctness checks ----------------------------------------------------------------------------------------
def check_bf16_step(ctx: Context) -> dict:
    """The engine's bf16 autocast step tracks the fp32 one: per-step losses within 2% (bf16 keeps 8 mantissa
    bits; 12 steps of Adam compound that), all finite, and the loss falls."""
    bf16 = train_native(ctx, "bf16")["losses"]
    fp32 = train_native(ctx, "fp32", mixed_precision="no")["losses"]
    gap = relative_gap(bf16, fp32)
    return outcome(gap <= 0.02 and bf16[-1] < bf16[0], f"max relative loss gap {gap:.2e} (tolerance 2e-2); "
                   f"loss {bf16[0]:.3f} -> {bf16[-1]:.3f}", gap=gap, bf16=bf16, fp32=fp32)


def check_compile(ctx: Context) -> dict:
    """train.compile (regional, per block) gives the eager losses: the first step within 1e-3 relative (bf16,
    different fusion) and every step within 2e-2."""
    eager = train_native(ctx, "eager", preset="tiny-modern")["losses"]
    start = time.time()
    compiled = train_native(ctx, "compiled", preset="tiny-modern", compile=True)["losses"]
    gap, first = relative_gap(compiled, eager), relative_gap(compiled[:1], eager[:1])
    return outcome(first <= 1e-3 and gap <= 0.02, f"first step gap {first:.2e} (1e-3), max gap {gap:.2e} (2e-2), "
                   f"compiled run {time.time() - start:.0f} s incl. compilation", gap=gap, first_step_gap=first)


def check_moe(ctx: Context) -> dict:
    """A Mixture-of-Experts GPT (modern layout, 8 SwiGLU experts, top-2) on the device: the bf16 step tracks the fp32
    one (per-step losses within 3%: bf16 can flip a near-tied top-2 choice, where a token then meets other experts),
    the loss falls, the logged expert shares sum to 1 at every step, and its MixtralForCausalLM export computes the
    trained model's logits on the device (fp32, 1e-4: the two dispatch orders sum the experts differently)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tune.models.export import export_hf

    moe = dict(n_experts=8, moe_top_k=2, tie_embeddings=False)
    bf16 = train_native(ctx, "moe_bf16", preset="tiny-moe", model=native_model(ctx, "tiny-moe", **moe))
    fp32 = train_native(ctx, "moe_fp32", preset="tiny-moe", model=native_model(ctx, "tiny-moe", **moe),
                        mixed_precision="no")
    gap = relative_gap(bf16["losses"], fp32["losses"])
    share_sums = [sum(v for k, v in r.items() if k.startswith("expert_frac_")) for r in bf16["rows"]]
    share_gap = max(abs(x - 1) for x in share_sums)
    model = fp32["model"].float().eval()
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model.cpu(), ctx.tmp("moe_hf"))).to(ctx.device).eval()
    model.to(ctx.device)
    x = torch.randint(0, ctx.native["vocab"], (2, ctx.native["seq"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_gap = (hf(x.to(ctx.device)).logits - model(x.to(ctx.device))).abs().max().item()
    losses = bf16["losses"]
    ok = gap <= 0.03 and losses[-1] < losses[0] and share_gap <= 1e-3 and logits_gap <= 1e-4
    return outcome(ok, f"max relative loss gap bf16/fp32 {gap:.2e} (tolerance 3e-2); loss {losses[0]:.3f} -> "
                   f"{losses[-1]:.3f}; expert shares sum to 1 within {share_gap:.1e}; Mixtral export logits within "
                   f"{logits_gap:.1e} (tolerance 1e-4)", gap=gap, logits_gap=logits_gap, bf16=losses,
                   fp32=fp32["losses"])


def packed_batch(vocab: int, lengths: list[list[int]], attention: str, seed: int = 0) -> dict:
    """A packed micro-batch of random examples (row b holds examples of lengths[b]) in one attention mode."""
    import torch

    from tune.packing import collate_packed

    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in lengths:
        pack = []
        for n in row:
            ids = torch.randint(1, vocab, (n,), generator=g).tolist()
            pack.append({"input_ids": ids, "targets": ids[1:] + [0]})
        rows.append(pack)
    width = max(sum(r) for r in lengths)
    return collate_packed(rows, width, 0, mask_mode=attention)


def check_flex_attention(ctx: Context) -> dict:
    """FlexAttention (document ids, no dense mask) gives the dense-mask packed loss and gradients, for the
    native modern layout (RoPE, GQA) and an HF Llama: loss within 1e-3 relative under bf16 (2e-5 fp32). On CPU
    (--smoke) document ids become a dense mask, as in the recipes: the comparison then checks that conversion."""
    import torch

    from tune.losses import causal_lm_loss

    lengths = [[5, 9, 12], [20, 6]] if ctx.smoke else [[300, 700, 1024, 24], [1000, 1000, 48], [2048]]
    vocab = ctx.native["vocab"]
    results = {}
    for kind in ("native", "hf_llama"):
        context = sum(lengths[0]) if ctx.smoke else 2048
        # the dense side through an SDPA model, the flex side through the model the recipes load for flex, with
        # the same weights (transformers' flex path adds a 4D bool mask to the scores instead of masking with it)
        models = {"dense": _flex_model(ctx, kind, context, "dense")}
        models["flex"] = _flex_model(ctx, kind, context, "flex", like=models["dense"])
        losses, grads = {}, {}
        for attention, model in models.items():
            batch = {k: v.to(ctx.device) for k, v in packed_batch(vocab, lengths, _mask_mode(attention)).items()}
            model.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
                total, n = causal_lm_loss(model, batch)
            (total / n).backward()
            losses[attention] = (total / n).item()
            grads[attention] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        gap = abs(losses["flex"] - losses["dense"]) / abs(losses["dense"])
        grad_gap = float((grads["flex"] - grads["dense"]).norm() / grads["dense"].norm())
        results[kind] = {"loss_gap": gap, "grad_gap": grad_gap, **losses}
    tol = 1e-3 if ctx.cuda else 2e-5
    ok = all(r["loss_gap"] <= tol and r["grad_gap"] <= 10 * tol for r in results.values())
    return outcome(ok, "; ".join(f"{k}: loss gap {r['loss_gap']:.1e}, grad gap {r['grad_gap']:.1e}"
                                 for k, r in results.items()) + f" (tolerance {tol:g} loss, {10 * tol:g} grad)", **results)


def _mask_mode(attention: str) -> str:
    from tune.packing import PACKED_ATTENTION

    return PACKED_ATTENTION[attention]


def _flex_model(ctx: Context, kind: str, context: int, attention: str, like=None):
    """The model of one side of check_flex_attention: `kind` native or hf_llama, loaded as the recipes load it
    for data.packed_attention=`attention`; with `like`, its weights copied from that model.

    The native GPT is one model for both modes (it takes FlexAttention on CUDA for document ids and SDPA for a
    4D mask), so `like` is returned as it is. The HF Llama is loaded with attn_implementation "sdpa" for dense
    and "flex_attention" for flex on CUDA ("sdpa" on CPU: the CPU build has no flex backward)."""
    import torch

    if kind == "native":
        if like is not None:
            return like
        from tune.models.gpt import GPT, config_from_preset

        s = ctx.native
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-modern", n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                                       block_size=context, vocab_size=s["vocab"], dropout=0.0))
        return model.to(ctx.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    s = ctx.native
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["n_embd"], intermediate_size=2 * s["n_embd"],
                         num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                         num_key_value_heads=max(1, s["n_head"] // 2), max_position_embeddings=context)
    config._attn_implementation = "flex_attention" if attention == "flex" and ctx.cuda else "sdpa"
    model = LlamaForCausalLM(config).to(ctx.device)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def check_resume(ctx: Context) -> dict:
    """A run stopped halfway and resumed equals the uninterrupted run under bf16: same per-step losses and
    final weights (bit for bit where the kernels are deterministic; the gap is reported)."""
    import shutil

    import torch

    half = ctx.steps // 2
    full = train_native(ctx, "resume_full", save_every=half)
    # the same run as if it had stopped at `half`: its directory with only the halfway checkpoint
    split = ctx.workdir / "resume_split"
    shutil.copytree(ctx.workdir / "resume_full", split)
    for checkpoint in (split / "checkpoints").glob(f"step_{ctx.steps:07d}*"):
        shutil.rmtree(checkpoint)
    rest = train_native(ctx, "resume_split", resume=True, save_every=half)
    losses = rest["losses"]  # history of the resumed run: the first half read back from metrics.jsonl
    gap = relative_gap(losses, full["losses"])
    weights = max(float((a.float() - b.float()).abs().max())
                  for a, b in zip(full["model"].state_dict().values(), rest["model"].state_dict().values()))
    ok = gap <= 1e-6 and weights <= 1e-6
    return outcome(ok, f"loss gap {gap:.1e}, max weight difference {weights:.1e} (tolerance 1e-6; 0 = bit-exact)",
                   loss_gap=gap, weight_gap=weights, deterministic=torch.are_deterministic_algorithms_enabled())


def tiny_hf_dir(ctx: Context, name: str, layout: str = "llama", vocab: int | None = None) -> str:
    """A random tiny HF causal LM saved with a tokenizer-free config (ids only)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    s = ctx.native
    out = ctx.tmp(name)
    vocab = vocab or s["vocab"]
    torch.manual_seed(1)
    if layout == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=s["n_embd"] * 2, intermediate_size=s["n_embd"] * 4,
                             num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                             num_key_value_heads=max(1, s["n_head"] // 2), max_position_embeddings=s["seq"],
                             bos_token_id=0, eos_token_id=0)
    else:
        config = GPT2Config(vocab_size=vocab, n_positions=s["seq"], n_layer=s["n_layer"], n_head=s["n_head"],
                            n_embd=s["n_embd"] * 2, bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return str(out)


def check_qlora(ctx: Context) -> dict:
    """QLoRA on the device: 4-bit nf4 base + LoRA trains (finite, falling loss), the adapter merges, and the
    merged model computes what the adapter model computes (logits within 2% of their scale: the 4-bit layer's
    bf16 kernel against a dense bf16 matmul)."""
    import torch

    from tune.adapters import LoraSection, QuantSection, add_lora, load_base_model, merge_adapter
    from tune.hf import resolve_dtype

    base = tiny_hf_dir(ctx, "qlora_base")
    dtype = resolve_dtype("auto") if ctx.cuda else torch.float32
    model = add_lora(load_base_model(base, "qlora", dtype, QuantSection()), LoraSection(r=8, alpha=16, dropout=0.0))
    run = train_native(ctx, "qlora_run", model=model, lr=2e-3)
    adapter = ctx.tmp("qlora_adapter")
    trained = run["model"].eval()
    trained.save_pretrained(adapter)
    merged_dir = merge_adapter(base, adapter, ctx.tmp("qlora_merged"), dtype=dtype, quant=QuantSection())
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).to(ctx.device).eval()
    ids = TokenBatches(ctx.native["vocab"], ctx.native["seq"], 2, seed=5).data[0][:, :-1].to(ctx.device)
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
    gap = float((a - b).abs().max() / a.abs().max())
    losses = run["losses"]
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] and gap <= 0.02
    return outcome(ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged vs adapter logits gap {gap:.1e} of their "
                   "scale (tolerance 2e-2)", losses=losses, merge_gap=gap)


def check_distill_4bit_teacher(ctx: Context) -> dict:
    """A distillation run from a 4-bit (nf4) teacher: finite KD and CE terms, falling loss."""
    import torch

    from tune.distill import kd_loss_fn, load_teacher
    from tune.hf import resolve_dtype

    teacher_dir = tiny_hf_dir(ctx, "teacher", layout="llama")
    dtype = resolve_dtype("auto") if ctx.cuda else torch.float32
    teacher = load_teacher(teacher_dir, dtype, "4bit", ctx.device)
    loss_fn = kd_loss_fn(teacher, 0.5, 2.0, "forward_kl", 0.5, ctx.native["vocab"])
    run = train_native(ctx, "distill", loss_fn=loss_fn)
    losses = run["losses"]
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    return outcome(ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} with the teacher in 4-bit", losses=losses)


def check_quant_generate(ctx: Context) -> dict:
    """Quantized inference on the device (tests/test_quantize.py's tolerances): a random GPT-2-layout model loaded
    int8 and nf4 by tune.hf.load_model generates greedily, its logits stay within 3% (int8) / 15% (nf4) of the
    logit scale of the unquantized model's (LLM.int8's absmax rounding; 4-bit levels are ~16x coarser), and the
    `tune quantize` checkpoint reloads with the logits of the direct quantized load (1e-2 of their scale)."""
    import contextlib
    import io

    import torch

    from tune.cli import main as tune_main
    from tune.hf import load_model

    base = tiny_hf_dir(ctx, "quant_base", layout="gpt2")
    ids = TokenBatches(ctx.native["vocab"], ctx.native["seq"], 2, seed=7).data[0][:, :32].to(ctx.device)
    with torch.no_grad():
        reference = load_model(base, dtype="fp32", device=ctx.device)(input_ids=ids).logits.float()
    scale = float(reference.abs().max())
    tolerance = {"int8": 0.03, "nf4": 0.15}
    results, ok = {}, True
    for kind, limit in tolerance.items():
        model = load_model(base, dtype="auto" if ctx.cuda else "fp32", device=ctx.device, quant=kind)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            start = time.perf_counter()
            out = model.generate(ids[:1, :8], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            speed = 16 / (time.perf_counter() - start)
        gap = float((logits - reference).abs().max()) / scale
        saved = ctx.workdir / f"quantized_{kind}"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = tune_main(["quantize", base, str(saved), "--quant", kind, "--force"])
        with torch.no_grad():
            reloaded = load_model(saved, device=ctx.device)(input_ids=ids).logits.float() if code == 0 else None
        reload_gap = float((reloaded - logits).abs().max()) / scale if reloaded is not None else math.inf
        results[kind] = {"gap": gap, "reload_gap": reload_gap, "tokens_per_s": speed,
                         "memory_bytes": model.get_memory_footprint()}
        ok = ok and 0 < gap <= limit and reload_gap <= 1e-2 and out.shape[1] == 24 and bool(logits.isfinite().all())
    detail = "; ".join(f"{k}: logits gap {r['gap']:.1e} of scale (tolerance {tolerance[k]:.2f}), reload gap "
                       f"{r['reload_gap']:.1e} (1e-2), {r['tokens_per_s']:.0f} tokens/s greedy"
                       for k, r in results.items())
    return outcome(ok, detail, **results)


def check_optimizers(ctx: Context) -> dict:
    """bitsandbytes' 8-bit and paged AdamW track torch's AdamW: final loss within 5% (8-bit states quantize the
    moments; paged fp32 AdamW should agree to ~1e-3)."""
    reference = train_native(ctx, "adamw")["losses"]
    results = {}
    for name in ("adamw_8bit", "paged_adamw", "paged_adamw_8bit"):
        if not ctx.cuda and name.startswith("paged"):
            results[name] = {"skipped": "paged optimizers need CUDA"}
            continue
        losses = train_native(ctx, name, optimizer=name)["losses"]
        results[name] = {"final_gap": relative_gap(losses[-1:], reference[-1:]), "losses": losses}
    gaps = {k: r["final_gap"] for k, r in results.items() if "final_gap" in r}
    return outcome(all(g <= 0.05 for g in gaps.values()),
                   ", ".join(f"{k} {g:.1e}" for k, g in gaps.items()) + " final-loss gap (tolerance 5e-2)"
                   + "".join(f"; {k} skipped ({r['skipped']})" for k, r in results.items() if "skipped" in r), **results)


def check_activation_offload(ctx: Context) -> dict:
    """Saved activations in pinned CPU memory change nothing numerically: losses equal to 1e-6."""
    on = train_native(ctx, "offload_on", activation_offload=True)["losses"]
    off = train_native(ctx, "offload_off")["losses"]
    gap = relative_gap(on, off)
    return outcome(gap <= 1e-6, f"loss gap {gap:.1e} (tolerance 1e-6)", gap=gap)


def check_liger(ctx: Context) -> dict:
    """Liger-Kernel's fused linear cross-entropy against ours (optional: needs liger-kernel and CUDA)."""
    if importlib.util.find_spec("liger_kernel") is None or not ctx.cuda:
        reason = "liger-kernel not installed" if ctx.cuda else "needs CUDA"
        return {"skipped": reason, "detail": f"skipped: {reason}"}
    from bench.ce_parity import liger_parity

    result = liger_parity(ctx.device)
    return outcome(result["ok"], result["detail"], **{k: v for k, v in result.items() if k not in ("ok", "detail")})


def check_classify(ctx: Context) -> dict:
    """The classify recipe (GPT-1 task head + auxiliary LM loss) end to end in bf16 on the device, on a real NI task
    (Sentiment140): a random GPT-2 layout base of the checks' size with a BPE tokenizer trained on the task's
    inputs, 5 epochs (2 with --smoke), then its HF export. ok when the training losses are finite and the exported
    GPT2ForSequenceClassification gives the run's held-out probabilities (within 1e-3). Reports the wall time, steps
    per second and the held-out accuracy beside the majority class (a random base: the figures are the recipe's
    speed on the device, not a result)."""
    import torch
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from data_prep.task_data import SpecialTokens, encode_rows
    from data_prep.text import train_bpe_tokenizer
    from recipes.classify import ClassifyConfig, load_task_data, run
    from tune.config import load_config
    from tune.task_heads import collate_task

    task = ctx.ni_tasks / "task195_sentiment140_classification.json"
    if not task.is_file():
        return {"skipped": f"{task.name} not in --ni-tasks", "detail": f"skipped: {task.name} not in --ni-tasks"}
    s = ctx.native
    texts = [i["input"] for i in json.loads(task.read_text(encoding="utf-8"))["Instances"]]
    tokenizer = train_bpe_tokenizer(texts, 512 if ctx.smoke else 4096)
    base = ctx.tmp("classify_base")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=s["seq"], n_layer=s["n_layer"],
                               n_head=s["n_head"], n_embd=s["n_embd"], bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = ctx.tmp("classify_run")
    cfg = load_config(ClassifyConfig, data={
        "output_dir": str(out), "base_model": str(base), "overwrite": True, "epochs": 2 if ctx.smoke else 5,
        "data": {"ni_task": str(task), "heldout_instances": 30, "max_length": s["seq"]},
        "train": {"mixed_precision": ctx.precision, "lr": 1e-3, "micro_batch_size": 8, "grad_accum_steps": 1,
                  "eval_every": 0, "progress": False, "log_every": 1}})
    AcceleratorState._reset_state(True)
    start = time.time()
    run(cfg)
    seconds = time.time() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    results = json.loads((out / "eval_results.json").read_text())
    run_probs = torch.tensor([json.loads(line)["probabilities"]
                              for line in (out / "predictions.jsonl").read_text().splitlines()])
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf").to(ctx.device).eval()
    meta = json.loads((out / "hf" / "task.json").read_text())
    _, held, _ = load_task_data(cfg, lambda *a, **k: None)
    examples, _ = encode_rows(held, tokenizer, SpecialTokens(**meta["token_ids"]), meta["max_length"])
    batch = collate_task(examples, "classification", tokenizer.pad_token_id)
    with torch.no_grad():
        hf_probs = hf(input_ids=batch["input_ids"].to(ctx.device),
                      attention_mask=batch["attention_mask"].to(ctx.device)).logits.float().softmax(-1).cpu()
    gap = float((hf_probs - run_probs).abs().max())
    ok = bool(losses) and all(math.isfinite(x) for x in losses) and gap <= 1e-3
    return outcome(ok, f"{len(losses)} bf16 steps in {seconds:.1f} s end to end (export and evaluation included), "
                   f"held-out accuracy {results['task_head']['accuracy']:.1f} (majority "
                   f"{results['majority']['accuracy']:.1f}, random base); export vs run probabilities gap {gap:.1e} "
                   "(tolerance 1e-3)", seconds=seconds, steps=len(losses), losses=losses, gap=gap,
                   accuracy=results["task_head"]["accuracy"], majority=results["majority"]["accuracy"])


PLAN_TOLERANCE = 0.15  # tune plan's peak memory within 15% of the measured one (the bar)


def check_plan_memory(ctx: Context) -> dict:
    """`tune plan`'s per-process peak memory against torch.cuda.max_memory_allocated over real bf16 training steps
    (bench/bench_plan.py: full with fp32 master weights under autocast, LoRA and QLoRA on a bf16 / 4-bit base; GPT-2
    layout, 12 x 768, 8 x 512 tokens), each in a fresh process: planned / measured within 1 +- PLAN_TOLERANCE.
    --smoke (CPU): the full method of a tiny model through the same code, the numbers reported, no tolerance (a
    tiny model's peak is mostly fixed overhead)."""
    from bench.bench_plan import SIZES, compare, write_model

    size = SIZES["large"] if ctx.cuda else dict(n_layer=1, n_embd=64, n_head=2, vocab_size=256, n_positions=64)
    batch, seq = (8, 512) if ctx.cuda else (2, 32)
    model_dir = write_model(ctx.tmp("plan_model"), size)
    methods = ("full", "lora", "qlora") if ctx.cuda else ("full",)
    rows = {m: compare(model_dir, m, batch, seq, steps=3 if ctx.cuda else 1, mixed_precision=ctx.precision)
            for m in methods}
    ratios = {m: round(r["ratio"], 3) for m, r in rows.items()}
    within = all(abs(r - 1) <= PLAN_TOLERANCE for r in ratios.values())
    ok = all(r["measured_bytes"] > 0 and r["planned_bytes"] > 0 for r in rows.values()) and (within or not ctx.cuda)
    detail = "; ".join(f"{m} planned {r['planned_bytes'] / 2**20:,.0f} MiB / measured {r['measured_bytes'] / 2**20:,.0f} "
                       f"MiB = {r['ratio']:.2f}" for m, r in rows.items())
    return outcome(ok, detail + (f" (tolerance +-{PLAN_TOLERANCE:.0%})" if ctx.cuda else " (smoke: no tolerance)"),
                   ratios=ratios, planned={m: r["planned_bytes"] for m, r in rows.items()},
                   measured={m: r["measured_bytes"] for m, r in rows.items()}, measured_with=rows["full"]["measured_with"])


def check_qlora_fsdp(ctx: Context, timeout_s: float) -> dict:
    """QLoRA under FSDP2 (bench/qlora_fsdp_check.py): one 4-bit layer unchanged by fully_shard, and the finetune
    recipe under `accelerate launch` + fsdp.yaml on every visible GPU against one process, all within
    `timeout_s` seconds (a process still running then is killed: the check fails)."""
    if ctx.smoke:  # 2 CPU processes, ~50 s: tests/test_fsdp.py runs that in the slow set
        return {"skipped": "smoke", "detail": "skipped in --smoke (its CPU run: pytest -m slow tests/test_fsdp.py)"}
    from bench.qlora_fsdp_check import check

    return check(ctx.tmp("qlora_fsdp"), ctx.ni_tasks, smoke=False, timeout=timeout_s)


def check_cuda_tests(ctx: Context, timeout_s: float) -> dict:
    """The test suite's GPU-relevant tests on the GPU: the CUDA-only ones (`-k cuda`, skipped on CPU CI:
    FlexAttention forward/backward against each example alone, ...) and the fast-path, flex and loss test files
    without the slow tests, which there train on CUDA (sync-free steps, pinned copies, compile). Needs pytest.
    Each of the two pytest runs gets half of `timeout_s`; one still running then is killed (the check fails)."""
    import subprocess

    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest not installed", "detail": "skipped: pytest not installed"}
    if not ctx.cuda:
        return {"skipped": "needs CUDA", "detail": "skipped: needs CUDA"}
    files = ["tests/test_fast_path.py", "tests/test_flex_attention.py", "tests/test_losses.py"]
    summaries, outputs, ok = [], [], True
    for args in (["tests", "-k", "cuda"], files):  # pyproject's addopts leave the slow tests out
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout_s / 2)
        summaries.append(f"pytest {' '.join(args)}: " + (proc.stdout.strip().splitlines() or ["no output"])[-1])
        outputs.append(proc.stdout[-4000:])
        ok = ok and proc.returncode in (0, 5)  # 5: nothing collected
    return outcome(ok, "; ".join(summaries), output=outputs)


# the fast checks (seconds each on a GPU) run first, before the benchmarks; the long ones (minutes) last, with
# what is left of --budget-s
FAST_CHECKS = {
    "bf16_step": check_bf16_step,
    "compile": check_compile,
    "flex_attention": check_flex_attention,
    "resume_bf16": check_resume,
    "qlora": check_qlora,
    "distill_4bit_teacher": check_distill_4bit_teacher,
    "quant_generate": check_quant_generate,
    "optimizers": check_optimizers,
    "activation_offload": check_activation_offload,
    "liger": check_liger,
    "classify_bf16": check_classify,
    "moe_bf16": check_moe,
    "plan_memory": check_plan_memory,
}
LONG_CHECKS = {"qlora_fsdp": check_qlora_fsdp, "cuda_tests": check_cuda_tests}  # fn(ctx, timeout_s)
CHECKS = {**FAST_CHECKS, **LONG_CHECKS}
DETERMINISTIC = ("resume_bf16", "activation_offload")  # compared to 1e-6: run with deterministic kernels on CUDA
MIN_LONG_CHECK_S = 60  # a long check with less left is skipped, not started


def status(r: dict) -> str:
    """A check result's status: "ok", "FAIL" or "skipped" (not run: a missing optional package, no CUDA,
    --smoke, the time budget spent)."""
    return "skipped" if "skipped" in r else ("ok" if r["ok"] else "FAIL")


def _deterministic(ctx: Context, name: str):
    """The context to run check `name` in: torch.use_deterministic_algorithms(True, warn_only=True) for the
    DETERMINISTIC checks on CUDA (restored afterwards), else nothing. Yields a note for the check's detail."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        if name not in DETERMINISTIC:
            yield ""
            return
        if not ctx.cuda:
            yield "; deterministic algorithms: not set (CPU)"
            return
        before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield (f"; deterministic algorithms on (warn_only), "
                   f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG', 'unset')}")
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    return scope()


def run_check(ctx: Context, name: str, *args) -> dict:
    """Run one check; a check that crashes is a failed check (its traceback kept), and the others still run."""
    print(f"check {name} ...", flush=True)
    start = time.time()
    try:
        with _deterministic(ctx, name) as note:
            r = CHECKS[name](ctx, *args)
            r["detail"] += note
    except Exception as e:
        r = {"ok": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
             "traceback": traceback.format_exc()}
    r["status"] = status(r)
    r.pop("ok", None)
    r["seconds"] = round(time.time() - start, 1)
    shown = r["detail"] if r["detail"].startswith(r["status"]) else f"{r['status']:<7} {r['detail']}"
    print(f"  {shown} ({r['seconds']} s)", flush=True)
    return r


def run_long_checks(ctx: Context, names: list[str], budget_s: float, started: float) -> dict:
    """The LONG_CHECKS in `names`, each with an equal share of what is left of `budget_s` (at least
    MIN_LONG_CHECK_S) as its timeout; skipped (and named so in the report) when less than MIN_LONG_CHECK_S
    seconds are left when its turn comes."""
    results = {}
    for i, name in enumerate(names):
        left = budget_s - (time.time() - started)
        share = max(left / (len(names) - i), min(left, MIN_LONG_CHECK_S))
        if left < MIN_LONG_CHECK_S:
            results[name] = {"status": "skipped", "skipped": "budget spent",
                             "detail": f"skipped: {max(left, 0):.0f} s of the time budget ({budget_s:.0f} s) left; "
                                       f"run it alone: python -m bench.gpu_check --only {name}", "seconds": 0.0}
            print(f"check {name}: skipped, budget spent", flush=True)
            continue
        results[name] = run_check(ctx, name, share)
    return results


# -- 3. benchmarks --------------------------------------------------------------------------------------------------
def bench_pretrain(ctx: Context, cap_s: float) -> dict:
    from bench import bench_pretrain as bp
    from bench.common import default_peak_tflops

    shape = dict(bp.SIZES["smoke" if ctx.smoke else "gpt2-124m"])
    steps, warmup = shape.pop("steps"), shape.pop("warmup")
    return bp.throughput(shape, steps, warmup, default_peak_tflops(), plain_loop=True, timeout=cap_s)


def bench_finetune(ctx: Context, cap_s: float) -> dict:
    from bench import bench_finetune as bf

    shape = dict(bf.SIZES["smoke" if ctx.smoke else "llama-1.1b"])
    steps, warmup = shape.pop("steps"), shape.pop("warmup")
    with tempfile.TemporaryDirectory() as tmp:
        data = bf.prepare(shape, Path(tmp), ctx.ni_tasks)
        rows = max(1, round(shape["batch"] / data["examples_per_pack"]))
        methods = ("lora", "qlora") if ctx.smoke else ("lora", "qlora", "full")  # smoke: full is lora's code path
        trl = importlib.util.find_spec("trl") is not None
        runs = 2 * len(methods) + 2 + (len(methods) if trl else 0)
        # LoRA (the target workload) with both packed-attention modes: FlexAttention's gain on the GPU
        results = bf.compare(methods[:1], shape, data, steps, warmup, rows, None, packed_attention=("flex", "dense"),
                             timeout=cap_s / runs, trl=trl)
        results.update(bf.compare(methods[1:], shape, data, steps, warmup, rows, None, timeout=cap_s / runs, trl=trl))
    results["data"] = {k: v for k, v in data.items() if k not in ("train", "val", "model_dir")}
    return results


def bench_distill(ctx: Context, cap_s: float) -> dict:
    from bench import bench_distill as bd

    return bd.measure(dict(bd.SIZES["smoke" if ctx.smoke else "1.1b-124m"]), timeout=cap_s)


def bench_moe(ctx: Context, cap_s: float) -> dict:
    """bench/bench_moe.py at its gpu size (bf16): the MoE against dense models with its active and its total
    parameters, on Tiny Shakespeare (--corpus). Opt-in (--only moe): its three runs take about 3 minutes."""
    from bench import bench_moe as bm

    if not ctx.corpus.is_file():
        return {"skipped": f"--corpus {ctx.corpus}: no such file (Tiny Shakespeare's input.txt)"}
    return bm.compare("smoke" if ctx.smoke else "gpu", corpus=str(ctx.corpus), timeout=cap_s / 3)


# benchmark -> (function, its share of the budget left when the benchmarks start)
BENCHES = {"pretrain": (bench_pretrain, 0.25), "finetune": (bench_finetune, 0.55), "distill": (bench_distill, 0.20),
           "moe": (bench_moe, 0.5)}
OPT_IN = ("moe",)  # run only when --only names them: they do not fit the default budget beside the others


def run_benches(ctx: Context, names: list[str], budget_s: float, started: float) -> dict:
    """The BENCHES in `names`; each is capped at its share of what is left of `budget_s` when it starts (shares
    of the benchmarks still to run, so time one leaves unused goes to the next); skipped under 30 s."""
    results = {}
    for i, name in enumerate(names):
        fn, share = BENCHES[name]
        left = budget_s - (time.time() - started)
        cap = left * share / sum(BENCHES[n][1] for n in names[i:])
        if cap < 30:
            results[name] = {"skipped": f"time budget spent ({budget_s:.0f} s); run it alone: "
                                        f"python -m bench.gpu_check --only {name}"}
            print(f"bench {name}: skipped, budget spent", flush=True)
            continue
        print(f"bench {name} (cap {cap:.0f} s) ...", flush=True)
        start = time.time()
        try:
            results[name] = fn(ctx, cap)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"  FAILED: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}", flush=True)
        results[name]["seconds"] = round(time.time() - start, 1)
    return results


# -- report -----------------------------------------------------------------------------------------------------------
def gib(x) -> str:
    return "n/a" if x is None else f"{x / 1024 ** 3:.2f}"


def tok_s(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _ours(res: dict) -> dict:
    """Our side of one fine-tuning method: "ours", or with both packed-attention modes "ours-flex" (the default)."""
    return res.get("ours") or res.get("ours-flex") or {}


def report_markdown(out: dict) -> str:
    """The report: environment, the checks, and each benchmark's table with ratios and the targets."""
    lines = [f"# GPU check, {out['date']}{' (SMOKE: CPU dry run, figures mean nothing)' if out['smoke'] else ''}", ""]
    lines += [f"- {k}: {v}" for k, v in out["banner"].items()]
    lines += ["", "## Correctness", "", "| check | status | detail | s |", "|---|---|---|---|"]
    for name, r in out["checks"].items():
        shown = {"FAIL": "**FAIL**", "skipped": "*skipped*"}.get(r["status"], r["status"])
        lines.append(f"| {name} | {shown} | {r['detail']} | {r['seconds']} |")
    lines += ["", "## Benchmarks", ""]
    benches = out["benches"]
    p = benches.get("pretrain", {})
    if "ours" in p:
        lines += ["### GPT-2 124M pretraining (random tokens)", "", "| implementation | tokens/s | step ms | peak GiB | MFU % |",
                  "|---|---|---|---|---|"]
        for side in ("baseline", "plain_loop", "ours"):
            r = p.get(side)
            if r and "tokens_per_s" in r:
                mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}"
                lines.append(f"| {r['impl']} | {tok_s(r['tokens_per_s'])} | {r['step_s_median'] * 1e3:.1f} | "
                             f"{gib(r['peak_bytes'])} | {mfu} |")
            elif r:
                lines.append(f"| {side} | failed: {str(r.get('error', ''))[:120]} | | | |")
        for name, q in p.get("ratios", {}).items():
            lines.append(f"\nours / {name}: {q:.2f}x tokens/s")
        if "plain_loop" in p.get("ratios", {}):
            lines.append(f"\ntarget: >= 1.3x the compiled plain loop (anchor {PLAIN_LOOP_TOKENS_S:,} tokens/s on an H100)")
    f = benches.get("finetune", {})
    methods = [m for m in ("lora", "qlora", "full") if m in f]
    if methods:
        lines += ["", "### Fine-tuning on the real NI prompts", "",
                  "| method | implementation | useful tokens/s | peak GiB | ours (flex) / this row, tokens/s |",
                  "|---|---|---|---|---|"]
        for m in methods:
            ours = _ours(f[m])
            for side, r in f[m].items():
                if side in ("ratio_ours_over_baseline", "seconds") or not isinstance(r, dict):
                    continue
                name = r.get("impl", side)
                if "tokens_per_s" not in r:
                    lines.append(f"| {m} | {name} | failed: {str(r.get('error', ''))[:120]} | | |")
                    continue
                ratio = (f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x"
                         if r is not ours and "tokens_per_s" in ours else "")
                lines.append(f"| {m} | {name} | {tok_s(r['tokens_per_s'])} | {gib(r['peak_bytes'])} | {ratio} |")
        lines.append("\nThe ratio column: our default (packed_attention=flex where a method ran both modes) over that "
                     "row's useful tokens/s; blank on our default's own row.")
        lora = _ours(f.get("lora", {}))
        if "tokens_per_s" in lora:
            goal = 8 * LORA_NI_ANCHOR["tokens_per_s"]
            lines.append(f"\ntarget: LoRA >= 8x the best anchor ({LORA_NI_ANCHOR['impl']}, "
                         f"{LORA_NI_ANCHOR['tokens_per_s']:,} tokens/s at {LORA_NI_ANCHOR['peak_gib']} GiB) = "
                         f"{goal:,} tokens/s: measured {lora['tokens_per_s'] / LORA_NI_ANCHOR['tokens_per_s']:.2f}x")
    d = benches.get("distill", {})
    if "sides" in d:
        lines += ["", "### Distillation 1.1B -> 124M (random tokens)", "", "| run | tokens/s | peak GiB | / student alone |",
                  "|---|---|---|---|"]
        alone = d["sides"].get("student alone", {}).get("tokens_per_s")
        for name, r in d["sides"].items():
            if "tokens_per_s" in r:
                ratio = f"{r['tokens_per_s'] / alone:.2f}x" if alone else ""
                lines.append(f"| {name} | {tok_s(r['tokens_per_s'])} | {gib(r['peak_bytes'])} | {ratio} |")
            else:
                lines.append(f"| {name} | failed: {str(r.get('error', ''))[:120]} | | |")
    m = benches.get("moe", {})
    if "results" in m:
        from bench.bench_moe import HEADERS, table_rows

        lines += ["", f"### Mixture of Experts vs dense (Tiny Shakespeare characters, {m['settings']['steps']} steps, "
                      f"same time = {m['time_cap_s']:.0f} s)", "", "| " + " | ".join(HEADERS) + " |",
                  "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(m)]
    for name, r in benches.items():
        if "skipped" in r or "error" in r:
            lines.append(f"\n{name}: {r.get('skipped') or 'FAILED: ' + r['error'].splitlines()[0]}")
    lines.append(f"\nTotal {out['seconds']:.0f} s (budget {out['budget_s']:.0f} s). {summary(out)}")
    return "\n".join(lines) + "\n"


def bench_errors(benches: dict) -> list[str]:
    """The benchmarks that errored, whole ("finetune") or one side ("pretrain ours", "finetune qlora/baseline")."""
    errors = []
    for name, r in benches.items():
        if "error" in r:
            errors.append(name)
        for side, v in r.items():
            if isinstance(v, dict) and "error" in v:
                errors.append(f"{name} {side}")
            elif isinstance(v, dict):  # fine-tuning: method -> side -> result; distillation: sides -> run -> result
                errors += [f"{name} {side}/{k}" for k, w in v.items() if isinstance(w, dict) and "error" in w]
    return errors


def summary(out: dict) -> str:
    """One line: what FAILED (checks, benchmark errors) and what was skipped, or that all passed."""
    failed = [n for n, r in out["checks"].items() if r["status"] == "FAIL"]
    errors = bench_errors(out["benches"])
    skipped = ([n for n, r in out["checks"].items() if r["status"] == "skipped"]
               + [n for n, r in out["benches"].items() if "skipped" in r])
    parts = ([f"FAILED checks: {', '.join(failed)}"] if failed else []) + (
        [f"benchmark errors: {', '.join(errors)}"] if errors else [])
    verdict = "; ".join(parts) if parts else "all checks ok, no benchmark errors"
    return verdict + (f" (skipped: {', '.join(skipped)})" if skipped else "")


# -- main ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.md and gpu_check.json")
    p.add_argument("--ni-tasks", default=str(DEFAULT_NI_TASKS), help="the Natural-Instructions task folder "
                                                                     "(default: ../shared/data/natural_instructions/tasks)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                   help="Tiny Shakespeare's input.txt, for the opt-in moe benchmark (default: ../shared/data/...)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds for everything (default 480: fits a 600 s device command with start-up): the fast "
                        "checks, then the benchmarks capped at shares of what is left, then qlora_fsdp and cuda_tests "
                        "with the rest; what does not fit is skipped and named in the report")
    p.add_argument("--smoke", action="store_true", help="run on CPU with tiny shapes (CI)")
    p.add_argument("--only", help="comma-separated subset of checks and benchmarks: "
                                  + ",".join([*CHECKS, *BENCHES]))
    return p.parse_args(argv)


def main(argv=None) -> int:
    started = time.time()
    # cuBLAS is deterministic only with a fixed workspace, read when CUDA initialises (the DETERMINISTIC checks)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args = parse_args(argv)
    problems = check_dependencies(args.smoke)
    ni_tasks = Path(args.ni_tasks)
    if not ni_tasks.is_dir():
        problems.append(f"--ni-tasks {ni_tasks} is not a directory (the 16 NI task JSON files; "
                        "copy ../shared/data/natural_instructions/tasks beside the checkout, or pass its path)")
    elif not any(ni_tasks.glob("*.json")):
        problems.append(f"--ni-tasks {ni_tasks} holds no task JSON files (*.json, as data_prep/natural_instructions.py reads them); "
                        "pass the natural_instructions/tasks folder itself")
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    only = ([s.strip() for s in args.only.split(",")] if args.only else
            [*CHECKS, *(name for name in BENCHES if name not in OPT_IN)])
    unknown = [s for s in only if s not in CHECKS and s not in BENCHES]
    if unknown:
        print(f"error: --only: unknown {', '.join(unknown)}; choose from {', '.join([*CHECKS, *BENCHES])}",
              file=sys.stderr)
        return 2

    from transformers.utils import logging as hf_logging

    from bench.common import banner

    hf_logging.disable_progress_bar()  # save_pretrained / from_pretrained bars between the check lines
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = banner()
    for name, module in {"peft": "peft", "bitsandbytes": "bitsandbytes", **OPTIONAL}.items():
        info[name] = _version(module)
    info["load average"] = info.pop("load average")  # after the version lines, as in every benchmark's banner
    print("gpu_check" + (" --smoke" if args.smoke else ""))
    for k, v in info.items():
        print(f"  {k:<14} {v}")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args.smoke, ni_tasks, Path(tmp), Path(args.corpus))
        checks = {name: run_check(ctx, name) for name in only if name in FAST_CHECKS}
        _release_device_memory()  # the benchmarks' fresh processes get the GPU memory the checks cached
        benches = run_benches(ctx, [n for n in only if n in BENCHES], args.budget_s, started)
        checks.update(run_long_checks(ctx, [n for n in only if n in LONG_CHECKS], args.budget_s, started))
    checks = {name: checks[name] for name in CHECKS if name in checks}  # the report lists them in CHECKS order
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "smoke": args.smoke,
           "banner": info, "budget_s": args.budget_s, "checks": checks, "benches": benches,
           "seconds": time.time() - started}
    (out_dir / "gpu_check.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(report_markdown(out))
    print(f"wrote {out_dir / 'gpu_check.md'} and {out_dir / 'gpu_check.json'} ({out['seconds']:.0f} s)")
    failed = [n for n, r in checks.items() if r["status"] == "FAIL"] + bench_errors(benches)
    print(summary(out), file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _release_device_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as e:  # an optional package that fails to import is reported, not fatal
        return f"fails to import: {type(e).__name__}"


if __name__ == "__main__":
    sys.exit(main())
