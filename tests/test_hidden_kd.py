"""Hidden-state distillation (kd.layer_map, tune/kd_hidden.py): the loss against hand computations from
output_hidden_states (HF) and a block-by-block forward (native GPT), its gradients, and the distill recipe with it
end to end (a clean saved student, exact resume, the one-line config errors)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO
from test_distill import distill_config, history, pytest_ni
from tune.errors import ConfigError
from tune.kd_hidden import HiddenStateDistillation, decoder_blocks, strip_hidden_distillation


def gpt2(n_layer: int, n_embd: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def batch_and_mask(seed: int = 1):
    torch.manual_seed(seed)
    input_ids = torch.randint(0, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False  # a prompt: no targets there
    mask[1, 5:] = False
    return input_ids, mask


def reference(pairs, student_states, teacher_states, projections, mask, loss):
    """The loss by hand, in float64: per target position, the mean over the pairs of mean_j (W h_s − h_t)_j² or
    1 − <W h_s, h_t> / (|W h_s| |h_t|); summed over the target positions."""
    total = 0.0
    for b, t in mask.nonzero().tolist():
        per_pair = []
        for (s_layer, t_layer), projection in zip(pairs, projections):
            h_s = student_states[s_layer][b, t].detach().double()
            mapped = h_s if projection is None else projection.double() @ h_s
            h_t = teacher_states[t_layer][b, t].double()
            if loss == "mse":
                per_pair.append(float(((mapped - h_t) ** 2).sum() / h_t.numel()))
            else:
                per_pair.append(1 - float(mapped @ h_t / (mapped.norm() * h_t.norm())))
        total += sum(per_pair) / len(per_pair)
    return total


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("teacher_width", [16, 24])  # the identity, and a learned projection 16 -> 24
def test_hf_loss_matches_output_hidden_states(loss, teacher_width):
    """Block i's output is output_hidden_states[i + 1] for every block but the last (HF applies the final norm
    there): the pairs below map intermediate blocks only."""
    student, teacher = gpt2(3, 16), gpt2(4, teacher_width, seed=5)
    pairs = [[0, 1], [1, 2], [1, 0]]
    hidden = HiddenStateDistillation(pairs, 16, teacher_width, loss).attach(student, teacher)
    input_ids, mask = batch_and_mask()
    s_out = student(input_ids, output_hidden_states=True).hidden_states
    with torch.no_grad():
        t_out = teacher(input_ids, output_hidden_states=True).hidden_states
    got = hidden.loss_sum(mask)
    projections = [None if teacher_width == 16 else p.weight.detach() for p in hidden.projections]
    assert isinstance(hidden.projections[0], nn.Identity) == (teacher_width == 16)
    expected = reference(pairs, {i: s_out[i + 1] for i in range(2)}, {i: t_out[i + 1] for i in range(3)},
                         projections, mask, loss)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_native_student_matches_a_block_by_block_forward_including_the_last_block(loss):
    """Native GPT student (2 x 32) against an HF GPT-2 teacher (2 x 24): the last student block's state is its output
    before the final norm, as a manual forward through tok_emb + pos_emb and the blocks gives it."""
    from tune.losses import hidden_and_head
    from tune.models.gpt import GPT, config_from_preset

    torch.manual_seed(3)
    student = GPT(config_from_preset("tiny-gpt2", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40)).eval()
    teacher = gpt2(2, 24, seed=4)
    pairs = [[1, 0], [0, 0]]
    hidden = HiddenStateDistillation(pairs, 32, 24, loss).attach(student, teacher)
    input_ids, mask = batch_and_mask()
    batch = {"input_ids": input_ids, "targets": torch.where(mask, input_ids, -100)}
    hidden_and_head(student, batch)  # the forward the KD loss runs
    with torch.no_grad():
        hidden_and_head(teacher, batch)
        t_out = teacher(input_ids, output_hidden_states=True).hidden_states
    got = hidden.loss_sum(mask).item()
    with torch.no_grad():
        x = student.tok_emb(input_ids) + student.pos_emb(torch.arange(7))
        states = {}
        for i, block in enumerate(student.blocks):
            x = states[i] = block(x)
    expected = reference(pairs, states, {0: t_out[1]}, [p.weight.detach() for p in hidden.projections], mask, loss)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_zero_for_the_teacher_itself_and_gradients_reach_the_student_and_the_projection(loss):
    student = gpt2(3, 16)
    teacher = copy.deepcopy(student).requires_grad_(False)
    input_ids, mask = batch_and_mask()
    same = HiddenStateDistillation([[0, 0], [2, 2]], 16, 16, loss).attach(student, teacher)
    student(input_ids), teacher(input_ids)
    assert same.loss_sum(mask).item() == pytest.approx(0.0, abs=1e-5)
    same.remove_hooks()

    wider = gpt2(2, 24, seed=7).requires_grad_(False)
    hidden = HiddenStateDistillation([[0, 1]], 16, 24, loss).attach(student, wider)
    student(input_ids)
    with torch.no_grad():
        wider(input_ids)
    hidden.loss_sum(mask).backward()
    assert hidden.projections[0].weight.grad.abs().sum() > 0
    blocks = decoder_blocks(student)
    assert blocks[0].attn.c_attn.weight.grad.abs().sum() > 0 and student.transformer.wte.weight.grad.abs().sum() > 0
    assert blocks[1].attn.c_attn.weight.grad is None  # after the mapped block: untouched by this loss
    assert all(p.grad is None for p in wider.parameters())


def test_kd_loss_adds_the_weighted_term_and_logs_it():
    from tune.distill import kd_loss_fn

    student, teacher = gpt2(2, 16), gpt2(2, 24, seed=2).requires_grad_(False)
    input_ids, mask = batch_and_mask()
    batch = {"input_ids": input_ids, "targets": torch.where(mask, torch.roll(input_ids, -1, 1), -100)}
    plain = kd_loss_fn(teacher, 0.5, 2.0, "forward_kl", 0.5, 40)(student, batch)
    hidden = HiddenStateDistillation([[1, 1]], 16, 24, "cosine", weight=0.3).attach(student, teacher)
    loss, n, extras = kd_loss_fn(teacher, 0.5, 2.0, "forward_kl", 0.5, 40, hidden_kd=hidden)(student, batch)
    assert n == plain[1] == int(mask.sum())
    assert extras["hidden"].item() > 0 and not extras["hidden"].requires_grad
    assert loss.item() == pytest.approx(plain[0].item() + 0.3 * extras["hidden"].item(), rel=1e-6)
    assert extras["kd"].item() == pytest.approx(plain[2]["kd"].item(), rel=1e-6)


def test_blocks_are_found_through_peft_and_layouts_without_blocks_are_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tune.errors import TuneError

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert decoder_blocks(llama) is llama.model.layers
    wrapped = get_peft_model(gpt2(2, 16), LoraConfig(r=2, target_modules=["c_attn"]))
    assert decoder_blocks(wrapped) is wrapped.get_base_model().transformer.h
    with pytest.raises(TuneError, match="kd.layer_map: cannot find the decoder blocks of Linear"):
        decoder_blocks(nn.Linear(2, 2))
    hidden = HiddenStateDistillation([[0, 3]], 16, 16)
    with pytest.raises(ConfigError, match=r"kd.layer_map: pair \[0, 3\] names teacher layer 3, but the teacher's "
                                          r"layers are 0..2"):
        hidden.attach(gpt2(2, 16), llama)


@pytest.mark.parametrize("native", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(native):
    """Under (non-reentrant) activation checkpointing the loss and every gradient are those of the plain forward, and
    a block recomputed in the backward pass leaves nothing behind (without torch's early stop the recomputation runs
    the native block to its end, forward hooks included)."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from tune.hf import enable_activation_checkpointing
    from tune.models.gpt import GPT, config_from_preset

    def run(checkpointing: bool):
        if native:
            torch.manual_seed(0)
            student = GPT(config_from_preset("tiny-gpt2", n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=40))
        else:
            student = gpt2(3, 16)
        student.train()
        if checkpointing:
            enable_activation_checkpointing(student)
        teacher = gpt2(2, 24, seed=2)
        torch.manual_seed(9)  # the same projection both times
        hidden = HiddenStateDistillation([[0, 1], [2, 0]], 16, 24).attach(student, teacher)
        input_ids, mask = batch_and_mask()
        with set_checkpoint_early_stop(False):  # read when the checkpointed forward runs
            student(input_ids)
            with torch.no_grad():
                teacher(input_ids)
            loss = hidden.loss_sum(mask)
            loss.backward()
        assert not hidden._student_states  # nothing kept from the blocks recomputed in the backward
        return loss.item(), {n: p.grad.clone() for n, p in [*student.named_parameters(), *hidden.named_parameters()]
                             if p.grad is not None}

    plain, checkpointed = run(False), run(True)
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-6)
    assert plain[1].keys() == checkpointed[1].keys() and len(plain[1]) > 2
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, msg=name)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """train.compile=true compiles each block with its forward hooks: the same loss and gradients as eager, over two
    widths (the second compiles a dynamic shape). ~30 s of CPU time."""
    from tune.engine import compile_blocks
    from tune.models.gpt import GPT, config_from_preset

    torch.manual_seed(0)
    eager = GPT(config_from_preset("tiny-gpt2", vocab_size=40, block_size=32, n_layer=2, n_embd=16)).train()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2
    teacher = gpt2(2, 24, seed=3)
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        hidden = HiddenStateDistillation([[0, 1], [1, 0]], 16, 24).attach(model, teacher)
        for width in (12, 15):
            input_ids = torch.randint(0, 40, (2, width))
            model(input_ids)
            with torch.no_grad():
                teacher(input_ids)
            loss = hidden.loss_sum(torch.ones(2, width, dtype=torch.bool))
            loss.backward()
            results.append((loss.item(), {n: p.grad.clone() for n, p in [*model.named_parameters(),
                                                                        *hidden.named_parameters()]
                                          if p.grad is not None}))
            model.zero_grad(set_to_none=True)
            hidden.zero_grad(set_to_none=True)
        hidden.remove_hooks()
    for (loss, grads), (loss_c, grads_c) in zip(results[:2], results[2:]):
        assert loss_c == pytest.approx(loss, rel=1e-4, abs=1e-5)
        assert grads_c.keys() == grads.keys() and "projections.0.weight" in grads
        for name, grad in grads.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# -- recipe ------------------------------------------------------------------------------------------
