"""bench/gpu_check.py: the one prepared GPU command. --smoke runs the whole script on CPU with tiny shapes, so
it cannot rot between the (rare) sessions that have a GPU; the dependency check fails fast with the fix."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NI_TASKS

REPO = Path(__file__).resolve().parents[1]


def test_smoke_runs_every_check_and_benchmark(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out),
                           "--ni-tasks", str(NI_TASKS)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    from bench import gpu_check

    assert list(report["checks"]) == list(gpu_check.CHECKS)
    status = {name: r["status"] for name, r in report["checks"].items()}
    skipped = {"liger", "qlora_fsdp", "cuda_tests"}  # need CUDA / are skipped in --smoke: not "ok"
    assert status == {name: "skipped" if name in skipped else "ok" for name in gpu_check.CHECKS}, report["checks"]
    assert "paged_adamw skipped" in report["checks"]["optimizers"]["detail"]
    benches = report["benches"]
    assert benches["pretrain"]["ours"]["tokens_per_s"] > 0 and benches["pretrain"]["plain_loop"]["tokens_per_s"] > 0
    finetune = benches["finetune"]
    for side in ("ours-flex", "ours-dense", "baseline"):
        assert finetune["lora"][side]["tokens_per_s"] > 0
    for side in ("ours", "baseline"):
        assert finetune["qlora"][side]["tokens_per_s"] > 0
    assert set(benches["distill"]["sides"]) == {"student alone", "distillation, live", "distillation, cached",
                                                "distillation, on-policy"}
    markdown = (out / "gpu_check.md").read_text()
    assert "SMOKE" in markdown and "| bf16_step | ok |" in markdown and "ours / plain_loop" in markdown
    assert "| cuda_tests | *skipped* | skipped: needs CUDA |" in markdown
    assert "all checks ok, no benchmark errors (skipped: liger, qlora_fsdp, cuda_tests)" in proc.stdout
    assert "(flex)" in markdown and "(dense)" in markdown
    assert "moe" not in benches  # opt-in: --only moe


@pytest.mark.slow  # ~25 s: the MoE bench's CPU dry run
def test_the_opt_in_moe_benchmark_and_check_run_with_only(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out), "--only",
                           "moe_bf16,moe", "--ni-tasks", str(NI_TASKS)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["checks"]["moe_bf16"]["status"] == "ok", report["checks"]["moe_bf16"]
    results = report["benches"]["moe"]["results"]
    assert len(results) == 3 and all(r["tokens_per_s"] > 0 for r in results.values())
    assert "### Mixture of Experts vs dense" in (out / "gpu_check.md").read_text()


def test_missing_packages_are_listed_with_the_pip_command(monkeypatch):
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "required_packages", lambda: ["torch", "datasets", "no-such-package-xyz", "pyyaml"])
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name: None if name in ("datasets", "no_such_package_xyz") else real(name))
    problems = gpu_check.check_dependencies(smoke=True)
    pin = gpu_check.pinned_versions()["datasets"]
    assert len(problems) == 1
    assert "missing packages: datasets, no-such-package-xyz" in problems[0]
    assert f"pip install datasets=={pin} no-such-package-xyz" in problems[0]


def test_every_dependency_maps_to_an_importable_module():
    """The name -> module mapping covers pyproject's dependencies (all installed here)."""
    from bench import gpu_check

    assert gpu_check.missing_packages(gpu_check.required_packages()) == []


