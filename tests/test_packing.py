"""tune.packing: bin packing, collators, packed == unpacked losses for GPT-2 and Llama, NIBatches."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import ast
from pathlib import Path

import numpy as np

from tune.packing import NIBatches, best_fit_decreasing, cached_packs, collate_packed, collate_padded, pack_examples
from tune.errors import ConfigError, DataError
from tune.losses import causal_lm_loss

VOCAB, PAD = 96, 0


def make_example(n: int, gen: torch.Generator, prompt_len: int = 3, first: int | None = None) -> dict:
    """Random ids (the first one `first` if given, to identify the example) with prompt-masked aligned targets."""
    ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
    if first is not None:
        ids[0] = first
    targets = [-100] * (prompt_len - 1) + ids[prompt_len:] + [-100]
    return {"input_ids": ids, "targets": targets}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=1, attn_implementation="sdpa"))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=1, eos_token_id=1, pad_token_id=0, attn_implementation="sdpa"))
    return {"gpt2": gpt2.float().eval(), "llama": llama.float().eval()}


@pytest.fixture(scope="module")
def three():
    gen = torch.Generator().manual_seed(1)
    return [make_example(n, gen) for n in (7, 5, 9)]


# -- pack_examples / collators -------------------------------------------------------------------
def reference_best_fit(lengths, max_length):
    """Item-by-item best-fit decreasing in O(n^2): the least room that fits, ties to the bin that got there first."""
    bins, room, since = [], [], []
    for t, i in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], since[b]))
            bins[b].append(i)
        else:
            b = len(bins)
            bins.append([i]), room.append(max_length), since.append(0)
        room[b] -= lengths[i]
        since[b] = t
    return bins


def reference_first_fit(lengths, max_length):
    """The quadratic first-fit decreasing packer this module used before (bins in creation order)."""
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


def test_pack_examples_best_fit_decreasing():
    assert pack_examples([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]  # 6+2, 5+3, 4
    assert pack_examples([], 8) == []
    lengths = [(i * 37) % 23 + 1 for i in range(200)]
    bins = pack_examples(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 40 for b in bins)
    assert bins == pack_examples(lengths, 40)
    assert len(bins) <= sum(lengths) // 40 + 2  # nearly full rows
    with pytest.raises(ConfigError, match="max_length"):
        pack_examples([3, 9], 8)
    with pytest.raises(ConfigError, match="no tokens"):
        pack_examples([3, 0], 8)


@pytest.mark.parametrize("seed", range(6))
def test_bulk_packer_equals_item_by_item_best_fit(seed):
    """The bulk packer (all examples of one length at once) makes exactly the bins of the item-by-item algorithm,
    and as many bins as first-fit decreasing, within FFD's 11/9 OPT + 6/9 guarantee (OPT >= FFD's lower bound)."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        max_length = int(rng.integers(4, 64))
        high = max_length + 1 if seed % 2 else max(2, max_length // 3)  # long examples, or many per row
        lengths = rng.integers(1, high, int(rng.integers(0, 120))).tolist()
        bins = pack_examples(lengths, max_length)
        assert bins == reference_best_fit(lengths, max_length)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each example in exactly one bin
        assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
        ffd = len(reference_first_fit(lengths, max_length))
        lower = -(-sum(lengths) // max_length)  # no packing has fewer bins
        assert lower <= len(bins) <= 11 / 9 * max(ffd, lower) + 1


def test_best_fit_decreasing_arrays():
    lengths = np.array([5, 3, 4, 2, 6])
    items, offsets = best_fit_decreasing(lengths, 8)
    assert items.tolist() == [4, 3, 0, 1, 2] and offsets.tolist() == [0, 2, 4, 5]
    assert items.dtype == offsets.dtype == np.int64


def test_cached_packs_hit_returns_the_same_bins(tmp_path, monkeypatch):
    import tune.packing as packing

    lengths = np.random.default_rng(0).integers(1, 30, 500)
    first = cached_packs(None, lengths, 32, 7, tmp_path)
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith("packs-") and sorted(p.name for p in entry.iterdir()) == ["items.npy", "offsets.npy"]
    monkeypatch.setattr(packing, "best_fit_decreasing", lambda *a: pytest.fail("packed again despite the cache"))
    again = cached_packs(None, lengths, 32, 7, tmp_path)
    assert np.array_equal(first.items, again.items) and np.array_equal(first.offsets, again.offsets)
    monkeypatch.undo()
    other_seed = cached_packs(None, lengths, 32, 8, tmp_path)
    assert not np.array_equal(first.items, other_seed.items) and len(list(tmp_path.iterdir())) == 2
    cached_packs(None, lengths[:-1], 32, 7, tmp_path)  # other data: its own entry
    cached_packs(None, lengths, 40, 7, tmp_path)  # other max_length: its own entry
    assert len(list(tmp_path.iterdir())) == 4
    (entry / "offsets.npy").write_bytes(b"junk")  # a damaged entry is rebuilt
    rebuilt = cached_packs(None, lengths, 32, 7, tmp_path)
    assert np.array_equal(first.items, rebuilt.items) and np.array_equal(first.offsets, rebuilt.offsets)


def test_tune_never_imports_data_prep():
    """Layering: data_prep builds on tune, never the reverse (STYLE.md). tune/cli.py is the application entry
    point above both layers; tune/evaluation.py still builds NI prompts through data_prep (to be moved)."""
    allowed = {"cli.py", "evaluation.py"}
    offenders = []
    for path in sorted((Path(__file__).parents[1] / "tune").rglob("*.py")):
        if path.name in allowed and path.parent.name == "tune":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "data_prep"]
    assert offenders == []


def test_collate_packed_layout(three):
    batch = collate_packed([three, three[:1]], 24, PAD)
    assert batch["input_ids"].shape == batch["targets"].shape == batch["position_ids"].shape == (2, 24)
    assert batch["position_ids"][0].tolist() == list(range(7)) + list(range(5)) + list(range(9)) + list(range(3))
    assert batch["input_ids"][0, 21:].tolist() == [PAD] * 3 and batch["targets"][0, 21:].tolist() == [-100] * 3
    assert batch["targets"][0, :7].tolist() == three[0]["targets"]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 24, 24) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert m[11, 7] and m[11, 11] and not m[11, 6] and not m[11, 12]  # second example (7..11): inside its block
    assert m[8, 7] and not m[8, 9]  # causal
    assert not m[20, 11] and m[20, 12]  # third example sees nothing of the second
    assert m[22].tolist() == [i == 22 for i in range(24)]  # padding query: itself only
    assert not m[:21, 21:].any()  # nobody attends to padding
    assert collate_packed([three], None, PAD)["input_ids"].shape == (1, 21)
    pos_only = collate_packed([three], None, PAD, mask_mode="position_ids")
    assert "attention_mask" not in pos_only and pos_only["position_ids"].shape == (1, 21)
    with pytest.raises(ConfigError, match="mask_mode"):
        collate_packed([three], None, PAD, mask_mode="flat")
    with pytest.raises(ConfigError, match="max_length"):
        collate_packed([three], 20, PAD)


