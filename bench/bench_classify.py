"""GPT-1 task heads vs generation vs the majority class on the Natural-Instructions tasks with a small label set.

    python -m bench.bench_classify [--base runs/shakespeare_bpe_cpu/hf] [--tasks DIR] [--epochs 10] [--lr 1e-4]
                                   [--heldout 20] [--lm-coef 0.5,0] [--seeds 1] [--method full] [--no-generation]
                                   [--json OUT] [--md OUT]

For every task of --tasks that qualifies (data_prep.task_data.ni_qualification: one output per instance, 2..10
distinct outputs), in this process, one after another:
- task head: `tune run classify` (recipes/configs/classify_ni.yaml with these settings) once per --lm-coef value
  (GPT-1's lambda; 0 = no auxiliary LM loss) and per seed (--seeds N: seeds 0..N-1 of the head's initialisation and
  the data order; the table shows the mean, and the range over seeds): held-out accuracy and macro-F1;
- generation: `tune run finetune` on the same split, base, method, steps and lr (the classify recipe's
  eval.generation_baseline, run with the first --lm-coef): exact match and ROUGE-L on the same held-out instances;
- majority: the most frequent training label for every held-out instance.
Every side sees the same training instances and the same held-out instances (data.seed 0). The base defaults to
the built-in CPU chain's pretraining export (`tune run pretrain --config shakespeare_bpe_cpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from bench.common import banner, print_banner, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
NI_TASKS = REPO.parent / "shared" / "data" / "natural_instructions" / "tasks"


def qualifying(tasks_dir: Path) -> list[tuple[Path, str, str]]:
    """(task file, kind or None, reason) for every task JSON in `tasks_dir`, in name order."""
    from data_prep.natural_instructions import load_task
    from data_prep.task_data import ni_qualification
    from tune.errors import TuneError

    rows = []
    for path in sorted(tasks_dir.glob("*.json")):
        try:
            kind, reason = ni_qualification(load_task(path))
        except TuneError as e:
            kind, reason = None, str(e)
        rows.append((path, kind, reason))
    return rows


def run_task(task: Path, args, lm_coef: float, generation: bool, out: Path, seed: int = 1337) -> dict:
    """One classify run (stdout to out/log.txt); its eval_results.json and the wall time in seconds."""
    from recipes.classify import ClassifyConfig, run
    from tune.config import load_config

    cfg = load_config(ClassifyConfig, "classify_ni", [
        f"base_model={args.base}", f"data.ni_task={task}", f"output_dir={out}", "overwrite=true",
        f"method={args.method}", f"epochs={args.epochs}", f"train.lr={args.lr}", f"task.lm_coef={lm_coef}",
        f"data.heldout_instances={args.heldout}", f"eval.generation_baseline={str(generation).lower()}",
        "train.progress=false", "train.eval_every=0", f"seed={seed}"])
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out.parent / f"{out.name}.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        run(cfg)
    results = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    results["seconds"] = time.time() - start
    return results


def pct(value) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"


def spread(values: list[float]) -> str:
    """The mean, and with several values their range: `61.7 (55.0-70.0)`."""
    mean = sum(values) / len(values)
    return pct(mean) if len(values) == 1 else f"{pct(mean)} ({pct(min(values))}-{pct(max(values))})"


def markdown(rows: list[list[str]], headers: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(REPO / "runs" / "shakespeare_bpe_cpu" / "hf"))
    parser.add_argument("--tasks", default=str(NI_TASKS))
    parser.add_argument("--method", default="full", choices=["full", "lora", "qlora"])
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--heldout", type=int, default=20)
    parser.add_argument("--lm-coef", default="0.5,0", help="comma-separated lambda values (the first also runs generation)")
    parser.add_argument("--seeds", type=int, default=1, help="task-head runs per lambda (seeds 0..N-1)")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args(argv)
    if not (Path(args.base) / "config.json").is_file():
        raise SystemExit(f"--base {args.base} is not a model directory; run `tune run pretrain --config "
                         "shakespeare_bpe_cpu` first (or pass --base)")
    coefs = [float(x) for x in args.lm_coef.split(",")]
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_classify_"))
    print_banner(banner(), {"base": args.base, "method": args.method, "epochs": args.epochs, "lr": args.lr,
                            "held out": args.heldout, "lm_coef": coefs, "workdir": str(workdir)})
    table = qualifying(Path(args.tasks))
    for path, kind, reason in table:
        print(f"  {path.stem}: {kind or 'not used'} ({reason})")
    results = {}
    for path, kind, _ in table:
        if kind is None:
            continue
        for i, coef in enumerate(coefs):
            for seed in range(args.seeds):
                r = run_task(path, args, coef, generation=i == 0 and seed == 0 and not args.no_generation,
                             out=workdir / f"{path.stem}_lm{coef}_seed{seed}", seed=seed)
                results.setdefault(path.stem, {}).setdefault(coef, []).append(r)
                print(f"{path.stem} lm_coef={coef} seed {seed}: accuracy {pct(r['task_head']['accuracy'])} (majority "
                      f"{pct(r['majority']['accuracy'])}), {r['seconds']:.0f} s", flush=True)
    headers = ["task", "kind", "held out", "majority acc"] + [f"head acc (λ={c:g})" for c in coefs] + \
        [f"head macro-F1 (λ={coefs[0]:g})", "generation EM", "generation ROUGE-L"]
    rows = []
    for name, by_coef in results.items():
        first = by_coef[coefs[0]][0]
        gen = first.get("generation", {})
        rows.append([name, first["kind"], str(first["heldout_rows"]), pct(first["majority"]["accuracy"])]
                    + [spread([r["task_head"]["accuracy"] for r in by_coef[c]]) for c in coefs]
                    + [spread([r["task_head"]["macro_f1"] for r in by_coef[coefs[0]]]), pct(gen.get("exact_match")),
                       pct(gen.get("rougeL"))])
    print()
    print_table(headers, rows, title="held-out accuracy / exact match (%), same training and held-out instances")
    if args.md:
        Path(args.md).write_text(markdown(rows, headers) + "\n", encoding="utf-8")
        print(f"wrote {args.md}")
    if args.json:
        write_json(args.json, {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