@pytest_ni
def test_distill_with_a_layer_map_saves_a_clean_student_and_resumes_exactly(tmp_path, gpt2_base, monkeypatch):
    """A fresh 1 x 32 native student, block 0 matched to the 2 x 64 teacher's block 1 through a 32 -> 64 projection:
    the projection is checkpointed (and resumed: a run stopped in step 5 and resumed logs what the uninterrupted
    one does), the saved student and an exported checkpoint load as plain GPT-2 models with no leftover keys."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from recipes.distill import export_checkpoint, run
    from tune.engine import find_checkpoint
    from tune.packing import NIBatches

    settings = {"kd.layer_map": "[[0,1]]", "kd.hidden_weight": 0.5, "train.max_steps": 6, "train.save_every": 2,
                "train.eval_every": 3}
    full = run(distill_config(tmp_path, gpt2_base, "a", **settings))
    assert len(history(full.run_dir, "hidden")) == 6 and len(history(full.run_dir, "val_hidden")) == 2
    with safe_open(str(find_checkpoint(full.run_dir) / "model.safetensors"), "pt") as f:
        assert f.get_slice("kd_hidden.projections.0.weight").get_shape() == [64, 32]
    model, info = AutoModelForCausalLM.from_pretrained(full.run_dir / "student", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert not any("kd_hidden" in k for k in model.state_dict())
    cfg = distill_config(tmp_path, gpt2_base, "a", **settings)
    out = export_checkpoint(cfg, full.run_dir, find_checkpoint(full.run_dir, step=4), tmp_path / "export4")
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info

    original = NIBatches.step_batches

    def dies_in_step_5(self, step, rank, world):
        if step == 5:
            raise KeyboardInterrupt
        return original(self, step, rank, world)

    monkeypatch.setattr(NIBatches, "step_batches", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(distill_config(tmp_path, gpt2_base, "b", **settings))
    monkeypatch.setattr(NIBatches, "step_batches", original)
    resumed = run(distill_config(tmp_path, gpt2_base, "b", **settings, **{"train.resume": "true"}))
    for key in ("loss", "hidden", "kd", "val_loss", "val_hidden"):
        assert history(resumed.run_dir, key) == history(full.run_dir, key), key


@pytest_ni
def test_on_policy_steps_and_the_compared_kd_students_distill_hidden_states_too(tmp_path, gpt2_base):
    """kd.lmbda=1 (every step on the student's samples) with a layer map; compare.methods' off-policy student trains
    with it as well, the CE-only one without (its loss is plain CE)."""
    from recipes.distill import run

    result = run(distill_config(tmp_path, gpt2_base, "gkd", **{
        "kd.layer_map": "[[0,1]]", "kd.lmbda": 1.0, "kd.max_new_tokens": 6, "train.max_steps": 3,
        "train.eval_every": 3, "compare.ce_only": "true", "compare.methods": "[off_policy]"}))
    assert history(result.run_dir, "on_policy") == [1.0] * 3
    assert len(history(result.run_dir, "hidden")) == 3 and all(h > 0 for h in history(result.run_dir, "hidden"))
    assert len(history(result.run_dir / "off_policy", "hidden")) == 3
    assert not history(result.run_dir / "ce_only", "hidden")
    rows = json.loads((result.run_dir / "comparison.json").read_text())
    assert {"on-policy GKD", "off-policy KD", "CE-only student"} <= set(rows)


def test_bad_layer_maps_are_one_line_errors_and_validate_stays_free_of_torch(tmp_path, capsys):
    from tune.cli import main

    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": 1024, "n_layer": 4}')
    (model / "model.safetensors").write_bytes(b"")
    base = ["validate", "distill_ni", f"teacher.model={model}", f"data.train_tasks={model / 'config.json'}",
            "student.n_layer=2"]
    cases = [
        ("kd.layer_map=[[2,1]]", "error: kd.layer_map: pair [2, 1] names student layer 2, but the student's layers "
                                 "are 0..1 (0-based decoder blocks)"),
        ("kd.layer_map=[[1,4]]", "error: kd.layer_map: pair [1, 4] names teacher layer 4, but the teacher's layers "
                                 "are 0..3 (0-based decoder blocks)"),
        ("kd.layer_map=[[-1,0]]", "error: kd.layer_map: pair [-1, 0] names student layer -1, but the student's "
                                  "layers are 0..1"),
        ("kd.layer_map=[[0,1,2]]", "error: kd.layer_map: [0, 1, 2] is not a pair [student_layer, teacher_layer]"),
        ("kd.layer_map=[[0]]", "error: kd.layer_map: [0] is not a pair"),
        ("kd.hidden_weight=-1", "error: kd.hidden_weight must be >= 0, got -1.0"),
        ("teacher.cache=true", "error: kd.layer_map needs the live teacher: the teacher cache holds no hidden states"),
    ]
    for override, message in cases:
        extra = [] if override.startswith("kd.layer_map") else ["kd.layer_map=[[0,3]]"]
        assert main([*base, override, *extra]) == 2, override
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert main([*base, "kd.layer_map=[[0,0],[1,3]]", "kd.hidden_loss=cosine"]) == 0
    assert main([*base, "kd.layer_map=[[0,0]]", "kd.cross_tokenizer=uld"]) == 2  # (among ULD's own needs)
    assert ("kd.layer_map needs kd.cross_tokenizer=none: with two tokenizers the positions of the two models do not "
            "correspond") in capsys.readouterr().err
    # the student's layers from an HF student's config.json; validate imports no torch for it
    code = ("import sys; from tune.cli import main; "
            f"assert main({[*base, f'student.model={model}', 'student.preset=null', 'kd.layer_map=[[3,3]]']!r}) == 0; "
            f"assert main({[*base, f'student.model={model}', 'student.preset=null', 'kd.layer_map=[[4,3]]']!r}) == 2; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    assert "names student layer 4, but the student's layers are 0..3" in result.stderr


def test_strip_removes_the_module_and_its_hooks():
    student, teacher = gpt2(2, 16), gpt2(2, 24)
    hidden = HiddenStateDistillation([[0, 0]], 16, 24).attach(student, teacher)
    student.add_module("kd_hidden", hidden)
    assert "kd_hidden.projections.0.weight" in student.state_dict()
    assert strip_hidden_distillation(student) is hidden and strip_hidden_distillation(student) is None
    assert "kd_hidden" not in json.dumps(list(student.state_dict()))
    student(torch.zeros(1, 3, dtype=torch.long))
    assert not hidden._student_states  # the hooks are gone


@pytest_ni
def test_lora_student_of_another_width_on_text_with_cosine(tmp_path, gpt2_base, ni_texts):
    """An HF student 3 x 32 (LoRA, gradient checkpointing) from the 2 x 64 teacher on a text corpus: the adapter
    trains with the 32 -> 64 projection; the saved adapter loads onto the base model."""
    import shutil

    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from recipes.distill import run

    student_dir = tmp_path / "student_base"
    vocab = AutoModelForCausalLM.from_pretrained(gpt2_base).config.vocab_size
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=3, n_head=2)).save_pretrained(
        student_dir)
    for f in gpt2_base.glob("tokenizer*"):
        shutil.copy(f, student_dir / f.name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(ni_texts[:400]), encoding="utf-8")
    result = run(distill_config(tmp_path, gpt2_base, "text", **{
        "student.model": str(student_dir), "student.preset": "null", "student.method": "lora",
        "kd.layer_map": "[[2,1],[0,0]]", "kd.hidden_loss": "cosine", "train.gradient_checkpointing": "true",
        "data.kind": "text", "data.corpus": str(corpus), "data.block_size": 64, "train.max_steps": 4,
        "train.eval_every": 2}))
    hidden = history(result.run_dir, "hidden")
    assert len(hidden) == 4 and all(0 < h < 2 for h in hidden)  # 1 − cos lies in [0, 2]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), result.run_dir / "student")
    with safe_open(str(result.run_dir / "student" / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys()), list(f.keys())


@pytest_ni
@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_match_one_with_a_layer_map(recipe_configs, tmp_path):
    """The 32 -> 64 projection trains the same under DDP (2 processes) and FSDP2 (2 processes, sharded; at the end
    rank 0 rebuilds the student with its projection, then saves it without) as in one process."""
    from test_fsdp import assert_same_weights

    from conftest import assert_losses_close, losses, tune_run

    config, overrides = recipe_configs["distill"]
    runs = {}
    for name, kwargs, accum in (("one", {}, 2), ("ddp", {"nproc": 2}, 1), ("fsdp", {"fsdp": True}, 1)):
        done = tune_run("distill", config, [*overrides, "kd.layer_map=[[0,1]]", f"train.grad_accum_steps={accum}",
                                            "kd.lmbda=0"], tmp_path / name, **kwargs)  # FSDP refuses on-policy steps
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("FSDP: parameters sharded over 2 processes" in done.stdout) == (name == "fsdp")
        runs[name] = losses(tmp_path / name)
    for name in ("ddp", "fsdp"):
        assert_losses_close(runs["one"][0], runs[name][0])
        assert_losses_close(runs["one"][1], runs[name][1])
        assert_same_weights(tmp_path / "one" / "student", tmp_path / name / "student", "model.safetensors")
    assert len(history(tmp_path / "fsdp", "hidden")) == 8
