"""The `tune` command: ls | cp | cat | validate | run | export | generate.

    tune ls                                    recipes and their configs (scanned from recipes/configs/)
    tune cp CONFIG DEST                        copy a built-in config to edit (DEST/ : into that directory)
    tune cat CONFIG [key=value ...]            print the resolved config (defaults filled in, overrides applied)
    tune validate CONFIG [key=value ...]       check a config without running anything heavy
    tune run RECIPE --config CONFIG [key=value ...] [--nproc N] [--nnodes M --rdzv-endpoint HOST:PORT]
    tune export RUN_DIR [--step N | --best] [--out DIR]   a checkpoint as the run's final artifact (HF model, adapter)
    tune generate --model DIR [--adapter DIR] [--quant int8|nf4|fp4] --prompt TEXT | --task FILE
    tune quantize MODEL_DIR OUT [--quant nf4] [--adapter DIR]   a bitsandbytes-quantized HF checkpoint
    tune plan CONFIG [key=value ...] [--gpu H100 --mfu 0.4 --processes N --json]   params, FLOPs, memory, time
    tune plan --model-size 70B                 inference weight memory at fp16 / int8 / int4
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tune.config import CONFIG_DIR, load_config, problem_lines, read_yaml, resolve_config_path, with_validate_problems
from tune.errors import ConfigError, ConfigProblems, TuneError
from tune.plan import GPU_PEAK_TFLOPS
from tune.train_config import environment_problems, schedule_warning

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_recipe(name: str):
    if name not in recipe_names():
        import difflib

        close = difflib.get_close_matches(name, recipe_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} (recipes: {', '.join(recipe_names())})")
    return importlib.import_module(f"recipes.{name}")


def config_summary(path: Path) -> tuple[str, str]:
    """(recipe, one-line description) of a config file: its `recipe` key and first comment line."""
    first = path.read_text(encoding="utf-8").splitlines()[:1]
    description = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    recipe = str(read_yaml(path).get("recipe", "?"))
    return recipe, description


def load_recipe_config(config: str, overrides: list[str], recipe: str | None = None, check: bool = True):
    """Resolve a config (file or built-in name), pick its recipe and build the validated config object
    (check=False: keys, types and values only, without the recipe's `validate` of paths and models)."""
    if recipe:
        load_recipe(recipe)
    path = resolve_config_path(config)
    declared = read_yaml(path).get("recipe")
    name = recipe or declared
    if name is None:
        raise ConfigError(f"{path}: no 'recipe' key; add e.g. 'recipe: pretrain' or pass the recipe to tune run")
    if recipe and declared and recipe != declared:
        raise ConfigError(f"{path} is a {declared!r} config, not {recipe!r}; run: tune run {declared} --config {config}")
    module = load_recipe(name)

    def validate(cfg):
        """The recipe's own checks, and whether train.ce_kernel and train.log_with can run here: every problem in
        one report."""
        lines = []
        environment = environment_problems(getattr(cfg, "train", None))
        try:
            if hasattr(module, "validate"):
                module.validate(cfg)
        except ConfigError as e:
            if not isinstance(e, ConfigProblems) and not environment:
                raise
            lines = problem_lines(e)
        lines += environment
        if len(lines) > 1:
            raise ConfigProblems(lines, str(path))
        if lines:
            raise ConfigError(f"{path}: {lines[0]}")

    try:
        cfg = load_config(module.CONFIG_CLASS, str(path), overrides)
    except ConfigError as e:  # with the recipe's own checks of the rest in the same report
        raise (with_validate_problems(e, validate, str(path)) if check else e) from None
    if check:
        validate(cfg)
    warning = schedule_warning(cfg.train) if check and hasattr(cfg, "train") else None
    if warning and "LOCAL_RANK" not in os.environ:  # once: the --nproc launcher has said it for its processes
        print(warning, file=sys.stderr)
    return module, cfg


def cmd_ls(args) -> int:
    rows: dict[str, list[tuple[str, str]]] = {name: [] for name in recipe_names()}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        recipe, description = config_summary(path)
        rows.setdefault(recipe, []).append((path.stem, description))
    width = max((len(c) for configs in rows.values() for c, _ in configs), default=10)
    for recipe, configs in rows.items():
        print(recipe)
        for name, description in configs:
            print(f"    {name:<{width}}  {description}")
    return 0


def cmd_cp(args) -> int:
    src = resolve_config_path(args.config)
    dest = Path(args.dest)
    if args.dest.endswith(("/", os.sep)):  # a directory, created if missing (not a file named after it)
        dest.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} already exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {src.name} to {dest}")
    return 0


def cmd_cat(args) -> int:
    """Print a config as the recipe sees it: every key, with defaults filled in and overrides applied (keys and
    values are checked; paths are not, so a config for models not trained yet prints too)."""
    import yaml

    from tune.config import to_dict

    _, cfg = load_recipe_config(args.config, args.overrides, check=False)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_validate(args) -> int:
    module, cfg = load_recipe_config(args.config, args.overrides)
    print(f"{args.config}: valid {module.__name__.split('.')[-1]} config")
    return 0


