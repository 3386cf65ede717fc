"""`tune plan`'s memory prediction against the peak of real training steps: full, LoRA and QLoRA fine-tuning of
HF GPT-2-layout models of a few sizes, through the recipes' own loading (tune.adapters.load_base_model + add_lora)
and the Engine with its default loss (the fused chunked cross-entropy).

    python -m bench.bench_plan                 # CPU: every size, full / lora / qlora
    python -m bench.bench_plan --sizes small --methods full
    python -m bench.bench_plan --native        # pretraining the native GPT (3 layouts), with and without
                                               # train.gradient_checkpointing

Measurement (one fresh spawned process per row, bench.common.isolated):
  CUDA  torch.cuda.max_memory_allocated() over the steps (the allocator's own peak; the model is loaded inside).
  CPU   the peak resident set size (VmHWM) over loading + steps, minus the RSS just before the model is loaded,
        with glibc's MALLOC_MMAP_THRESHOLD_ set to 64 KiB in the child: every tensor above that is its own mmap,
        returned to the OS when freed, so RSS follows the live tensors instead of the allocator's free lists
        (without it, freed activations stay in glibc's heap and the RSS of a later step says nothing). The model
        directory is written beforehand in the parent, and every library is imported before the baseline is
        taken (bench.common.preload_libraries), so the delta is tensors, not code. The peak is reset (Linux
        /proc/self/clear_refs 5) after loading, so a loading transient (QLoRA quantises an fp32 copy) is not
        taken for the training step's peak; the weights loaded stay in the baseline-relative number. transformers
        maps the safetensors file and lets parameters point into it; they are copied into anonymous memory first
        (else the file pages count only once touched, and those the 4-bit quantisation read stay counted).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.common import banner, fmt, isolated, print_banner, print_table

TINY = dict(n_layer=1, n_embd=64, n_head=4, vocab_size=256, n_positions=64)  # the warm-up model
SIZES = {  # GPT-2 layout (what `tune run pretrain` exports); vocabulary 8192
    "small": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=512),
    "medium": dict(n_layer=8, n_embd=512, n_head=8, vocab_size=8192, n_positions=512),
    "large": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=8192, n_positions=512),
}
METHODS = ("full", "lora", "qlora", "distill")  # distill: the student trained fully from the "medium" teacher


def write_model(directory, size: dict) -> str:
    """An HF GPT-2 of `size` (dropout 0, as our pretrain exports) saved to `directory`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return str(directory)


def planned_peak_bytes(model_dir, method: str, micro_batch_size: int, seq_len: int, device: str = "cpu",
                       mixed_precision: str = "no", lora_r: int = 16, lora_dropout: float = 0.05,
                       gradient_checkpointing: bool = False, teacher_dir: str | None = None) -> dict:
    """tune plan's memory plan for the same setup as measure_peak (a GPT-2 directory), as a dict of rows.
    method "distill": the student trained fully with the KD loss from the frozen teacher in `teacher_dir`."""
    from tune.plan import Settings, memory_plan, read_hf_shape

    shape = read_hf_shape(model_dir, "model")
    bf16 = mixed_precision == "bf16"
    distill = method == "distill"
    method = "full" if distill else method
    st = Settings(method=method, micro_batch_size=micro_batch_size, seq_len=seq_len,
                  weights_dtype="bf16" if bf16 and method != "full" else "fp32",
                  compute_dtype="bf16" if bf16 else "fp32", autocast=bf16 and method == "full",
                  gradient_checkpointing=gradient_checkpointing, lora_r=lora_r, lora_dropout=lora_dropout,
                  device=device, distill=distill, teacher=read_hf_shape(teacher_dir, "teacher") if distill else None,
                  teacher_dtype="bf16" if bf16 else "fp32")
    plan = memory_plan(shape, st)
    return {**vars(plan), "peak_bytes": plan.peak_bytes}


