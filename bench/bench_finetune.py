"""Fine-tuning benchmark on real Natural-Instructions prompts: HF Trainer (+ PEFT, + bitsandbytes) vs tune's
Engine, for full fine-tuning, LoRA and QLoRA, on the same model and the same examples.

    python -m bench.bench_finetune [--size cpu|llama-1.1b] [--methods full,lora,qlora] [--steps N]
                                   [--warmup N] [--batch N] [--threads N] [--json OUT]
                                   [--packed-attention flex,dense] [--no-baseline]

On the shared 2-core CPU another process can stall a 2-thread step ~10x; --threads 1 keeps both sides steady
(a WARNING line flags runs whose time per fed token varied > 3x between steps).

Setup (once, in this process): the 16 tasks of ../shared/data/natural_instructions/tasks are split as the
recipe does (10 held-out instances per task) and encoded as Tk-Instruct prompts (definition + 2 positive
examples, prompt masked, max_length = model context); a byte-level BPE tokenizer is trained on those prompts;
a random-init HF model (GPT-2 layout for --size cpu, Llama layout for llama-1.1b) is saved to a temp dir, so
both sides load the same checkpoint.

- baseline: transformers.Trainer on one example per row, padded to the longest in the batch (labels =
  input_ids with prompt and padding at -100), fused AdamW, bf16 on a GPU, no gradient checkpointing;
  LoRA = peft r=16, alpha=32, dropout 0.05, all linear layers; QLoRA adds bitsandbytes nf4 with double
  quantization (bf16 compute on a GPU, fp32 on CPU) and prepare_model_for_kbit_training.
- ours: tune.engine.Engine with tune.packing.NIBatches (packing=True, rows of max_length) and the model from
  tune.adapters.load_base_model / add_lora, as recipes/finetune.py, once per --packed-attention mode (default
  flex, the recipe's): flex = document_ids batches, the model loaded as attention_implementation() says
  (flex_attention on CUDA where the model supports it); dense = the collator's (B, 1, L, L) mask, SDPA.
  Rows per step = baseline batch / mean examples per pack (rounded), so examples/step match as far as
  packing allows (both are printed). --no-baseline skips HF Trainer (e.g. for flex vs dense alone).

Same lr, betas, clipping, constant schedule, no weight decay. Each (method, side) runs in a fresh process.
Step time = interval between the starts of consecutive optimizer steps (data, forward, backward, optimizer);
the first --warmup intervals are left out. Useful tokens/s = non-padding tokens of the steady steps / their
summed time (baseline: attention-mask sum; ours: tokens that belong to an example). Peak memory: CUDA
max_memory_allocated, or on CPU the peak-RSS growth of the fresh process (model loading included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (GIB, PeakMemory, banner, fmt, intervals, isolated, preload_libraries, print_banner,
                          print_table, sync, time_steps, write_json)
from tune.packing import NIBatches
from tune.adapters import LoraSection, QuantSection

REPO = Path(__file__).resolve().parents[1]
NI_TASKS = REPO.parent / "shared" / "data" / "natural_instructions" / "tasks"

SIZES = {
    "cpu": dict(arch="gpt2", n_layer=4, n_head=4, width=128, context=512, vocab=4096, batch=8, steps=30, warmup=5),
    "llama-1.1b": dict(arch="llama", n_layer=22, n_head=32, n_kv_head=4, width=2048, mlp=5632, context=2048,
                       vocab=32000, batch=8, steps=40, warmup=10),
    "smoke": dict(arch="llama", n_layer=1, n_head=2, n_kv_head=1, width=32, mlp=64, context=256, vocab=512, batch=4,
                  steps=4, warmup=1),  # bench.gpu_check --smoke: the GPU script's code path on CPU, seconds
}
METHODS = ("full", "lora", "qlora")
LR = {"full": 5e-4, "lora": 2e-3, "qlora": 2e-3}  # as recipes/configs/*_ni.yaml
BETAS, GRAD_CLIP, SEED = (0.9, 0.999), 1.0, 1234
LORA, QUANT = LoraSection(r=16, alpha=32, dropout=0.05, target_modules="all-linear"), QuantSection()


# -- setup: tokenizer, examples, checkpoint ---------------------------------------------------------------
def prepare(shape: dict, workdir: Path, ni_tasks: Path = NI_TASKS) -> dict:
    """Tokenizer + prompt-masked examples (from the NI task files in `ni_tasks`) + a random-init checkpoint in
    workdir/model."""
    from transformers.utils import logging as hf_logging

    from data_prep.natural_instructions import (NISplitConfig, PromptConfig, TokenizeConfig, encode_prompt,
                                                load_tasks, split_instances, tokenize_examples)
    from data_prep.text import train_bpe_tokenizer

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
    splits = split_instances(load_tasks(ni_tasks), NISplitConfig(seed=0))
    prompt_cfg = PromptConfig()  # Tk-Instruct: definition + 2 positive examples
    texts = [encode_prompt(task, inst.input, prompt_cfg) + inst.outputs[0] for task, inst in splits["train"]]
    tokenizer = train_bpe_tokenizer(texts, shape["vocab"])
    assert len(tokenizer) <= shape["vocab"], (len(tokenizer), shape["vocab"])
    tok_cfg = TokenizeConfig(max_length=shape["context"], mask_prompt=True)
    train, report = tokenize_examples(splits["train"], tokenizer, prompt_cfg, tok_cfg)
    val, _ = tokenize_examples(splits["heldout_instances"][:16], tokenizer, prompt_cfg, tok_cfg)
    keep = lambda exs: [{"input_ids": e["input_ids"], "targets": e["targets"]} for e in exs]  # noqa: E731
    lengths = [len(e["input_ids"]) for e in train]
    n_targets = sum(sum(t != -100 for t in e["targets"]) for e in train)
    model_dir = workdir / "model"
    n_params = save_checkpoint(shape, tokenizer, model_dir)
    packs = len(NIBatches(train, val, 1, 1, SEED, True, shape["context"], tokenizer.pad_token_id).units)
    return {"model_dir": str(model_dir), "pad_id": tokenizer.pad_token_id, "train": keep(train), "val": keep(val),
            "n_params": n_params, "tokenizer_vocab": len(tokenizer), "n_examples": len(train),
            "mean_len": sum(lengths) / len(lengths), "max_len": max(lengths), "target_fraction": n_targets / sum(lengths),
            "examples_per_pack": len(train) / packs, "truncation": str(report)}


def save_checkpoint(shape: dict, tokenizer, out: Path) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from tune.hf import resolve_dtype

    ids = dict(vocab_size=shape["vocab"], bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if shape["arch"] == "gpt2":
        config = GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["width"],
                            n_positions=shape["context"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(num_hidden_layers=shape["n_layer"], num_attention_heads=shape["n_head"],
                             num_key_value_heads=shape["n_kv_head"], hidden_size=shape["width"],
                             intermediate_size=shape["mlp"], max_position_embeddings=shape["context"], **ids)
        cls = LlamaForCausalLM
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1.1B initialises much faster on a GPU
        model = cls(config)
    model.to(resolve_dtype("auto")).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _setup_child(threads: int | None):
    """Quiet logs, torch threads, and the libraries either side may import mid-run, loaded before the memory
    baseline is taken."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames (gradient_checkpointing)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # peft on GPT-2's Conv1D
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    preload_libraries()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401


