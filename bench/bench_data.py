"""Data preparation at scale: load -> tokenize -> pack Natural-Instructions-style tasks, 10k .. 1M instances.

Synthetic tasks (k task files, each a definition of ~45 words, 2 positive examples and N/k instances of
~25-250 words with 1-12 word outputs: prompts of ~250-600 tokens, like SNI's) are written to a work directory
once per size (not timed), with a byte-level BPE tokenizer (data_prep.text.train_bpe_tokenizer, 4096 entries).
Each size then runs twice, each time in a fresh process:

  cold   load_tasks + split_instances, build_dataset (tokenize through datasets.map, written to the cache),
         NIBatches(packing=True) (best-fit-decreasing packs, cached) and the first step's batch
  warm   the same with every cache in place (the tasks are still parsed: only tokenizing and packing are cached)

and prints seconds per stage, instances/s, the process's peak RSS and the growth factor between sizes (n log n
is ~10x per 10x). The quadratic first-fit packer the project used before is timed on 5k / 10k / 20k of the
same lengths for comparison. Target (issue 11): 1M instances ready to train in < 5 min on 2 cores, < 30 s cached.

    python -m bench.bench_data --sizes 10000 100000          # 2-core CPU: ~1.5 min (data generation included)
    python -m bench.bench_data --sizes 10000 100000 1000000  # + 1M: ~8 min more, ~3 GB of files in --workdir
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import fmt, isolated, print_table, write_json

SEED = 0


def old_first_fit(lengths, max_length):
    """The packer before issue 11 (quadratic: every example scans the open bins), for comparison."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


# -- synthetic data -------------------------------------------------------------------------------------
def _lexicon(rng, n=3000):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, int(k))) for k in rng.integers(2, 9, n)]


def _words(rng, lexicon, lengths):
    """One string per length: that many words drawn from the lexicon (Zipf-like frequencies)."""
    ranks = np.minimum(rng.zipf(1.3, int(sum(lengths))), len(lexicon)) - 1
    out, start = [], 0
    for n in lengths:
        out.append(" ".join(lexicon[j] for j in ranks[start:start + n]))
        start += n
    return out