def test_collate_padded(three):
    batch = collate_padded(three, PAD)
    assert batch["input_ids"].shape == (3, 9)
    assert batch["attention_mask"].sum(1).tolist() == [7, 5, 9]
    assert batch["targets"][1, 5:].tolist() == [-100] * 4 and batch["input_ids"][1, 5:].tolist() == [PAD] * 4


# -- packed == unpacked --------------------------------------------------------------------------
def _reference(model, examples):
    """Per-example loss sums and logits, each example run alone."""
    losses, logits = [], []
    with torch.no_grad():
        for ex in examples:
            batch = collate_padded([ex], PAD)
            losses.append(causal_lm_loss(model, batch)[0])
            logits.append(model(input_ids=batch["input_ids"], use_cache=False).logits[0])
    return torch.stack(losses).sum(), torch.cat(logits)


def _packed_logits(model, batch, **overrides):
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    kwargs.update(overrides)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_packed_loss_and_logits_equal_unpacked(models, three, name):
    model = models[name]
    ref_loss, ref_logits = _reference(model, three)
    batch = collate_packed([three, list(reversed(three))], 24, PAD)  # 2 rows of 3 examples, padded
    with torch.no_grad():
        loss, n = causal_lm_loss(model, batch)
    assert n.item() == 2 * sum(t != -100 for ex in three for t in ex["targets"])
    torch.testing.assert_close(loss, 2 * ref_loss, atol=1e-4, rtol=1e-5)
    logits = _packed_logits(model, batch)
    assert torch.isfinite(logits).all()  # padding rows included
    torch.testing.assert_close(logits[0, :21], ref_logits, atol=1e-4, rtol=1e-4)
    # the same mask in additive float form (0 / finfo.min) works as well
    additive = torch.zeros(batch["attention_mask"].shape).masked_fill(~batch["attention_mask"], torch.finfo(torch.float32).min)
    torch.testing.assert_close(_packed_logits(model, batch, attention_mask=additive)[0, :21], ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_position_ids_with_padding_mask_do_not_isolate(models, three, name):
    """Restarting position_ids next to an ordinary 2D mask lets examples attend to earlier ones: logits differ."""
    model = models[name]
    ref_loss, ref_logits = _reference(model, three)
    batch = collate_packed([three], None, PAD)
    leaky = _packed_logits(model, batch, attention_mask=torch.ones(1, 21, dtype=torch.long))
    assert torch.allclose(leaky[0, :7], ref_logits[:7], atol=1e-4)  # the first example has nothing before it
    assert (leaky[0, 7:] - ref_logits[7:]).abs().max() > 1e-2
    leaky_batch = dict(batch, attention_mask=torch.ones(1, 21, dtype=torch.long))
    with torch.no_grad():
        assert abs(causal_lm_loss(model, leaky_batch)[0] - ref_loss) > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_position_ids_mode_on_transformers_5(models, three, name):
    """mask_mode="position_ids" (meant for flash-attention-2) passes no mask; transformers 5.23 then detects the
    position resets itself when use_cache=False (as in tune.losses), so SDPA isolates too. Documents that behaviour."""
    model = models[name]
    ref_loss, _ = _reference(model, three)
    batch = collate_packed([three], None, PAD, mask_mode="position_ids")
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch)[0], ref_loss, atol=1e-4, rtol=1e-5)