# -- baseline: HF Trainer + PEFT + bitsandbytes -------------------------------------------------------------
class PadCollator:
    """Pads input_ids with pad_id and labels with -100 to the longest row; records useful tokens per batch."""

    def __init__(self, pad_id: int):
        self.pad_id, self.useful, self.padded = pad_id, [], []

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        self.useful.append(int(mask.sum()))
        self.padded.append(ids.numel())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def hf_labels(example: dict) -> list[int]:
    """Our targets are aligned (targets[t] = the token after position t); HF labels are shifted inside the
    model (labels[t] = the token at t), so labels = [-100] + targets[:-1]."""
    labels = [-100] + example["targets"][:-1]
    assert all(lab in (-100, tok) for lab, tok in zip(labels, example["input_ids"]))
    return labels


def run_baseline(method: str, shape: dict, data: dict, steps: int, threads: int | None) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    _setup_child(threads)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.ends.append(time.perf_counter())

    rows = [{"input_ids": ex["input_ids"], "labels": hf_labels(ex)} for ex in data["train"]]
    collator, timer = PadCollator(data["pad_id"]), StepTimer()
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        if method == "qlora":
            from peft import prepare_model_for_kbit_training

            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(data["model_dir"], quantization_config=quant, dtype=dtype,
                                                         device_map={"": 0} if cuda else None, attn_implementation="sdpa")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(data["model_dir"], dtype=dtype, attn_implementation="sdpa")
        if method != "full":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                                     target_modules=LORA.target_modules, task_type="CAUSAL_LM"))
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=shape["batch"], learning_rate=LR[method],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
            max_grad_norm=GRAD_CLIP, bf16=cuda, use_cpu=not cuda, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
            remove_unused_columns=False, label_names=["labels"])  # no gradient checkpointing (the default)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    n = len(timer.begins)
    return {"impl": "HF Trainer" + (" + PEFT" if method != "full" else "") + (" + bnb" if method == "qlora" else ""),
            "step_times": intervals(timer.begins), "compute_times": [e - b for b, e in zip(timer.begins, timer.ends)],
            "useful_tokens": collator.useful[:n], "tokens_incl_padding": collator.padded[:n],
            "examples": [shape["batch"]] * n, "peak_bytes": mem.bytes, "memory_method": mem.method,
            "details": f"batch {shape['batch']} padded to longest, optim={getattr(args.optim, 'value', args.optim)}, "
                       f"bf16={args.bf16}, attn={model.config._attn_implementation}"}