class RandomTokens:
    """A BatchSource of uniformly random token rows, every position a target (the planner's upper bound)."""

    def __init__(self, vocab_size: int, micro_batch_size: int, seq_len: int):
        self.shape, self.vocab_size = (micro_batch_size, seq_len), vocab_size

    def _batch(self, seed: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab_size, self.shape, generator=g)
        return {"input_ids": ids, "targets": ids}

    def step_batches(self, step, rank, world):
        return [self._batch(step)]

    def val_batches(self, rank, world, limit):
        return [self._batch(0)]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def memory_baseline() -> tuple[bool, int]:
    """(on CUDA?, the bytes in use now): the allocator's allocated bytes with its peak reset on CUDA, else the RSS."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True, torch.cuda.memory_allocated()
    return False, _status_kib("VmRSS") * 1024


def measure_peak(model_dir: str, method: str, micro_batch_size: int, seq_len: int, steps: int = 3,
                 mixed_precision: str = "no", lora_r: int = 16, lora_dropout: float = 0.05,
                 gradient_checkpointing: bool = False, warm_up_dir: str | None = None,
                 teacher_dir: str | None = None) -> dict:
    """Peak memory of `steps` training steps (run it through bench.common.isolated: a fresh process). Returns
    {"peak_bytes", "method" (how it was measured), "trainable_params"}.

    `warm_up_dir`: a tiny model of the same architecture, trained one step the same way before the baseline is
    taken, so the code pages of the kernels (MKL/oneDNN, bitsandbytes, SDPA) and the allocator's per-thread arenas
    are in the baseline, not in the delta: on CPU they are ~25 MiB, which is not tensor memory."""
    from bench.common import preload_libraries

    preload_libraries()
    import torch

    if warm_up_dir is not None:
        _train_steps(warm_up_dir, method, 1, 16, 1, mixed_precision, lora_r, lora_dropout, gradient_checkpointing,
                     teacher_dir=warm_up_dir if teacher_dir else None)
    import gc

    gc.collect()

    cuda, start = memory_baseline()
    trainable = _train_steps(model_dir, method, micro_batch_size, seq_len, steps, mixed_precision, lora_r,
                             lora_dropout, gradient_checkpointing, reset_peak=not cuda, teacher_dir=teacher_dir)
    if cuda:
        return {"peak_bytes": torch.cuda.max_memory_allocated() - start, "trainable_params": trainable,
                "method": "CUDA max_memory_allocated"}
    return {"peak_bytes": _status_kib("VmHWM") * 1024 - start, "trainable_params": trainable,
            "method": "peak RSS (VmHWM) - RSS before loading, MALLOC_MMAP_THRESHOLD_=65536"}


def _train_steps(model_dir: str, method: str, micro_batch_size: int, seq_len: int, steps: int, mixed_precision: str,
                 lora_r: int, lora_dropout: float, gradient_checkpointing: bool, reset_peak: bool = False,
                 teacher_dir: str | None = None) -> int:
    """Load the model as the finetune recipe does and train `steps` steps with the Engine; the trainable count.
    reset_peak: reset the process's peak RSS once the model is loaded (CPU). method "distill": full training with
    the distill recipe's loss (tune.distill.kd_loss_fn, alpha 0.5, forward KL) from the teacher in `teacher_dir`,
    loaded by tune.distill.load_teacher."""
    import gc

    import torch

    from tune.adapters import LoraSection, QuantSection, add_lora, load_base_model
    from tune.engine import Engine, TrainConfig
    from tune.hf import read_model_config

    vocab = read_model_config(model_dir)["vocab_size"]
    dtype = torch.bfloat16 if mixed_precision == "bf16" and method != "full" else torch.float32
    quant = QuantSection(compute_dtype="bf16" if mixed_precision == "bf16" else "fp32")
    loss_fn = teacher = None
    if method == "distill":
        from tune.distill import kd_loss_fn, load_teacher

        method = "full"
        teacher = load_teacher(teacher_dir, dtype)
        loss_fn = kd_loss_fn(teacher, 0.5, 1.0, "forward_kl", 0.5, vocab)
    model = load_base_model(model_dir, method, dtype, quant, gradient_checkpointing)
    if method in ("lora", "qlora"):
        model = add_lora(model, LoraSection(r=lora_r, dropout=lora_dropout))
    if not torch.cuda.is_available():  # (on CUDA the Engine's accelerator moves it; QLoRA loads onto the GPU)
        # transformers leaves weights in the safetensors file's mmap: file pages count in RSS only once touched, and
        # those the 4-bit quantisation read stay counted while mapped. Copies in anonymous memory, the mmap released:
        # RSS then holds the weights exactly once, from the start
        for t in [*model.parameters(), *model.buffers(), *(teacher.parameters() if teacher else [])]:
            t.data = t.data.clone()
        gc.collect()
    if reset_peak:
        with open("/proc/self/clear_refs", "w") as f:  # the peak from here on (loading transients left out)
            f.write("5")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = TrainConfig(max_steps=steps, micro_batch_size=micro_batch_size, warmup_steps=0, eval_every=0,
                      eval_batches=1, log_every=1, progress=False, mixed_precision=mixed_precision,
                      gradient_checkpointing=gradient_checkpointing, num_threads=0)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(cfg, run_dir, model, RandomTokens(vocab, micro_batch_size, seq_len), loss_fn=loss_fn,
                        log=lambda s: None)
        engine.save_at_end = False
        engine.prefetch = False
        engine.fit()
    return trainable


def compare(model_dir: str, method: str, micro_batch_size: int, seq_len: int, steps: int = 3,
            mixed_precision: str = "no", warm_up_dir: str | None = None, teacher_dir: str | None = None,
            **kwargs) -> dict:
    """Planned and measured peak of one setup (measured in a fresh process with the mmap threshold set)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc in the spawned child at its start
    try:
        measured = isolated(measure_peak, model_dir, method, micro_batch_size, seq_len, steps, mixed_precision,
                            warm_up_dir=warm_up_dir, teacher_dir=teacher_dir, **kwargs)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = planned_peak_bytes(model_dir, method, micro_batch_size, seq_len, device, mixed_precision,
                              teacher_dir=teacher_dir, **kwargs)
    return {"method": method, "planned_bytes": plan["peak_bytes"], "measured_bytes": measured["peak_bytes"],
            "ratio": plan["peak_bytes"] / measured["peak_bytes"], "plan": plan, "measured_with": measured["method"]}


