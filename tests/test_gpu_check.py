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
    failed = {name: r["detail"] for name, r in report["checks"].items() if not r["ok"]}
    assert not failed
    benches = report["benches"]
    assert benches["pretrain"]["ours"]["tokens_per_s"] > 0 and benches["pretrain"]["plain_loop"]["tokens_per_s"] > 0
    finetune = benches["finetune"]
    for side in ("ours-flex", "ours-dense", "baseline"):
        assert finetune["lora"][side]["tokens_per_s"] > 0
    for side in ("ours", "baseline"):
        assert finetune["qlora"][side]["tokens_per_s"] > 0
    assert set(benches["distill"]["sides"]) == {"student alone", "distillation, live", "distillation, cached"}
    markdown = (out / "gpu_check.md").read_text()
    assert "SMOKE" in markdown and "| bf16_step | ok |" in markdown and "ours / plain_loop" in markdown
    assert "(flex)" in markdown and "(dense)" in markdown


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
])
def test_bad_arguments_stop_before_any_work(tmp_path, args, message):
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