@pytest.mark.parametrize("args, message", [
    (["--ni-tasks", "/no/such/dir"], "--ni-tasks /no/such/dir is not a directory"),
    (["--only", "bf16_step,nonsense"], "--only: unknown nonsense"),
    (["--ni-tasks", "EMPTY"], "holds no task JSON files (*.json"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    message = message.replace("EMPTY", str(tmp_path / "empty"))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_flex_check_compares_an_sdpa_model_with_a_flex_model_of_the_same_weights(tmp_path):
    """On CUDA the dense side must not go through the flex_attention HF model (it adds a bool mask to the scores)."""
    import torch

    from bench import gpu_check

    ctx = gpu_check.Context(True, NI_TASKS, tmp_path)
    ctx.cuda = True  # how the models are chosen on a GPU; nothing runs on one here
    dense = gpu_check._flex_model(ctx, "hf_llama", 64, "dense")
    flex = gpu_check._flex_model(ctx, "hf_llama", 64, "flex", like=dense)
    assert dense.config._attn_implementation == "sdpa"
    assert flex.config._attn_implementation == "flex_attention"
    assert flex is not dense
    for (name, a), b in zip(dense.state_dict().items(), flex.state_dict().values()):
        assert torch.equal(a, b), name
    native = gpu_check._flex_model(ctx, "native", 64, "dense")
    assert gpu_check._flex_model(ctx, "native", 64, "flex", like=native) is native


@pytest.mark.parametrize("failing", ["ours", "baseline"])
def test_pretrain_throughput_under_a_cap_records_a_failed_side_and_keeps_the_others(monkeypatch, capsys, failing):
    from bench import bench_pretrain as bp

    def fake_isolated(fn, shape, steps, timeout=None):
        if fn is {"ours": bp.run_ours, "baseline": bp.run_baseline}[failing]:
            raise RuntimeError(f"{fn.__name__} did not finish within its cap (killed)")
        step = {bp.run_ours: 0.1, bp.run_baseline: 0.2, bp.run_plain_loop: 0.4}[fn]
        return {"impl": fn.__name__, "step_times": [step] * steps, "peak_bytes": 100, "memory_method": "test",
                "details": ""}

    monkeypatch.setattr(bp, "isolated", fake_isolated)
    shape = dict(bp.SIZES["smoke"])
    steps, warmup = shape.pop("steps"), shape.pop("warmup")
    res = bp.throughput(shape, steps, warmup, None, plain_loop=True, timeout=30)
    assert "killed" in res[failing]["error"]
    kept = {"ours", "baseline", "plain_loop"} - {failing}
    assert all(res[side]["tokens_per_s"] > 0 for side in kept)
    assert "ratio_ours_over_baseline" not in res
    assert res["ratios"] == ({} if failing == "ours" else {"plain_loop": pytest.approx(4.0)})
    bp.print_throughput(res)
    assert f"{failing}: FAILED" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="killed"):  # the standalone benchmark (no cap) needs every side
        bp.throughput(shape, steps, warmup, None, plain_loop=True, timeout=None)


def test_benchmarks_get_shares_of_the_budget_left_and_long_checks_only_the_rest(monkeypatch, tmp_path):
    import time

    from bench import gpu_check

    caps, timeouts = {}, {}
    fake = {name: (lambda ctx, cap, name=name: caps.setdefault(name, cap) and {}, share)
            for name, (_, share) in gpu_check.BENCHES.items()}
    monkeypatch.setattr(gpu_check, "BENCHES", fake)
    for name in gpu_check.LONG_CHECKS:
        monkeypatch.setitem(gpu_check.CHECKS, name, lambda ctx, t, name=name: timeouts.setdefault(name, t) and
                            {"ok": True, "detail": "ran"})
    ctx = gpu_check.Context(True, NI_TASKS, tmp_path)
    started = time.time() - 80  # the fast checks took 80 s of a 480 s budget: 400 s left
    gpu_check.run_benches(ctx, ["pretrain", "finetune", "distill"], 480, started)
    assert caps["pretrain"] == pytest.approx(100, abs=1)  # 25% of 400 s
    # pretraining took no time, so its unused 100 s go to the others: 55/75 of the 400 s still left, then all of it
    assert caps["finetune"] == pytest.approx(0.55 / 0.75 * 400, abs=1)
    assert caps["distill"] == pytest.approx(400, abs=1)
    long = gpu_check.run_long_checks(ctx, ["qlora_fsdp", "cuda_tests"], 480, time.time() - 330)  # 150 s left
    # half each; qlora_fsdp took no time here, so cuda_tests has all 150 s
    assert timeouts == {"qlora_fsdp": pytest.approx(75, abs=1), "cuda_tests": pytest.approx(150, abs=1)}
    assert [r["status"] for r in long.values()] == ["ok", "ok"]
    timeouts.clear()
    long = gpu_check.run_long_checks(ctx, ["qlora_fsdp", "cuda_tests"], 480, time.time() - 400)  # 80 s left
    assert timeouts["qlora_fsdp"] == pytest.approx(60, abs=1)  # at least 60 s, not half of 80
    timeouts.clear()
    long = gpu_check.run_long_checks(ctx, ["qlora_fsdp", "cuda_tests"], 480, time.time() - 430)  # 50 s left
    assert timeouts == {}
    assert all(r["status"] == "skipped" and "budget" in r["detail"] for r in long.values())


def test_exit_status_and_summary_count_failed_checks_and_benchmark_errors():
    from bench import gpu_check

    out = {"checks": {"bf16_step": {"status": "ok"}, "liger": {"status": "skipped"}},
           "benches": {"pretrain": {"ours": {"error": "killed"}, "baseline": {"tokens_per_s": 1.0}},
                       "finetune": {"lora": {"baseline": {"error": "OOM"}, "ours-flex": {"tokens_per_s": 1.0}}},
                       "distill": {"skipped": "time budget spent"}}}
    assert gpu_check.bench_errors(out["benches"]) == ["pretrain ours", "finetune lora/baseline"]
    assert gpu_check.summary(out) == ("benchmark errors: pretrain ours, finetune lora/baseline "
                                      "(skipped: liger, distill)")
    out["checks"]["bf16_step"]["status"] = "FAIL"
    assert gpu_check.summary(out).startswith("FAILED checks: bf16_step; benchmark errors")


def test_resume_and_offload_checks_run_with_deterministic_algorithms_on_cuda(monkeypatch, tmp_path):
    import torch

    from bench import gpu_check

    seen = {}
    for name in ("resume_bf16", "activation_offload", "bf16_step"):
        monkeypatch.setitem(gpu_check.CHECKS, name, lambda ctx, name=name: seen.setdefault(
            name, torch.are_deterministic_algorithms_enabled()) is not None and {"ok": True, "detail": "gap 0"})
    ctx = gpu_check.Context(True, NI_TASKS, tmp_path)
    ctx.cuda = True  # the scope is set up as on a GPU; the fake checks run nothing on one
    results = {name: gpu_check.run_check(ctx, name) for name in ("resume_bf16", "activation_offload", "bf16_step")}
    assert seen == {"resume_bf16": True, "activation_offload": True, "bf16_step": False}
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    assert "deterministic algorithms on (warn_only)" in results["resume_bf16"]["detail"]
    assert "deterministic" not in results["bf16_step"]["detail"]


def test_benchmarks_do_not_write_the_final_checkpoint(monkeypatch):
    """The Engine saves a checkpoint at the end unless save_at_end is False; the timed runs must not pay for it."""
    import tune.engine
    from bench import bench_distill, bench_pretrain

    seen = []

    class Stop(Exception):
        pass

    def fit(self):
        seen.append(getattr(self, "save_at_end", True))
        raise Stop

    monkeypatch.setattr(tune.engine.Engine, "fit", fit)
    shape = {k: v for k, v in bench_pretrain.SIZES["smoke"].items() if k not in ("steps", "warmup")}
    runs = [lambda: bench_pretrain.run_ours(shape, 2), lambda: bench_pretrain.run_loss_variant(shape, 2, "full"),
            lambda: bench_distill.train(dict(bench_distill.SIZES["smoke"]), None)]
    for run in runs:
        with pytest.raises(Stop):
            run()
    assert seen == [False] * len(runs)