NATIVE = dict(n_layer=6, n_embd=512, n_head=8, vocab_size=8192)  # the native presets' layouts at this size


def measure_native_peak(preset: str, gradient_checkpointing: bool, micro_batch_size: int, seq_len: int,
                        steps: int = 3) -> int:
    """Peak bytes (CPU: VmHWM delta, as measure_peak) of `steps` pretraining steps of the native GPT `preset` at
    NATIVE's size (the Engine with the pretrain recipe's loss, fp32), after a warm-up step of a tiny one."""
    import gc

    import torch

    from bench.common import preload_libraries
    from tune.engine import Engine, TrainConfig
    from tune.models.gpt import GPT, config_from_preset

    preload_libraries()

    def train(model, b, t, n):
        cfg = TrainConfig(max_steps=n, micro_batch_size=b, warmup_steps=0, eval_every=0, eval_batches=1, log_every=1,
                          progress=False, mixed_precision="no", gradient_checkpointing=gradient_checkpointing,
                          num_threads=0)
        with tempfile.TemporaryDirectory() as run_dir:
            engine = Engine(cfg, run_dir, model, RandomTokens(model.config.vocab_size, b, t), log=lambda s: None)
            engine.save_at_end = False
            engine.prefetch = False
            engine.fit()

    train(GPT(config_from_preset(preset, n_layer=1, n_embd=64, n_head=4, vocab_size=256, block_size=16)), 1, 16, 1)
    gc.collect()
    cuda, start = memory_baseline()
    model = GPT(config_from_preset(preset, **NATIVE, block_size=seq_len))
    if not cuda:
        with open("/proc/self/clear_refs", "w") as f:  # the peak from here on, as measure_peak
            f.write("5")
    train(model, micro_batch_size, seq_len, steps)
    return (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - start


def planned_native_peak(preset: str, gradient_checkpointing: bool, micro_batch_size: int, seq_len: int) -> int:
    from tune.models.gpt import config_from_preset
    from tune.plan import Settings, memory_plan, shape_from_native

    config = config_from_preset(preset, **NATIVE, block_size=seq_len)
    st = Settings(method="full", micro_batch_size=micro_batch_size, seq_len=seq_len, weights_dtype="fp32",
                  compute_dtype="fp32", autocast=False, device="cpu", gradient_checkpointing=gradient_checkpointing)
    return memory_plan(shape_from_native(config, preset), st).peak_bytes


def native_rows(micro_batch_size: int, seq_len: int, steps: int) -> list[list[str]]:
    rows = []
    for preset in ("tiny-gpt2", "tiny-modern", "tiny-moe"):
        for checkpointing in (False, True):
            measured = isolated(measure_native_peak, preset, checkpointing, micro_batch_size, seq_len, steps)
            planned = planned_native_peak(preset, checkpointing, micro_batch_size, seq_len)
            rows.append([f"native {preset} layout", "on" if checkpointing else "off", fmt(planned / 2**20, ",.1f"),
                         fmt(measured / 2**20, ",.1f"), f"{planned / measured:.2f}"])
            print_table(["model", "checkpointing", "planned MiB", "measured MiB", "planned/measured"], rows[-1:])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--native", action="store_true",
                        help="pretraining the native GPT (6 x 512, gpt2 / modern / moe layouts), full fp32, with and "
                             "without gradient checkpointing, instead of the HF fine-tuning rows")
    args = parser.parse_args(argv)
    if args.native:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        rows = native_rows(args.micro_batch_size, args.seq_len, args.steps)
        print()
        print_table(["model", "checkpointing", "planned MiB", "measured MiB", "planned/measured"], rows,
                    title="native GPT pretraining, peak memory per process")
        return
    print_banner(banner(), {"batch": f"{args.micro_batch_size} x {args.seq_len} tokens", "steps": args.steps,
                            "mixed_precision": args.mixed_precision,
                            "checkpointing": args.gradient_checkpointing})
    from tune.plan import param_counts, read_hf_shape

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm_up = write_model(Path(tmp) / "tiny", TINY)
        teacher = write_model(Path(tmp) / "teacher", SIZES["medium"]) if "distill" in args.methods else None
        for size in args.sizes:
            model_dir = write_model(Path(tmp) / size, SIZES[size])
            n = param_counts(read_hf_shape(model_dir, "model")).total
            for method in args.methods:
                r = compare(model_dir, method, args.micro_batch_size, args.seq_len, args.steps, args.mixed_precision,
                            warm_up, teacher_dir=teacher if method == "distill" else None,
                            gradient_checkpointing=args.gradient_checkpointing)
                p = r["plan"]
                rows.append([f"{size} ({n / 1e6:.1f}M)", method,
                             fmt((p["weights_bytes"] + p["teacher_bytes"]) / 2**20, ",.1f"),
                             fmt((p["grads_bytes"] + p["optimizer_bytes"] + p["adapter_bytes"]) / 2**20, ",.1f"),
                             fmt((p["activations_bytes"] + p["logits_bytes"] + p["transient_bytes"]) / 2**20, ",.1f"),
                             fmt(r["planned_bytes"] / 2**20, ",.1f"), fmt(r["measured_bytes"] / 2**20, ",.1f"),
                             f"{r['ratio']:.2f}"])
                print_table(["model", "method", "weights (+teacher) MiB", "grads+optim MiB", "act+logits MiB", "planned MiB",
                             "measured MiB", "planned/measured"], rows[-1:])
    print()
    print_table(["model", "method", "weights (+teacher) MiB", "grads+optim MiB", "act+logits MiB", "planned MiB", "measured MiB",
                 "planned/measured"], rows, title=f"peak memory per process, measured with: {r['measured_with']}")


if __name__ == "__main__":
    main()