# -- NIBatches -----------------------------------------------------------------------------------
def dataset(n: int, seed: int = 0) -> list[dict]:
    """n examples of 4..20 tokens whose first token (100 + i) identifies them."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 21, (n,), generator=gen).tolist()
    return [make_example(length, gen, first=100 + i) for i, length in enumerate(lengths)]


def example_ids(batch: dict) -> list[int]:
    """The examples in a micro-batch, in row order, by their identifying first token."""
    return [v - 100 for v in batch["input_ids"].flatten().tolist() if v >= 100]


def test_steps_deterministic_and_sized():
    data = dataset(30)
    a = NIBatches(data, data[:5], 2, 3, seed=7, packing=False, max_length=32, pad_id=PAD)
    b = NIBatches(data, data[:5], 2, 3, seed=7, packing=False, max_length=32, pad_id=PAD)
    for step in (1, 4, 17):
        ba, bb = a.step_batches(step, 0, 1), b.step_batches(step, 0, 1)
        assert len(ba) == 3 and all(m["input_ids"].shape[0] == 2 for m in ba)
        for x, y in zip(ba, bb):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    other = NIBatches(data, data[:5], 2, 3, seed=8, packing=False, max_length=32, pad_id=PAD)
    assert [example_ids(m) for m in other.step_batches(1, 0, 1)] != [example_ids(m) for m in a.step_batches(1, 0, 1)]
    assert a.steps_per_epoch == 5


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_cover_the_single_process_global_batch(packing):
    data = dataset(40)
    one = NIBatches(data, [], 2, 4, seed=3, packing=packing, max_length=32, pad_id=PAD)  # accum 4 on 1 process
    two = NIBatches(data, [], 2, 2, seed=3, packing=packing, max_length=32, pad_id=PAD)  # accum 2 on 2 processes
    for step in (1, 2, 9):
        single = one.step_batches(step, 0, 1)
        r0, r1 = two.step_batches(step, 0, 2), two.step_batches(step, 1, 2)
        interleaved = [r0[0], r1[0], r0[1], r1[1]]  # rank r takes micro-batches r, r + world, ...
        for x, y in zip(single, interleaved, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_epochs_cycle_through_every_example():
    data = dataset(10)
    src = NIBatches(data, [], 2, 1, seed=0, packing=False, max_length=32, pad_id=PAD)
    assert src.steps_per_epoch == 5
    epochs = [[i for s in range(e * 5 + 1, e * 5 + 6) for m in src.step_batches(s, 0, 1) for i in example_ids(m)]
              for e in range(3)]
    assert all(sorted(ep) == list(range(10)) for ep in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_packing_rows_hold_several_examples_within_max_length():
    data = dataset(60)
    src = NIBatches(data, data[:20], 1, 1, seed=5, packing=True, max_length=48, pad_id=PAD)
    assert src.steps_per_epoch == len(src.units) < 60 / 2
    epoch = []
    for step in range(1, src.steps_per_epoch + 1):
        (m,) = src.step_batches(step, 0, 1)
        assert m["input_ids"].shape[1] <= 48 and m["attention_mask"].shape[-1] == m["input_ids"].shape[1]
        assert (m["position_ids"] == 0).sum().item() >= 2  # several examples in the row
        epoch += example_ids(m)
    assert sorted(epoch) == list(range(60))  # one epoch: every example exactly once
    with pytest.raises(DataError, match="empty"):
        NIBatches([], [], 1, 1, seed=0, packing=True, max_length=48, pad_id=PAD)


@pytest.mark.parametrize("packing", [False, True])
def test_val_batches_fixed_split_over_ranks_and_limited(packing):
    data = dataset(30)
    src = NIBatches(data, data, 1 if packing else 4, 1, seed=0, packing=packing, max_length=48, pad_id=PAD)
    everything = list(src.val_batches(0, 1, 100))
    ids = [i for b in everything for i in example_ids(b)]
    assert sorted(ids) == list(range(30))
    if not packing:
        assert ids == list(range(30)) and len(everything) == 8
    r0, r1 = list(src.val_batches(0, 2, 3)), list(src.val_batches(1, 2, 3))
    assert len(r0) == 2 and len(r1) == 1
    assert torch.equal(r0[1]["input_ids"], everything[2]["input_ids"])
    assert torch.equal(r1[0]["input_ids"], everything[1]["input_ids"])
    assert list(NIBatches(data, [], 4, 1, seed=0, packing=packing, max_length=48, pad_id=PAD).val_batches(0, 1, 5)) == []


@pytest.mark.parametrize("packing", [False, True])
def test_arrow_dataset_gives_the_batches_of_the_list(tmp_path, packing):
    """A disk-backed datasets.Dataset is read by index (no list of the whole set) and packed once: the batches equal
    those of the same examples as a list, and the packs are cached next to the dataset's files."""
    from datasets import Dataset, load_from_disk

    data = dataset(40)
    Dataset.from_list(data).save_to_disk(str(tmp_path / "entry" / "dataset"))
    arrow = load_from_disk(str(tmp_path / "entry" / "dataset"))
    listed = NIBatches(data, data[:9], 2, 2, seed=3, packing=packing, max_length=32, pad_id=PAD)
    mapped = NIBatches(arrow, arrow.select(range(9)), 2, 2, seed=3, packing=packing, max_length=32, pad_id=PAD)
    for step in (1, 5):
        for x, y in zip(listed.step_batches(step, 0, 1), mapped.step_batches(step, 0, 1), strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for x, y in zip(listed.val_batches(0, 1, 10), mapped.val_batches(0, 1, 10), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    packs = sorted(p.name[:6] for p in (tmp_path / "entry").iterdir() if p.name.startswith("packs-"))
    assert packs == (["packs-"] * 2 if packing else [])  # train and val packs, keyed by their lengths