def cmd_run(args) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (processes on this machine), got {args.nproc}")
    check_node_args(args)
    if (args.nproc > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        _, cfg = load_recipe_config(args.config, args.overrides, args.recipe)  # fail fast, before starting N processes
        return launch(args, cfg)
    module, cfg = load_recipe_config(args.config, args.overrides, args.recipe)
    module.run(cfg)
    return 0


def check_node_args(args) -> None:
    """Refuse multi-node flags that torchrun would reject late or misread (ConfigError, one line)."""
    if args.nnodes < 1:
        raise ConfigError(f"--nnodes must be >= 1 (machines taking part), got {args.nnodes}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (an address of the first node "
                          "that every node can reach, e.g. --rdzv-endpoint node1:29500), given the same on every node")
    if args.rdzv_endpoint and not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", args.rdzv_endpoint):
        raise ConfigError(f"--rdzv-endpoint must be HOST:PORT (e.g. node1:29500), got {args.rdzv_endpoint!r}")
    if args.rdzv_endpoint and not 1 <= int(args.rdzv_endpoint.rsplit(":", 1)[1]) <= 65535:
        raise ConfigError(f"--rdzv-endpoint port must be in 1..65535 (e.g. node1:29500), got {args.rdzv_endpoint!r}")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank must be in [0, --nnodes={args.nnodes}), got {args.node_rank}")


def torchrun_command(args) -> list[str]:
    """The torchrun command line that starts this `tune run` on args.nproc processes of this machine, joining
    args.nnodes machines through a c10d rendezvous at args.rdzv_endpoint when given (torchrun's own flags)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    if args.rdzv_endpoint:
        command += ["--nnodes", str(args.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
                    "--rdzv-id", args.rdzv_id]
    if args.node_rank is not None:
        command += ["--node-rank", str(args.node_rank)]
    return [*command, "-m", "tune.cli", "run", args.recipe, "--config", args.config, *args.overrides]


# torchrun's own warnings, e.g. "W1130 19:18:42.537000 9805 torch/distributed/elastic/...] Sending process ... closing
# signal SIGINT": its steps, not the user's concern (its errors, E..., still show)
_TORCHRUN_WARNING = re.compile(rb"(?m)^[WI]\d{4} [\d:.]+ +\d+ \S*torch/distributed/.*\n")
_SIGNAL_TRACEBACK = re.compile(r"(?m)^Traceback \(most recent call last\):\n(?:[ \t].*\n)*\S*SignalException: .*\n")


def launch(args, cfg) -> int:
    """Run `tune run` on args.nproc processes through torchrun, each with OMP_NUM_THREADS set to the same
    per-process thread choice as apply_num_threads (this also keeps torchrun from printing its banner).

    torchrun runs in its own session, so Ctrl-C at a terminal reaches only this process. SIGINT, SIGTERM or
    SIGUSR1 sent here (a terminal, Kubernetes, a scheduler) is forwarded once to torchrun (SIGUSR1 as SIGTERM,
    which torchrun handles), which passes it to the processes: they stop together at the next step boundary and
    save a checkpoint (runtime.StopAtStepBoundary). torchrun's warnings and its SignalException traceback are
    dropped and one line says what was saved. Returns torchrun's exit status, or 128 + the signal's number
    (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1) when a signal stopped the run.
    """
    import threading
    import time

    from tune.engine import busy_fraction, choose_num_threads, usable_cores
    from tune.runtime import INTERRUPT_SIGNALS, restore_handlers

    requested = getattr(getattr(cfg, "train", None), "num_threads", 0)
    omp_env = os.environ.get("OMP_NUM_THREADS")
    busy = busy_fraction() if requested == 0 and not omp_env else 0.0
    threads, _ = choose_num_threads(requested, usable_cores(), args.nproc, omp_env, busy)
    command = torchrun_command(args)
    started = time.time()
    held: list[bytes] = []  # stderr after a signal, kept back until torchrun's traceback is taken out
    interrupted = threading.Event()
    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def send(signum):  # torchrun does not handle SIGUSR1 (it would die and leave the processes): SIGTERM instead
        procs[0].send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    def forward(signum, frame):  # the first signal goes to torchrun, which passes SIGINT/SIGTERM to the processes
        if not received:
            received.append(signum)
            interrupted.set()
            if procs:
                send(signum)

    previous = {s: signal.signal(s, forward) for s in INTERRUPT_SIGNALS}  # before the start: no orphaned torchrun
    try:
        # its own session: a terminal's Ctrl-C reaches only this process, which forwards it once
        procs.append(subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                      stderr=subprocess.PIPE, start_new_session=True))
    except BaseException:
        restore_handlers(previous)
        raise
    proc = procs[0]
    if received:  # a signal came while it was starting
        send(received[0])

    def relay():  # the processes' stderr (progress bar included) passes through as it comes
        signal.pthread_sigmask(signal.SIG_BLOCK, set(INTERRUPT_SIGNALS))  # signals go to the main thread's wait
        while chunk := os.read(proc.stderr.fileno(), 65536):
            chunk = _TORCHRUN_WARNING.sub(b"", chunk)
            if interrupted.is_set():
                held.append(chunk)
            elif hasattr(sys.stderr, "buffer"):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            else:  # a replaced sys.stderr (e.g. captured in tests) takes text
                sys.stderr.write(chunk.decode("utf-8", "replace"))

    try:
        relay_thread = threading.Thread(target=relay, daemon=True)
        relay_thread.start()
        code = proc.wait()  # retried after each signal (the handler does not raise); later signals are ignored
    finally:
        restore_handlers(previous)
    relay_thread.join(timeout=10)
    if not received or code == 0:  # finished before the signal took effect: a normal end
        sys.stderr.write(b"".join(held).decode("utf-8", "replace"))
        return code
    sys.stderr.write(_SIGNAL_TRACEBACK.sub("", b"".join(held).decode("utf-8", "replace")))
    print(interrupted_summary(cfg, args.nproc * args.nnodes, started, signal.Signals(received[0]).name),
          file=sys.stderr)
    return 128 + received[0]


def interrupted_summary(cfg, nproc: int, since: float, name: str = "SIGINT") -> str:
    """One line after a signal (`name`) stopped a multi-process run: which checkpoint the processes saved
    (only one written after `since`, the launch time), if any."""
    from tune.engine import Checkpointer

    output_dir = getattr(cfg, "output_dir", None)
    latest = Checkpointer(Path(output_dir), keep=1).latest() if output_dir and hasattr(cfg, "train") else None
    if latest is None or (latest / "state.json").stat().st_mtime < since:
        return f"{'interrupted' if name == 'SIGINT' else f'stopped by {name}'} (no checkpoint was saved)"
    saved = sum((latest / f"rng_rank{rank}.pt").is_file() for rank in range(nproc))
    who = "every process saved its part" if saved == nproc else f"{saved} of {nproc} processes saved their part"
    return f"{'interrupted' if name == 'SIGINT' else f'stopped by {name}'}: checkpoint {latest} written ({who}); train.resume=true continues"


def cmd_export(args) -> int:
    """Write one checkpoint of a run as what the run writes at its end: an HF checkpoint (pretrain, native
    distilled student), a PEFT adapter or full model (finetune, HF student)."""
    from tune.engine import find_checkpoint
    from tune.files import directory_written_aside

    run_dir = Path(args.run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; give the output_dir of a `tune run`")
    name = read_yaml(config_file).get("recipe")
    if name is None:
        raise ConfigError(f"{config_file}: no 'recipe' key; it was not written by `tune run`")
    module = load_recipe(str(name))
    if not hasattr(module, "export_checkpoint"):
        raise ConfigError(f"{config_file}: {name} runs train no model, there is nothing to export")
    cfg = load_config(module.CONFIG_CLASS, str(config_file), [])
    if args.best and args.step is not None:
        raise ConfigError("give --step N or --best, not both")
    checkpoint = find_checkpoint(run_dir, args.step, best=args.best)
    out = Path(args.out) if args.out else run_dir / "exports" / checkpoint.name
    check_export_out(out, run_dir)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():  # checked before the export is written, not when it is moved there
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory for the export")
    try:
        with directory_written_aside(out) as tmp:
            module.export_checkpoint(cfg, run_dir, checkpoint, tmp)
    except FileNotFoundError:
        if checkpoint.exists():
            raise
        raise TuneError(f"{checkpoint} was removed while being exported (rotated by the run still training?); "
                        "export a newer step") from None
    print(f"exported {checkpoint} to {out}")
    return 0


def check_export_out(out: Path, run_dir: Path) -> None:
    """Refuse an --out that is, holds or lies inside the run directory (replacing it would delete the run or its
    checkpoints); only paths inside RUN_DIR/exports are allowed there. Raises ConfigError."""
    out_r, run_r = out.resolve(), run_dir.resolve()
    exports = run_r / "exports"
    if out_r.is_relative_to(exports) and out_r != exports:
        return
    if out_r == run_r or out_r.is_relative_to(run_r) or run_r.is_relative_to(out_r):
        raise ConfigError(f"--out {out} would overwrite the run {run_dir} or its checkpoints; choose a path outside "
                          f"it or inside {run_dir / 'exports'}")


RUN_ARTIFACTS = ("hf", "merged", "model", "student")  # what a run writes that `tune generate --model` loads


def check_generate_model(model: str) -> None:
    """One-line errors for the usual wrong --model: a missing path, or a run directory instead of its model."""
    from tune.hf import check_model_dir

    path = Path(model)
    if not path.exists():
        raise ConfigError(f"--model {model} does not exist (paths are relative to where you run tune)")
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        found = [name for name in RUN_ARTIFACTS if (path / name / "config.json").is_file()]
        if found:
            raise ConfigError(f"--model {model} is a run directory, not a model; use --model {path / found[0]}")
        if (path / "adapter").is_dir():
            base = read_yaml(path / "config.yaml").get("base_model", "BASE_MODEL")
            raise ConfigError(f"--model {model} is a run directory with an adapter; use --model {base} "
                              f"--adapter {path / 'adapter'}")
    check_model_dir(model, "--model")


def cmd_generate(args) -> int:
    """Stream a continuation of --prompt, or of one task instance's Tk-Instruct prompt (then its reference)."""
    import torch

    from tune.evaluation import (PrintStreamer, check_vocab, fit_prompt, generation_window, load_model,
                                 load_tokenizer, prompt_ids, special_ids, stream_generate)
    from tune.hf import unknown_characters, unknown_token_id

    if (args.prompt is None) == (args.task is None):
        raise ConfigError("give exactly one of --prompt TEXT or --task FILE")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 is off), got {args.top_k}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    task = instance = None
    if args.task is not None:
        from data_prep.natural_instructions import PromptConfig, load_task

        if not Path(args.task).is_file():
            raise ConfigError(f"--task {args.task}: no such task JSON file")
        task = load_task(args.task)
        if not 0 <= args.instance < len(task.instances):
            raise ConfigError(f"--instance {args.instance}: {args.task} has {len(task.instances)} instances; "
                              f"use 0..{len(task.instances) - 1}")
        instance = task.instances[args.instance]
    check_generate_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    model = load_model(args.model, args.adapter, args.dtype, quant=args.quant, quant_field="--quant")
    check_vocab(model, tokenizer, args.tokenizer or args.model)
    table = generation_window(model)
    if table is None:
        limit = None
    else:  # any length: a window slides over the context; a task's prompt still fits it when it can
        limit = table - args.max_new_tokens if args.max_new_tokens < table else table - 1
    prompt = args.prompt
    if task is not None:  # as `tune run evaluate` builds it: demonstrations dropped until it fits the context
        prompt, dropped = fit_prompt(tokenizer, task, instance.input, PromptConfig(), limit)
        if dropped:
            print(f"note: demonstrations dropped to fit the model's context ({limit} prompt tokens)", file=sys.stderr)
    pad_id, eos_ids = special_ids(model, tokenizer)
    ids = prompt_ids(tokenizer, prompt)
    unknown = unknown_characters(tokenizer, prompt) if unknown_token_id(tokenizer) in ids else []
    if unknown:
        print(f"note: the tokenizer does not know {len(unknown)} character(s) of the prompt, read as "
              f"{tokenizer.unk_token!r}: {' '.join(repr(c) for c in unknown)}", file=sys.stderr)
    sample = args.temperature > 0
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(args.seed)
    print(prompt, end="", flush=True)
    stream_generate(model, ids, args.max_new_tokens, PrintStreamer(tokenizer), pad_id, eos_ids,
                    temperature=args.temperature, top_k=args.top_k if sample else None,
                    top_p=args.top_p if sample else None)
    print(flush=True)
    if task is not None:
        print(f"--- {task.name}, instance {args.instance} (id {instance.id}); reference output"
              f"{'s' if len(instance.outputs) != 1 else ''}: " + " | ".join(instance.outputs), flush=True)
    return 0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def weight_bytes(model_dir) -> int:
    """Bytes of the *.safetensors weight files in `model_dir`."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def check_quantize_args(args) -> None:
    """One-line errors for `tune quantize` before anything loads: MODEL_DIR must be a full-precision HF causal LM
    (not an adapter, not already quantized), --adapter a peft adapter, OUT new (or --force) and not MODEL_DIR."""
    from tune.hf import check_adapter_dir, check_model_dir, stored_quant

    src, out = Path(args.model_dir), Path(args.out)
    if not src.exists():
        raise ConfigError(f"MODEL_DIR {src} does not exist (paths are relative to where you run tune)")
    if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        raise ConfigError(f"MODEL_DIR {src} is a peft adapter, not a model; give the base model it was trained on and "
                          f"the adapter to merge first: tune quantize BASE_MODEL {out} --adapter {src}")
    if (src / "config.yaml").is_file() and not (src / "config.json").is_file():
        found = [name for name in RUN_ARTIFACTS if (src / name / "config.json").is_file()]
        hint = (f"use {src / found[0]}" if found else
                f"give its base model and --adapter {src / 'adapter'}" if (src / "adapter").is_dir() else
                "give the model directory it wrote")
        raise ConfigError(f"MODEL_DIR {src} is a run directory, not a model; {hint}")
    check_model_dir(src, "MODEL_DIR")
    stored = stored_quant(src)
    if stored is not None:
        raise ConfigError(f"MODEL_DIR {src} is already quantized ({stored}: its config.json has quantization_config); "
                          "quantize the full-precision model it was made from")
    if args.adapter:
        check_adapter_dir(args.adapter, "--adapter")
    if out.resolve() == src.resolve() or src.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"OUT {out} would replace MODEL_DIR {src}; choose another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} is a file, not a directory; choose a directory for the quantized model")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"OUT {out} holds the directory you run tune in; choose a new directory for the quantized "
                          "model")
    if out.exists() and not args.force:
        raise ConfigError(f"OUT {out} already exists; pass --force to replace it or choose another OUT")
    if out.exists() and any(out.iterdir()) and not (out / "quantize_info.json").is_file():
        raise ConfigError(f"OUT {out} is not an earlier `tune quantize` output (no quantize_info.json) and not empty; "
                          "--force replaces only those: choose another OUT or remove it yourself")


def adapter_qlora_section(adapter):
    """The QuantSection a QLoRA adapter was trained under (its finetune run's config.yaml, next to adapter/), so
    it is merged into the dequantized 4-bit weights it learned against; None for a LoRA adapter or no run config."""
    from tune.train_config import QuantSection

    run_config = Path(adapter).parent / "config.yaml"
    if not run_config.is_file():
        return None
    saved = read_yaml(run_config)
    if saved.get("method") != "qlora":
        return None
    section = saved.get("qlora") or {}
    return QuantSection(**{k: v for k, v in section.items() if k in QuantSection.__dataclass_fields__})


def cmd_quantize(args) -> int:
    """Write MODEL_DIR (with --adapter: that LoRA adapter merged in first) as a bitsandbytes-quantized HF checkpoint
    with the tokenizer: AutoModelForCausalLM.from_pretrained, `tune generate` and `tune run evaluate` load it as is.
    Prints the weight bytes on disk before and after."""
    import tempfile

    import torch

    from tune.files import directory_written_aside
    from tune.hf import adapter_base_mismatch, bnb_config, experts_note, quiet_third_party, resolve_dtype

    check_quantize_args(args)
    from transformers import AutoModelForCausalLM

    src, out = Path(args.model_dir), Path(args.out)
    compute = resolve_dtype(args.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".merge-{out.name}-") as scratch:
        source, qlora = src, None
        if args.adapter:
            from tune.adapters import merge_adapter

            qlora = adapter_qlora_section(args.adapter)
            try:
                source = merge_adapter(src, args.adapter, Path(scratch) / "merged", dtype=torch.float32, quant=qlora)
            except RuntimeError as e:  # peft's load_state_dict: the adapter's shapes are another model's
                if "size mismatch" not in str(e):
                    raise
                trained_on = adapter_base_mismatch(args.adapter, src)
                raise ConfigError(f"--adapter {args.adapter} does not fit MODEL_DIR {src} (its weight shapes differ"
                                  + (f"; it was trained on {trained_on}" if trained_on else "")
                                  + "): give the base model it was trained on") from None
            print(f"merged {args.adapter} into a copy of {src}" + (
                " (the dequantized 4-bit base, as QLoRA trained it)" if qlora else ""), flush=True)
        kwargs = {"device_map": {"": torch.cuda.current_device()}} if torch.cuda.is_available() else {}
        try:
            with quiet_third_party():
                model = AutoModelForCausalLM.from_pretrained(
                    source, quantization_config=bnb_config(args.quant, compute, double_quant=args.double_quant),
                    dtype=compute, trust_remote_code=False, use_safetensors=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - transformers / bitsandbytes raise many types
            raise TuneError(f"MODEL_DIR {src}: cannot load it quantized ({str(e).strip().splitlines()[0][:200]})") from None
        note = experts_note(model, args.quant)
        if note:
            print(note, file=sys.stderr)
        with directory_written_aside(out) as tmp:
            with quiet_third_party():
                model.save_pretrained(tmp, safe_serialization=True)
            copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
            for name in copied:
                shutil.copyfile(src / name, tmp / name)
            before, after = weight_bytes(source), weight_bytes(tmp)
            (tmp / "quantize_info.json").write_text(json.dumps(
                {"source": str(src.resolve()), "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
                 "adapter_merged_into": ("the dequantized 4-bit base (QLoRA)" if qlora else "the full-precision base")
                 if args.adapter else None, "quant": args.quant,
                 "double_quant": args.double_quant if args.quant != "int8" else None,
                 "dtype": str(compute).removeprefix("torch."),
                 "weight_bytes_before": before, "weight_bytes_after": after,
                 "memory_footprint_bytes": model.get_memory_footprint()}, indent=2))
    if not copied:
        print(f"note: {src} holds no tokenizer files; pass --tokenizer to tune generate / set tokenizer= to evaluate",
              file=sys.stderr)
    print(f"wrote {out}: {args.quant} weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB on disk "
          f"({after / before:.2f}x); in memory {model.get_memory_footprint() / 2**20:.1f} MiB")
    return 0


def cmd_merge_adapters(args) -> int:
    """Combine LoRA adapters of one base into one PEFT adapter (peft's add_weighted_adapter), optionally merged into
    a full checkpoint (tune.adapters.combine_adapters)."""
    from tune.adapters import check_combination, combine_adapters

    check_combination(args.adapters, args.weights, args.combination, args.density, args.svd_rank)
    for path in [args.out] + ([args.merge] if args.merge else []):
        if Path(path).exists() and not args.force:
            raise ConfigError(f"{path} already exists; pass --force to replace it or choose another path")
    quants = [adapter_qlora_section(adapter) for adapter in args.adapters]  # QLoRA: their finetune run says so
    if any(q != quants[0] for q in quants):
        raise ConfigError("the adapters were trained on different bases: some on the 4-bit (QLoRA) base, or under "
                          "other qlora settings; combine adapters trained alike")
    combine_adapters(args.adapters, args.out, args.weights, args.combination, args.density, args.svd_rank,
                     base=args.base, merged=args.merge, quant=quants[0])
    print(f"combined {len(args.adapters)} adapters ({args.combination}) into {args.out}"
          + (f"; merged checkpoint: {args.merge}" if args.merge else ""))
    return 0


PREDICT_FIELDS = {"classification": ("text",), "entailment": ("premise", "hypothesis"), "similarity": ("a", "b"),
                  "multiple_choice": ("context", "choice")}


def column_pair(text: str) -> tuple[str, str]:
    """`FIELD=COLUMN` of `tune predict --column`, as a pair; argparse reports anything else as a usage error."""
    field, sep, column = text.partition("=")
    if not sep or not field.strip() or not column.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=COLUMN (e.g. text=sentence), got {text!r}")
    return field.strip(), column.strip()


def cmd_predict(args) -> int:
    """Print the label and class probabilities (or the score, or the choice) a `tune run classify` model gives one
    input, or write them for every row of --file as JSON lines."""
    import json

    from data_prep.task_data import SpecialTokens, TaskData, TaskRow, encode_rows, read_rows
    from tune.task_heads import load_task_model, predict, read_task_meta, task_model_dir

    path = Path(args.model)
    if not path.exists():
        raise ConfigError(f"--model {args.model} does not exist (paths are relative to where you run tune)")
    meta = read_task_meta(task_model_dir(path))
    kind = meta["kind"]
    given = {name: getattr(args, name) for name in ("text", "premise", "hypothesis", "a", "b", "context", "choice")
             if getattr(args, name)}
    needed = PREDICT_FIELDS[kind]
    flags = " ".join(f"--{n}" for n in needed)
    if args.file is None:
        if args.column or args.split:
            raise ConfigError("--column and --split apply to --file")
        wrong = sorted(set(given) - set(needed))
        if wrong or set(given) != set(needed):
            raise ConfigError(f"this model is a {kind} model: give {flags} TEXT"
                              + (" (repeat --choice for every candidate)" if kind == "multiple_choice" else "")
                              + (f", not --{' --'.join(wrong)}" if wrong else "") + ", or --file ROWS")
        fields = {("choices" if n == "choice" else n): given[n] for n in needed}
        rows = [TaskRow(fields=fields, label=None, where="the command line")]
    else:
        if given:
            raise ConfigError(f"give --file or {flags}, not both")
        rows = read_rows(args.file, kind, dict(args.column or []), args.split, with_labels=False,
                         keys={"split": "--split", "column": "--column {field}=COLUMN"})
    if kind == "multiple_choice":
        for row in rows:
            choices = row.fields["choices"]
            if len(choices) < 2 or len(set(choices)) < len(choices):
                raise ConfigError(f"{row.where}: multiple choice needs at least 2 different choices, got {choices}")
    model, tokenizer, meta = load_task_model(path, dtype=args.dtype, base_model=args.base)
    regression = bool(meta.get("regression"))
    data = TaskData(kind=kind, rows=rows, labels=meta.get("labels"), targets=[0] * len(rows), regression=regression)
    examples, n_cut = encode_rows(data, tokenizer, SpecialTokens(**meta["token_ids"]), meta["max_length"])
    if n_cut:
        print(f"note: {n_cut} input(s) truncated to {meta['max_length']} tokens", file=sys.stderr)
    out = predict(model, examples, tokenizer.pad_token_id, regression)
    names = meta.get("labels") or (rows[0].fields["choices"] if kind == "multiple_choice" and args.file is None
                                   else None)
    for i, row in enumerate(rows):
        if regression:
            result = {"score": round(float(out[i]), 6)}
        else:
            probs = out[i].tolist()[:len(row.fields["choices"])] if kind == "multiple_choice" else out[i].tolist()
            labels = row.fields["choices"] if kind == "multiple_choice" else names
            best = max(range(len(probs)), key=probs.__getitem__)
            result = {"label": labels[best], "index": best,
                      "probabilities": {str(lab): round(p, 6) for lab, p in zip(labels, probs)}}
        if args.file is None:
            if regression:
                print(f"score: {result['score']:.4f}")
            else:
                print(f"{result['label']}")
                for lab, p in sorted(result["probabilities"].items(), key=lambda kv: -kv[1]):
                    print(f"  {p:.4f}  {lab}")
        else:
            print(json.dumps({"row": row.where, **result}, ensure_ascii=False))
    return 0


def cmd_plan(args) -> int:
    """Print the plan of a config (tune/plan.py): no torch for native presets and HF config.json files."""
    from tune import plan

    if args.processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {args.processes}")
    plan.check_mfu(args.mfu)
    plan.gpu_peak_tflops(args.gpu, args.peak_tflops)  # a bad name fails before any config is read
    if args.model_size is not None:
        if args.config is not None:
            raise ConfigError("give either a CONFIG or --model-size, not both")
        n = plan.parse_size(args.model_size)
        print(json.dumps({"params": n, "what_fits_bytes": plan.what_fits(n)}, indent=2) if args.json
              else plan.format_size_answer(n))
        return 0
    if args.config is None:
        raise ConfigError("tune plan needs a CONFIG (file or built-in name) or --model-size N (e.g. 70B)")
    model_dir = Path(args.config).parent if Path(args.config).name == "config.json" else Path(args.config)
    if (model_dir / "config.json").is_file():
        raise ConfigError(f"{args.config} is a model, not a recipe config; plan a run on it, e.g. tune plan "
                          f"lora_ni_own_model base_model={model_dir} (or method=full / qlora), or tune plan eval_ni "
                          f"model={model_dir} for inference")
    module, cfg = load_recipe_config(args.config, args.overrides, check=False)
    facts = plan.run_facts(module.__name__.split(".")[-1], cfg, args.device, args.processes, fsdp=True)
    result = plan.plan_run(facts, args.gpu, args.peak_tflops, args.mfu)
    print(plan.plan_json(result) if args.json else plan.format_plan(result))
    return 0


def package_version() -> str:
    """The installed gpt-tune version ("unknown" when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpt-tune")
    except PackageNotFoundError:
        return "unknown"


def os_error_line(e: OSError) -> str:
    """One line for an OSError on a user's path: `cannot use PATH: STRERROR` (+ the second path of a copy/rename)."""
    paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    if not paths:  # an OSError that names no path (e.g. a library's "cannot load this model"): its own message
        return f"{e}; set TUNE_DEBUG=1 for the traceback"
    reason = e.strerror or str(e)
    hint = ""
    if isinstance(e, NotADirectoryError):
        hint = " (a part of the path is a file, not a directory)"
    elif isinstance(e, PermissionError):
        hint = " (no permission there; choose a path you can write)"
    elif isinstance(e, FileNotFoundError):
        hint = " (a parent directory is missing or cannot be created there)"
    elif isinstance(e, IsADirectoryError):
        hint = " (a directory where a file is expected)"
    return f"cannot use {paths}: {reason}{hint}; set TUNE_DEBUG=1 for the traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune", description="Pretrain, fine-tune and distill GPT models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes and their built-in configs").set_defaults(func=cmd_ls)
    p = sub.add_parser("cp", help="copy a built-in config to a file you can edit")
    p.add_argument("config")
    p.add_argument("dest")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_cp)
    p = sub.add_parser("cat", help="print a config resolved: defaults filled in, overrides applied "
                                   "(keys and values checked)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_cat)
    p = sub.add_parser("validate", help="check a config (keys, types, values) without running it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("run", help="run a recipe")
    p.add_argument("recipe")
    p.add_argument("--config", required=True, help="a YAML file or the name of a built-in config")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (started with torch.distributed.run; works on CPU and GPUs)")
    p.add_argument("--nnodes", type=int, default=1,
                   help="machines taking part; run the same command on each (needs --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes: the first node's address and a free port, the same on every node "
                        "(torchrun's c10d rendezvous)")
    p.add_argument("--rdzv-id", default="tune", help="the rendezvous id, the same on every node (e.g. $SLURM_JOB_ID)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this machine's rank (optional: the c10d rendezvous assigns one)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 model.dropout=0.1")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("export", help="write a run's checkpoint as its final artifact (HF model, adapter, student)")
    p.add_argument("run_dir", help="the output_dir of a tune run")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    p.add_argument("--best", action="store_true",
                   help="the checkpoint of the lowest validation loss (runs with train.keep_best=true)")
    p.add_argument("--out", default=None, help="where to write it (default: RUN_DIR/exports/step_NNNNNNN)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("generate", help="stream text from an HF causal LM (+ adapter) for a prompt or a task instance")
    p.add_argument("--model", required=True, help="an HF causal-LM directory")
    p.add_argument("--adapter", help="a peft adapter directory trained on --model")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--task", help="a Natural-Instructions task JSON: continue the Tk-Instruct prompt of an instance")
    p.add_argument("--instance", type=int, default=0, help="which instance of --task (default 0)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--quant", choices=["int8", "nf4", "fp4"], default=None,
                   help="load the model through bitsandbytes: int8 (LLM.int8) or 4-bit nf4 / fp4; --adapter applies on "
                        "top (a model saved by tune quantize loads quantized without it)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("predict", help="label / score / choice of a `tune run classify` model for one input or a file")
    p.add_argument("--model", required=True, help="the run's model/ or adapter/ directory (or the run directory)")
    p.add_argument("--text", help="classification: the text")
    p.add_argument("--premise", help="entailment: the premise")
    p.add_argument("--hypothesis", help="entailment: the hypothesis")
    p.add_argument("--a", help="similarity: the first text")
    p.add_argument("--b", help="similarity: the second text")
    p.add_argument("--context", help="multiple choice: the context (question)")
    p.add_argument("--choice", action="append", help="multiple choice: a candidate answer (repeat for each)")
    p.add_argument("--file", help="rows to predict (.jsonl / .csv / .tsv / datasets directory); JSON lines out")
    p.add_argument("--column", action="append", type=column_pair, metavar="FIELD=COLUMN",
                   help="with --file: our field name = your column name (repeatable)")
    p.add_argument("--split", default=None, help="with --file of a DatasetDict directory: the split (default train)")
    p.add_argument("--base", default=None, help="LoRA / QLoRA adapters: the base model directory, when it moved "
                                                "since training (default: the path the run recorded)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("quantize", help="write an HF causal LM (+ a merged LoRA adapter) as a bitsandbytes int8 / "
                                        "nf4 / fp4 checkpoint that from_pretrained loads")
    p.add_argument("model_dir", help="a full-precision HF causal-LM directory")
    p.add_argument("out", help="the directory to write (written aside, then renamed)")
    p.add_argument("--quant", choices=["int8", "nf4", "fp4"], default="nf4", help="default nf4")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="4-bit: do not quantize the block scales too (double quantization saves ~0.4 bit/weight)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="4-bit compute dtype and the dtype of the layers left unquantized (auto: bf16 on a GPU that "
                        "has it, else fp32)")
    p.add_argument("--adapter", default=None, help="a LoRA / QLoRA adapter trained on MODEL_DIR: merged in first")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("merge-adapters", help="combine LoRA adapters of one base into one (peft's add_weighted_adapter: "
                                              "linear, cat, svd, TIES, DARE, magnitude pruning)")
    p.add_argument("adapters", nargs="+", help="two or more PEFT LoRA adapter directories trained on the same base")
    p.add_argument("--out", required=True, help="the combined adapter directory to write (written aside, then renamed)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter (default 1.0 each)")
    p.add_argument("--combination", default="linear", help="linear (default), cat, svd, ties, dare_linear, "
                                                            "dare_ties or magnitude_prune")
    p.add_argument("--density", type=float, default=None,
                   help="ties / dare_* / magnitude_prune: the fraction of each adapter's values kept, in (0, 1]")
    p.add_argument("--svd-rank", type=int, default=None, help="svd: the combined adapter's rank (default: the largest)")
    p.add_argument("--base", default=None, help="the base model directory (default: the one the adapters record)")
    p.add_argument("--merge", default=None, metavar="DIR", help="also write the base with the combined adapter merged "
                                                                "in, a full HF checkpoint, to DIR")
    p.add_argument("--force", action="store_true", help="replace --out / --merge if they exist")
    p.set_defaults(func=cmd_merge_adapters)
    p = sub.add_parser("plan", help="parameters, FLOPs, wall time and memory per process of a config (reads the preset "
                                    "or config.json: no weights, no data)")
    p.add_argument("config", nargs="?", help="a config file or built-in config name (or use --model-size)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for tune run")
    p.add_argument("--model-size", help="no config: the inference weight memory of this many parameters (70B, 350M)")
    p.add_argument("--gpu", default=None, help=f"for the wall time: one of {', '.join(GPU_PEAK_TFLOPS)} (default H100)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 TFLOP/s instead of --gpu")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the wall time")
    p.add_argument("--processes", type=int, default=1, help="training processes (data parallel; adds an FSDP column)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where it trains: decides what dtype=auto and mixed_precision=auto mean (default cuda)")
    p.add_argument("--json", action="store_true", help="the plan as JSON (bytes, FLOPs, seconds)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (tune run pretrain --config demo train.lr=1e-3)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (tune plan ... | head): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter's final flush must not fail again
        return 0
    except OSError as e:  # a user's path that cannot be used (missing parent, a file in the way, no permission)
        if os.environ.get("TUNE_DEBUG") == "1":
            raise
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGUSR1 during training (tune.runtime.Interrupted)
        signum = getattr(e, "signum", None)
        if not getattr(e, "reported", False) and "LOCAL_RANK" not in os.environ:  # outside training (fit says it)
            print("interrupted" if signum is None else f"stopped by {e}", file=sys.stderr)
        return 128 + (signum or 2)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1


if __name__ == "__main__":
    sys.exit(main())