def run_trl(method: str, shape: dict, data: dict, steps: int, threads: int | None) -> dict:
    """TRL's SFTTrainer at its defaults (packing to the context, its gradient checkpointing default) on the same
    pre-tokenized examples, loss on the completions only; full or PEFT LoRA (QLoRA adds the bnb base)."""
    import datasets
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    _setup_child(threads)
    datasets.disable_progress_bars()  # TRL's tokenize / pack passes
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins = []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.begins.append(time.perf_counter())

    # completion_mask[t] = 1 where token t is trained on: our targets[t - 1] is not -100
    rows = datasets.Dataset.from_list([{"input_ids": ex["input_ids"],
                                        "completion_mask": [0] + [int(t != -100) for t in ex["targets"][:-1]]}
                                       for ex in data["train"]])
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        quant = None
        if method == "qlora":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(data["model_dir"], dtype=dtype, quantization_config=quant,
                                                     device_map={"": 0} if cuda and quant else None,
                                                     attn_implementation="sdpa")
        peft_config = None
        if method != "full":
            from peft import LoraConfig

            peft_config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                     target_modules=LORA.target_modules, task_type="CAUSAL_LM")
        args = SFTConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=max(1, shape["batch"] // 2),
                         learning_rate=LR[method], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=GRAD_CLIP, bf16=cuda, use_cpu=not cuda, packing=True,
                         max_length=shape["context"], completion_only_loss=True, eval_strategy="no",
                         save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True, seed=SEED)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, peft_config=peft_config, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        packed = trainer.train_dataset
        trainer.train()
    n = len(timer.begins)
    row_tokens = sum(len(ids) for ids in packed["input_ids"]) / len(packed)  # padding-free packing: no pad inside
    per_step = args.per_device_train_batch_size * row_tokens
    return {"impl": "TRL SFTTrainer" + (" + PEFT" if method != "full" else "") + (" + bnb" if method == "qlora" else ""),
            "step_times": intervals(timer.begins), "useful_tokens": [per_step] * n, "tokens_incl_padding": [per_step] * n,
            "examples": [len(rows) / len(packed) * args.per_device_train_batch_size] * n, "peak_bytes": mem.bytes,
            "memory_method": mem.method,
            "details": f"packing to {shape['context']}, batch {args.per_device_train_batch_size} (TRL's anchor setting), "
                       f"gradient_checkpointing={args.gradient_checkpointing} (TRL default), bf16={args.bf16}"}