def write_tasks(out: Path, n_instances: int, n_tasks: int) -> Path:
    """`n_tasks` task files holding `n_instances` instances in all, under out/tasks (reused when complete)."""
    tasks_dir = out / "tasks"
    if (out / "complete").is_file():
        return tasks_dir
    shutil.rmtree(out, ignore_errors=True)
    tasks_dir.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    lexicon = _lexicon(np.random.default_rng(1))
    per_task = -(-n_instances // n_tasks)
    for t in range(n_tasks):
        count = min(per_task, n_instances - t * per_task)
        if count <= 0:
            break
        definition, *demo_in = _words(rng, lexicon, [45, 30, 30])
        demo_out = _words(rng, lexicon, [3, 3])
        inputs = _words(rng, lexicon, np.clip(rng.lognormal(4.2, 0.6, count).astype(int), 5, 250))
        outputs = _words(rng, lexicon, rng.integers(1, 13, count))
        task = {"Definition": [definition.capitalize() + "."],
                "Positive Examples": [{"input": i, "output": o, "explanation": ""} for i, o in zip(demo_in, demo_out)],
                "Negative Examples": [],
                "Instances": [{"id": f"task{t:04d}-{k}", "input": i, "output": [o]}
                              for k, (i, o) in enumerate(zip(inputs, outputs))]}
        (tasks_dir / f"task{t:04d}_synthetic.json").write_text(json.dumps(task), encoding="utf-8")
    (out / "complete").write_text("")
    return tasks_dir


def make_tokenizer(workdir: Path) -> Path:
    from data_prep.text import train_bpe_tokenizer

    path = workdir / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        rng = np.random.default_rng(2)
        texts = _words(rng, _lexicon(np.random.default_rng(1)), [200] * 500)
        texts += ["Definition: Now complete the following example -\nInput: Output: Positive Example 1 -\n"]
        train_bpe_tokenizer(texts, 4096).save_pretrained(str(path))
    return path


# -- the timed pipeline (in a fresh process) --------------------------------------------------------------
def pipeline(tasks_dir: str, tokenizer_dir: str, cache_dir: str, max_length: int, num_proc: int | None) -> dict:
    from transformers import AutoTokenizer

    from data_prep.natural_instructions import (NISplitConfig, PromptConfig, TokenizeConfig, build_dataset,
                                                load_tasks, split_instances, tokenize_workers)
    from tune.packing import NIBatches, example_lengths

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    t0 = time.perf_counter()
    tasks = load_tasks(tasks_dir)
    splits = split_instances(tasks, NISplitConfig(heldout_instances_per_task=0))
    del tasks
    t1 = time.perf_counter()
    train, report = build_dataset(splits["train"], tokenizer, PromptConfig(), TokenizeConfig(max_length=max_length),
                                  cache_dir, num_proc=num_proc)
    n_instances = len(splits["train"])
    del splits
    t2 = time.perf_counter()
    source = NIBatches(train, [], 8, 1, seed=SEED, packing=True, max_length=max_length, pad_id=tokenizer.pad_token_id)
    source.step_batches(1, 0, 1)
    t3 = time.perf_counter()
    lengths = example_lengths(train)
    return {"instances": n_instances, "examples": len(train), "packs": len(source.units), "tokens": report.tokens,
            "load_s": t1 - t0, "tokenize_s": t2 - t1, "pack_s": t3 - t2, "total_s": t3 - t0,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
            "num_proc": num_proc or tokenize_workers(n_instances), "lengths_head": lengths[:20_000].tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--tasks", type=int, default=200, help="task files per size")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: tokenize_workers)")
    p.add_argument("--workdir", default=".cache/bench_data")
    p.add_argument("--keep-cache", action="store_true", help="start from the previous run's caches (no cold run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = make_tokenizer(workdir)
    print(f"cores: {len(os.sched_getaffinity(0))}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows, results = [], {}
    for n in args.sizes:
        t = time.perf_counter()
        tasks_dir = write_tasks(workdir / f"data-{n}", n, min(args.tasks, n))
        print(f"{n:,} instances in {tasks_dir} ({time.perf_counter() - t:.0f} s to write)", flush=True)
        cache = workdir / f"cache-{n}"
        if not args.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
        runs = {}
        for name in ("cold", "warm"):
            runs[name] = isolated(pipeline, str(tasks_dir), str(tokenizer_dir), str(cache), args.max_length,
                                  args.num_proc)
            r = runs[name]
            print(f"  {name}: {r['total_s']:.1f} s (load {r['load_s']:.1f}, tokenize {r['tokenize_s']:.1f}, "
                  f"pack {r['pack_s']:.1f}), peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
        results[n] = runs
    prev = None
    for n in args.sizes:
        for name in ("cold", "warm"):
            r = results[n][name]
            growth = None if prev is None else r["total_s"] / results[prev][name]["total_s"]
            rows.append([f"{n:,}", name, fmt(r["load_s"], ".1f"), fmt(r["tokenize_s"], ".1f"), fmt(r["pack_s"], ".2f"),
                         fmt(r["total_s"], ".1f"), fmt(r["instances"] / r["total_s"], ",.0f"),
                         fmt(r["peak_rss_gib"], ".2f"), fmt(growth, ".1f") + ("x" if growth else ""),
                         f"{r['examples'] / r['packs']:.1f}"])
        prev = n
    print_table(["instances", "run", "load s", "tokenize s", "pack s", "total s", "inst/s", "peak RSS GiB",
                 "growth", "ex/pack"], rows,
                title=f"\nload -> tokenize -> pack (max_length {args.max_length}, {results[args.sizes[0]]['cold']['num_proc']} "
                      "tokenizing process(es)); growth = total time / the previous size's")
    lengths = max((results[n]["cold"]["lengths_head"] for n in args.sizes), key=len)
    old = []
    from tune.packing import best_fit_decreasing
    for k in (5_000, 10_000, 20_000):
        if len(lengths) >= k:
            t = time.perf_counter()
            old_first_fit(lengths[:k], args.max_length)
            t_old = time.perf_counter() - t
            t = time.perf_counter()
            best_fit_decreasing(lengths[:k], args.max_length)
            old.append([f"{k:,}", f"{t_old:.2f}", f"{time.perf_counter() - t:.3f}"])
    if old:
        print_table(["examples", "old first-fit s", "best-fit-decreasing s"], old, title="\npacking alone, same lengths")
    if args.json:
        for runs in results.values():
            for r in runs.values():
                r.pop("lengths_head")
        write_json(args.json, {"sizes": args.sizes, "results": results, "old_packer": old})


if __name__ == "__main__":
    main()
