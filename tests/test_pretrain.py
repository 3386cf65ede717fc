"""The pretrain recipe end to end on real text, and its answers to bad input."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.pretrain import PretrainConfig, run
from tune.config import load_config
from tune.errors import ConfigError, DataError, TuneError


def _cfg(tmp_path, corpus, *overrides):
    base = [f"output_dir={tmp_path / 'run'}", f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "model.preset=tiny-gpt2", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=32",
            "train.max_steps=120", "train.micro_batch_size=16", "train.lr=3e-3", "train.warmup_steps=10",
            "train.eval_every=40", "train.eval_batches=8", "train.log_every=10", "train.progress=false",
            "train.mixed_precision=no", "sample.max_new_tokens=40", "sample.prompt=ROMEO:"]
    return load_config(PretrainConfig, "shakespeare_char_cpu", base + list(overrides))


def test_pretrain_shakespeare_val_loss_falls_and_exports(tmp_path, shakespeare_slice, capsys):
    result = run(_cfg(tmp_path, shakespeare_slice))
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert len(vals) == 3
    assert vals[0] > vals[1] > vals[2] and vals[0] - vals[2] > 0.15
    assert vals[-1] < math.log(65) - 1.5  # far below the uniform-guess loss ln(65) = 4.17
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "report.png", "samples.txt", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "samples.txt").read_text(encoding="utf-8").startswith("ROMEO:")
    # the export loads with plain transformers and generates
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tok("ROMEO:", return_tensors="pt")["input_ids"]
    out = hf.generate(ids, max_new_tokens=20, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 20
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("ROMEO:")
    assert "0.11M parameters" in capsys.readouterr().out
    # continued pretraining from the export
    cont = _cfg(tmp_path, shakespeare_slice, f"output_dir={tmp_path / 'cont'}", f"model.init_from={run_dir / 'hf'}",
                f"data.tokenizer_path={run_dir / 'hf'}", "model.n_layer=null", "model.n_embd=null",
                "model.n_head=null", "model.n_kv_head=null", "train.max_steps=20", "train.eval_every=0")
    again = run(cont)
    first_val = [r["val_loss"] for r in again.history if "val_loss" in r][0]
    assert first_val < vals[0]  # starts from the trained weights, not from scratch


def test_rerun_refuses_to_overwrite_checkpoints(tmp_path, shakespeare_slice):
    run(_cfg(tmp_path, shakespeare_slice, "train.max_steps=2", "export=false"))
    with pytest.raises(ConfigError, match="train.resume=true"):
        run(_cfg(tmp_path, shakespeare_slice, "train.max_steps=2", "export=false"))
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_overwrite_says_what_it_removes_and_keeps_the_earlier_metrics(tmp_path, shakespeare_slice, capsys):
    run(_cfg(tmp_path, shakespeare_slice, "train.max_steps=2", "export=false"))
    earlier = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    run(_cfg(tmp_path, shakespeare_slice, "train.max_steps=3", "export=false", "overwrite=true"))
    out = capsys.readouterr().out
    assert "overwrite=true: removed the earlier run's checkpoints in" in out and "(step_0000002)" in out
    assert [p.read_text() for p in (tmp_path / "run").glob("metrics.jsonl.superseded-*")] == [earlier]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000003"]


def test_missing_corpus(tmp_path):
    with pytest.raises(ConfigError, match="nope.txt"):
        run(_cfg(tmp_path, tmp_path / "nope.txt"))


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty.txt"):
        run(_cfg(tmp_path, empty))


def test_corpus_smaller_than_context(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("hello world, this is short.\n" * 2)
    with pytest.raises(DataError, match="small.txt.*block_size"):
        run(_cfg(tmp_path, small))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_utf8_corpus(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="latin1.txt.*UTF-8"):
        run(_cfg(tmp_path, bad))


def test_unknown_preset(tmp_path, shakespeare_slice):
    with pytest.raises(ConfigError, match="model.preset='gpt5'"):
        run(_cfg(tmp_path, shakespeare_slice, "model.preset=gpt5"))


def test_block_size_larger_than_position_table(tmp_path, shakespeare_slice):
    from tune.models.export import export_hf
    from tune.models.gpt import GPT, config_from_preset

    export_hf(GPT(config_from_preset("tiny-gpt2", block_size=32, vocab_size=100)), tmp_path / "small_hf")
    with pytest.raises(ConfigError, match="block_size=64 is larger than the position table \\(32\\)"):
        run(_cfg(tmp_path, shakespeare_slice, f"model.init_from={tmp_path / 'small_hf'}", "model.block_size=64",
                 "model.n_layer=null", "model.n_embd=null", "model.n_head=null", "model.n_kv_head=null"))


def test_errors_are_one_line(tmp_path):
    try:
        run(_cfg(tmp_path, tmp_path / "missing.txt"))
    except TuneError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-moe"])
def test_native_gradient_checkpointing_gives_the_same_loss_and_gradients(preset):
    """train.gradient_checkpointing on the native GPT (GPT.gradient_checkpointing_enable, which the engine calls):
    each block recomputed in backward, dropout masks replayed: loss and every gradient equal to the plain pass
    (the MoE's router losses included)."""
    import copy

    from tune.losses import causal_lm_loss
    from tune.models.gpt import GPT, config_from_preset

    torch.manual_seed(0)
    plain = GPT(config_from_preset(preset, dropout=0.1)).train()
    recomputed = copy.deepcopy(plain)
    recomputed.gradient_checkpointing_enable()
    x = torch.randint(0, 256, (2, 16))
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(1)
        loss = causal_lm_loss(model, {"input_ids": x, "targets": x})[0]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