# -- ours: tune Engine + packing ----------------------------------------------------------------------------
class TimedNIBatches(NIBatches):
    """NIBatches that counts every step's useful tokens and examples (bench.common.time_steps times the steps)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.useful, self.padded, self.examples = [], [], []

    def step_batches(self, step: int, rank: int, world: int) -> list[dict]:
        batches = super().step_batches(step, rank, world)
        real = [b["input_ids"] != self.pad_id for b in batches]  # the pad token never occurs inside an example
        self.useful.append(sum(int(r.sum()) for r in real))
        self.padded.append(sum(b["input_ids"].numel() for b in batches))
        self.examples.append(sum(int(((b["position_ids"] == 0) & r).sum()) for b, r in zip(batches, real)))
        return batches


def run_ours(method: str, shape: dict, data: dict, steps: int, threads: int | None, rows: int,
             packed_attention: str = "flex") -> dict:
    from tune.adapters import add_lora, attention_implementation, load_base_model
    from tune.engine import Engine, TrainConfig
    from tune.hf import resolve_dtype
    from tune.packing import PACKED_ATTENTION

    _setup_child(threads)
    cfg = TrainConfig(max_steps=steps, micro_batch_size=rows, lr=LR[method], min_lr=LR[method], warmup_steps=0,
                      lr_schedule="constant", weight_decay=0.0, betas=list(BETAS), grad_clip=GRAD_CLIP, eval_every=0,
                      eval_batches=1, save_every=0, log_every=steps, mixed_precision="auto", progress=False)
    source = TimedNIBatches(data["train"], data["val"], rows, 1, seed=SEED, packing=True,
                            max_length=shape["context"], pad_id=data["pad_id"],
                            mask_mode=PACKED_ATTENTION[packed_attention])
    attn, _ = attention_implementation(data["model_dir"], packed_attention)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        model = load_base_model(data["model_dir"], method, resolve_dtype("auto"), QUANT, gradient_checkpointing=False,
                                attn_implementation=attn)
        if method != "full":
            model = add_lora(model, LORA)
        engine = Engine(cfg, Path(tmp) / "run", model, source, log=lambda s: None)
        engine.save_at_end = False  # the final checkpoint (full: weights + AdamW state, ~13 GB) is not measured
        stamps = time_steps(engine)
        engine.fit()  # the final evaluation comes after the last timestamp
    n = len(stamps)
    return {"impl": f"tune Engine + packing ({packed_attention})", "step_times": intervals(stamps),
            "useful_tokens": source.useful[:n],
            "tokens_incl_padding": source.padded[:n], "examples": source.examples[:n], "peak_bytes": mem.bytes,
            "memory_method": mem.method,
            "details": f"{rows} packed rows of <= {shape['context']} tokens, mixed_precision="
                       f"{engine.accelerator.mixed_precision}, compile={cfg.compile}, fused AdamW, "
                       f"logits only at target positions, packed_attention={packed_attention}, attn={attn}"}


# -- summary ------------------------------------------------------------------------------------------------
def summarize(r: dict, warmup: int) -> dict:
    """Steady-state figures: step k's interval runs from its start to the next step's start."""
    k = len(r["step_times"])
    times, tokens = r["step_times"][warmup:], r["useful_tokens"][:k][warmup:]
    if not times:
        raise ValueError(f"no steady steps: {k} intervals timed, {warmup} skipped as warm-up; raise --steps")
    fed = r["tokens_incl_padding"][:k][warmup:]
    per_token = [t / n for t, n in zip(times, fed)]  # padded batches vary in width: compare time per fed token
    return {"steady_steps": len(times), "step_s_median": statistics.median(times), "step_s_min": min(times),
            "step_s_max": max(times), "time_per_fed_token_spread": max(per_token) / min(per_token),
            "tokens_per_s": sum(tokens) / sum(times), "padding_fraction": 1 - sum(tokens) / sum(fed),
            "useful_tokens_per_step": sum(tokens) / len(times),
            "examples_per_step": statistics.mean(r["examples"][:k][warmup:])}


def sides(packed_attention: list[str], baseline: bool, trl: bool = False) -> list[tuple[str, object, tuple]]:
    """(name, run function, extra args) per run of a method: the baseline, TRL (when `trl`), then ours once per
    attention mode (named "ours" when there is one mode, else "ours-<mode>")."""
    out = [("baseline", run_baseline, ())] if baseline else []
    out += [("trl", run_trl, ())] if trl else []
    for mode in packed_attention:
        out.append(("ours" if len(packed_attention) == 1 else f"ours-{mode}", run_ours, (mode,)))
    return out


def compare(methods, shape: dict, data: dict, steps: int, warmup: int, rows: int, threads: int | None,
            packed_attention: list[str] = ("flex",), baseline: bool = True, timeout: float | None = None,
            trl: bool = False) -> dict:
    """Per method, each side in a fresh process (see `sides`), each killed after `timeout` seconds.
    Returns {method: {side: figures or {"error"}, "ratio_ours_over_baseline": ...}}."""
    results = {}
    for method in methods:
        res = {}
        for side, fn, extra in sides(list(packed_attention), baseline, trl):
            print(f"running {method} / {side} ({steps} steps) ...", flush=True)
            extra = (rows, *extra) if fn is run_ours else extra
            try:
                r = isolated(fn, method, shape, data, steps, threads, *extra, timeout=timeout)
                r.update(summarize(r, warmup))
            except (RuntimeError, ValueError) as e:
                r = {"error": str(e)}
                print(f"  FAILED: {str(e).strip().splitlines()[-1]}", flush=True)
            res[side] = r
        # ratios against the baseline, or (no baseline) of the first mode over the others
        ours = [k for k in res if k != "baseline"]
        ref = res.get("baseline") or res[ours[-1]]
        for side in ours if baseline else ours[:-1]:
            o = res[side]
            if "error" not in o and "error" not in ref:
                o["ratio"] = {"tokens_per_s": o["tokens_per_s"] / ref["tokens_per_s"],
                              "step_s_median": o["step_s_median"] / ref["step_s_median"],
                              "peak_bytes": o["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] > 0 else None,
                              "over": "baseline" if baseline else ours[-1]}
        if "ours" in res and "ratio" in res["ours"]:
            res["ratio_ours_over_baseline"] = res["ours"]["ratio"]
        results[method] = res
    return results


def print_results(results: dict):
    rows = []
    for method, res in results.items():
        for side, r in res.items():
            if side == "ratio_ours_over_baseline":
                continue
            if "error" in r:
                rows.append([method, side, "FAILED", "", "", "", "", "", "", ""])
                continue
            q = r.get("ratio")
            rows.append([method, f"{side}: {r['impl']}", fmt(r["tokens_per_s"]), fmt(r["step_s_median"] * 1e3, ".1f"),
                         fmt(r["peak_bytes"] / GIB, ".3f"), fmt(r["examples_per_step"], ".1f"),
                         fmt(r["useful_tokens_per_step"]), fmt(100 * r["padding_fraction"], ".0f"),
                         f"{q['tokens_per_s']:.2f}x" if q else "",
                         (fmt(q["peak_bytes"], ".2f") + "x") if q and q["peak_bytes"] else ""])
    runs = [r for res in results.values() for k, r in res.items() if k != "ratio_ours_over_baseline"]
    steady = next((r["steady_steps"] for r in runs if "steady_steps" in r), 0)
    over = next((r["ratio"]["over"] for r in runs if "ratio" in r), "baseline")
    print()
    print_table(["method", "implementation", "useful tok/s", "step ms (median)", "peak GiB", "examples/step",
                 "useful tok/step", "pad %", f"tok/s vs {over}", f"mem vs {over}"], rows,
                title=f"Fine-tuning on Natural-Instructions prompts, {steady} steady steps per run")
    for method, res in results.items():
        for side, r in res.items():
            if side != "ratio_ours_over_baseline":
                print(f"  {method} {side}: " + (r["details"] if "error" not in r else f"FAILED:\n{r['error'].rstrip()}"))
    for method, res in results.items():  # on a shared CPU another process can stall a multi-threaded step ~10x
        for side, r in res.items():
            if side != "ratio_ours_over_baseline" and "error" not in r and r["time_per_fed_token_spread"] > 3:
                print(f"  WARNING {method} {side}: time per fed token varies {r['time_per_fed_token_spread']:.1f}x "
                      f"between steps (step {r['step_s_min'] * 1e3:.0f}-{r['step_s_max'] * 1e3:.0f} ms): other "
                      "processes were probably competing for the CPU; rerun on an idle machine (or --threads 1)")
    some = next((r for r in runs if "memory_method" in r), None)
    if some:
        print(f"  peak memory: {some['memory_method']}; pad % = share of fed tokens that are padding")


# -- CLI ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of full,lora,qlora")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per size)")
    p.add_argument("--warmup", type=int, help="leading step intervals left out of the statistics (default: per size)")
    p.add_argument("--batch", type=int, help="baseline examples per step (default: per size)")
    p.add_argument("--threads", type=int, help="torch threads in each run (default: torch's; 1 is steadier on a "
                                               "busy 2-core CPU)")
    p.add_argument("--json", help="write all numbers to this JSON file")
    p.add_argument("--packed-attention", default="flex",
                   help="comma-separated data.packed_attention modes for ours, each its own run (flex,dense: side by side)")
    p.add_argument("--no-baseline", action="store_true", help="skip HF Trainer (ratios: first mode over the last)")
    return p.parse_args(argv)


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown or 'none given'}; choose from {','.join(METHODS)}")
    modes = [m.strip() for m in args.packed_attention.split(",") if m.strip()]
    if not modes or any(m not in ("flex", "dense") for m in modes) or (args.no_baseline and len(modes) < 2):
        raise SystemExit("--packed-attention: one or more of flex,dense (two with --no-baseline)")
    if not NI_TASKS.is_dir():
        raise SystemExit(f"{NI_TASKS} not found: the benchmark needs the Natural-Instructions tasks")
    shape = dict(SIZES[args.size])
    default_steps, default_warmup = shape.pop("steps"), shape.pop("warmup")
    steps = args.steps or default_steps
    warmup = args.warmup if args.warmup is not None else min(default_warmup, max(steps - 3, 0))
    if args.batch:
        shape["batch"] = args.batch

    import bitsandbytes
    import peft

    info = {**banner(), "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(shape, Path(tmp))
        rows = max(1, round(shape["batch"] / data["examples_per_pack"]))
        arch = (f"GPT-2 layout, {shape['n_layer']}L/{shape['n_head']}H/{shape['width']}d" if shape["arch"] == "gpt2" else
                f"Llama layout, {shape['n_layer']}L, {shape['width']} hidden, {shape['mlp']} MLP, "
                f"{shape['n_head']} heads, {shape['n_kv_head']} KV heads")
        settings = {
            "size": args.size,
            "model": f"{arch}, vocab {shape['vocab']}, context {shape['context']}, {data['n_params'] / 1e6:,.1f} M params, "
                     f"random init, {'bf16' if torch.cuda.is_available() else 'fp32'} weights",
            "data": f"{data['n_examples']} NI examples from 16 tasks, Tk-Instruct (def + 2 pos), prompt masked; "
                    f"{data['mean_len']:.0f} tokens mean, {data['max_len']} max; {100 * data['target_fraction']:.1f}% "
                    f"targets; byte BPE trained on the prompts ({data['tokenizer_vocab']} tokens)",
            "truncation": data["truncation"],
            "batches": f"baseline {shape['batch']} examples/step padded to longest; ours {rows} packed rows/step "
                       f"({data['examples_per_pack']:.2f} examples per pack on average)",
            "methods": f"{', '.join(methods)}; LoRA r={LORA.r} alpha={LORA.alpha} dropout={LORA.dropout} "
                       f"{LORA.target_modules}; QLoRA {QUANT.quant_type}, double quant={QUANT.double_quant}",
            "optimizer": f"AdamW lr {', '.join(f'{m} {LR[m]:g}' for m in methods)}, constant, betas {BETAS}, "
                         f"no weight decay, grad clip {GRAD_CLIP}",
            "steps": f"{steps} per run, first {warmup} intervals skipped as warm-up",
            "packed_attention": ", ".join(modes) + ("" if not args.no_baseline else " (no HF Trainer baseline)"),
            "threads": str(args.threads or torch.get_num_threads()),
        }
        print("bench_finetune")
        print_banner(info, settings)
        results = compare(methods, shape, data, steps, warmup, rows, args.threads, modes, not args.no_baseline)
    print_results(results)
    wall = time.time() - t0
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"  total wall time {wall:.0f} s; load average at the end {load} (1/5/15 min; this run adds ~1-2)")
    if args.json:
        data_stats = {k: v for k, v in data.items() if k not in ("train", "val", "model_dir")}
        write_json(args.json, {"banner": info, "settings": {**settings, "shape": shape, "steps": steps, "warmup": warmup,
                                                            "ours_rows": rows},
                               "data": data_stats, "results": results, "wall_s": wall})


if __name__ == "__main__":
    main()
