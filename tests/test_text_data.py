"""data_prep.text: tokenizers (char, byte-level BPE), token shards, cache, and input errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import data_prep.text as text_mod
from data_prep.text import TextData, prepare_text_corpus, read_corpus, train_bpe_tokenizer, train_char_tokenizer
from conftest import SHARED_DATA
from tune.errors import DataError

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
SOSEKI = SHARED_DATA / "soseki" / "wagahai_wa_neko_de_aru.txt"


@pytest.fixture(scope="module")
def shakespeare(shared_data):
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def soseki(shared_data):
    return SOSEKI.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare_char(shakespeare, tmp_path_factory):
    return prepare_text_corpus(SHAKESPEARE, tmp_path_factory.mktemp("cache"), tokenizer="char")


def all_tokens(data: TextData) -> np.ndarray:
    return np.concatenate([data.train_tokens(), data.val_tokens()])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- char tokenizer


def test_char_tokenizer_tinyshakespeare(shakespeare, shakespeare_char):
    data = shakespeare_char
    assert data.vocab_size == 65 + 3
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert len(tok) == 68
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>" and tok.unk_token == "<|unk|>"
    assert data.eos_token_id == tok.eos_token_id
    assert len({tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 3

    tricky = "  leading spaces\n\n\nthree newlines,   repeated   spaces ,trailing \n "
    for x in (tricky, shakespeare[:5000], "a", " ", "\n"):
        ids = tok.encode(x)
        assert len(ids) == len(x)  # one id per character, no BOS/EOS added
        assert tok.decode(ids) == x
    assert tok.decode(all_tokens(data).tolist()) == shakespeare


def test_char_tokenizer_japanese(soseki, tmp_path):
    data = prepare_text_corpus(SOSEKI, tmp_path, tokenizer="char")
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert data.vocab_size == len(set(soseki)) + 3
    x = soseki[:3000]
    assert x.startswith("一\n\n　吾輩は猫である。")
    assert tok.decode(tok.encode(x)) == x
    assert len(tok.encode(x)) == len(x)
    assert tok.decode(all_tokens(data).tolist()) == soseki


def test_char_tokenizer_unseen_char_is_unk():
    tok = train_char_tokenizer(["abc", "cd\n"])
    assert len(tok) == 5 + 3
    ids = tok.encode("a\nz")
    assert ids[2] == tok.unk_token_id
    assert tok.decode(ids[:2]) == "a\n"


def test_char_vocab_sorted_and_deterministic():
    a = train_char_tokenizer(["hello", "world"]).get_vocab()
    b = train_char_tokenizer(["world", "hello"]).get_vocab()
    assert a == b
    chars = sorted(set("helloworld"))
    assert [a[c] for c in chars] == list(range(len(chars)))


# ---------------------------------------------------------------- BPE tokenizer


@pytest.mark.parametrize("which", ["shakespeare", "soseki"])
def test_bpe_roundtrip_and_compression(which, request, tmp_path):
    text = request.getfixturevalue(which)
    train_text = text.encode("utf-8")[:200_000].decode("utf-8", errors="ignore")
    tok = train_bpe_tokenizer([train_text], vocab_size=1000)
    assert len(tok) == 1000
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)

    held_out = text[-20_000:]
    for x in (held_out, "  two leading spaces\n\n", "吾輩は猫である。名前はまだ無い。\n", "emoji 🐈 and tabs\t\t"):
        ids = tok.encode(x)
        assert tok.decode(ids) == x
    ids = tok.encode(held_out)
    assert tok.eos_token_id not in ids and tok.bos_token_id not in ids
    assert len(ids) < 0.6 * len(held_out.encode("utf-8"))


def test_bpe_prepare_shards_match_whole_text_encoding(shakespeare, tmp_path):
    corpus = write(tmp_path / "corpus" / "shakes.txt", shakespeare[:300_000])
    text = corpus.read_text(encoding="utf-8")
    assert len(text_mod._chunks(text)) > 1  # the chunked, parallel path is exercised
    data = prepare_text_corpus(corpus, tmp_path / "cache", tokenizer="bpe", vocab_size=800)
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert data.vocab_size == 800 and data.dtype == "uint16"
    assert all_tokens(data).tolist() == tok.encode(text)
    assert tok.decode(all_tokens(data).tolist()) == text


def test_chunked_encoding_equals_whole_text_encoding(monkeypatch):
    rng = np.random.default_rng(0)
    pieces = ["word", "Word", " ", "  ", "\n", "\n\n", " \n", "\t", "、", "猫", "。", "'s", "42", "!", "\u3000"]
    text = "".join(rng.choice(pieces, size=6000))
    tok = train_bpe_tokenizer([text], vocab_size=400)
    monkeypatch.setattr(text_mod, "_CHUNK_CHARS", 40)
    chunks = text_mod._chunks(text)
    assert len(chunks) > 50 and "".join(chunks) == text
    ids = text_mod._encode_files(tok, [text], tok.eos_token_id, chunked=True)
    assert ids.tolist() == tok.encode(text)


# ---------------------------------------------------------------- shards


def test_shards_split_dtype_and_content(shakespeare, shakespeare_char):
    data = shakespeare_char
    total = len(shakespeare)  # one token per character, single file: no separators
    assert data.n_train_tokens + data.n_val_tokens == total
    assert data.n_train_tokens == int(total * 0.9)
    assert abs(data.n_val_tokens / total - 0.1) < 1e-4
    assert data.dtype == "uint16"
    train, val = data.train_tokens(), data.val_tokens()
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert len(train) == data.n_train_tokens and len(val) == data.n_val_tokens
    assert data.train_path.stat().st_size == 2 * data.n_train_tokens
    assert data.val_path.stat().st_size == 2 * data.n_val_tokens

    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert tok.decode(train[:1000].tolist()) == shakespeare[:1000]
    assert tok.decode(val.tolist()) == shakespeare[data.n_train_tokens:]

    meta = json.loads((data.out_dir / "meta.json").read_text())
    assert meta["n_train_tokens"] == data.n_train_tokens and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 68 and data.out_dir.name == f"char-{meta['key'][:12]}"


@pytest.mark.parametrize("val_fraction", [0.0, 0.25, 0.5])
def test_val_fraction_honoured(val_fraction, tmp_path):
    corpus = write(tmp_path / "c.txt", "abcdefghij" * 40)
    data = prepare_text_corpus(corpus, tmp_path / "cache", val_fraction=val_fraction)
    assert data.n_train_tokens + data.n_val_tokens == 400
    assert data.n_val_tokens == 400 - int(400 * (1 - val_fraction))
    assert len(data.val_tokens()) == data.n_val_tokens


def test_directory_corpus_joins_files_with_eos(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "b.txt", "second file\n")
    write(corpus / "a.txt", "first file\n")
    write(corpus / "sub" / "c.txt", "third")
    write(corpus / "notes.md", "not a txt file")
    assert [p.name for p, _ in read_corpus(corpus)] == ["a.txt", "b.txt", "c.txt"]

    data = prepare_text_corpus(corpus, tmp_path / "cache", val_fraction=0.0)
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    eos = data.eos_token_id
    expected = tok.encode("first file\n") + [eos] + tok.encode("second file\n") + [eos] + tok.encode("third")
    assert all_tokens(data).tolist() == expected
    assert data.n_train_tokens == len(expected) and data.n_val_tokens == 0
    assert tok.decode(expected) == "first file\n<|endoftext|>second file\n<|endoftext|>third"


def test_list_corpus_keeps_order(tmp_path):
    a = write(tmp_path / "a.txt", "aaa")
    b = write(tmp_path / "b.txt", "bbb")
    assert [p.name for p, _ in read_corpus([b, str(a)])] == ["b.txt", "a.txt"]
    data = prepare_text_corpus([b, a], tmp_path / "cache", val_fraction=0.0)
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert tok.decode(all_tokens(data).tolist()) == "bbb<|endoftext|>aaa"


# ---------------------------------------------------------------- cache


def test_cache_reused_without_retokenizing(tmp_path, monkeypatch):
    corpus = write(tmp_path / "c.txt", "hello world\n" * 50)
    first = prepare_text_corpus(corpus, tmp_path / "cache")
    mtime = first.train_path.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: tokenizer retrained")

    monkeypatch.setattr(text_mod, "train_char_tokenizer", boom)
    monkeypatch.setattr(text_mod, "_encode_files", boom)
    second = prepare_text_corpus(corpus, tmp_path / "cache")
    assert second == first
    assert second.train_path.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.out_dir.name]


def test_cache_key_changes_with_inputs(tmp_path):
    corpus = write(tmp_path / "c.txt", "the quick brown fox jumps over the lazy dog\n" * 30)
    cache = tmp_path / "cache"
    bpe_300 = prepare_text_corpus(corpus, cache, tokenizer="bpe", vocab_size=300)
    bpe_300_again = prepare_text_corpus(corpus, cache, tokenizer="bpe", vocab_size=300)
    bpe_320 = prepare_text_corpus(corpus, cache, tokenizer="bpe", vocab_size=320)
    char = prepare_text_corpus(corpus, cache)
    char_val = prepare_text_corpus(corpus, cache, val_fraction=0.2)
    write(corpus, "the quick brown fox jumps over the lazy cat\n" * 30)
    char_edited = prepare_text_corpus(corpus, cache)
    assert bpe_300.out_dir == bpe_300_again.out_dir
    dirs = [d.out_dir for d in (bpe_300, bpe_320, char, char_val, char_edited)]
    assert len(set(dirs)) == 5
    assert bpe_300.out_dir.name.startswith("bpe-") and char.out_dir.name.startswith("char-")
    assert sorted(p.name for p in cache.iterdir()) == sorted(d.name for d in dirs)
    tok = AutoTokenizer.from_pretrained(char_edited.tokenizer_dir)
    assert tok.decode(all_tokens(char_edited).tolist()).endswith("lazy cat\n")


def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
    corpus = write(tmp_path / "c.txt", "some text\n" * 20)
    cache = tmp_path / "cache"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_text_corpus(corpus, cache)
    assert list(cache.iterdir()) == []  # neither the final dir nor the temp dir
    monkeypatch.undo()
    data = prepare_text_corpus(corpus, cache)
    assert data.n_train_tokens + data.n_val_tokens == 200


def test_incomplete_cache_dir_is_rebuilt(tmp_path):
    corpus = write(tmp_path / "c.txt", "some text\n" * 20)
    data = prepare_text_corpus(corpus, tmp_path / "cache")
    (data.out_dir / "meta.json").unlink()
    data.val_path.unlink()
    again = prepare_text_corpus(corpus, tmp_path / "cache")
    assert again == data
    assert len(again.val_tokens()) == data.n_val_tokens == 20


def test_existing_tokenizer_path(tmp_path):
    a = write(tmp_path / "a.txt", "abc abc\n" * 20)
    b = write(tmp_path / "b.txt", "cab\n" * 20)
    base = prepare_text_corpus(a, tmp_path / "cache")
    data = prepare_text_corpus(b, tmp_path / "cache", tokenizer_path=base.tokenizer_dir, val_fraction=0.0)
    assert data.out_dir.name.startswith("pretrained-")
    assert data.vocab_size == base.vocab_size == 5 + 3  # "abc \n" + specials
    assert data.eos_token_id == base.eos_token_id
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert (data.tokenizer_dir / "tokenizer.json").is_file()
    assert all_tokens(data).tolist() == AutoTokenizer.from_pretrained(base.tokenizer_dir).encode("cab\n" * 20)
    assert tok.decode(all_tokens(data).tolist()) == "cab\n" * 20
    with pytest.raises(DataError, match="missing_tok"):
        prepare_text_corpus(b, tmp_path / "cache", tokenizer_path=tmp_path / "missing_tok")


# ---------------------------------------------------------------- bad input


def test_missing_corpus_path(tmp_path):
    with pytest.raises(DataError, match="nope.txt.*does not exist"):
        prepare_text_corpus(tmp_path / "nope.txt", tmp_path / "cache")


def test_directory_without_txt_files(tmp_path):
    write(tmp_path / "corpus" / "readme.md", "hello")
    with pytest.raises(DataError, match=r"corpus.*no \.txt files"):
        prepare_text_corpus(tmp_path / "corpus", tmp_path / "cache")


@pytest.mark.parametrize("content", ["", "  \n\t\n  "])
def test_empty_or_whitespace_file(tmp_path, content):
    write(tmp_path / "corpus" / "good.txt", "some text")
    write(tmp_path / "corpus" / "blank.txt", content)
    with pytest.raises(DataError, match="blank.txt.*empty or only whitespace"):
        prepare_text_corpus(tmp_path / "corpus", tmp_path / "cache")


def test_invalid_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt") as e:
        prepare_text_corpus(bad, tmp_path / "cache")
    msg = str(e.value)
    assert "not valid UTF-8" in msg and "byte offset 3" in msg and "iconv" in msg and "-t UTF-8" in msg
    assert "\n" not in msg


def test_unknown_tokenizer_kind(tmp_path):
    corpus = write(tmp_path / "c.txt", "abc")
    with pytest.raises(DataError, match="'wordpiece'.*char, bpe"):
        prepare_text_corpus(corpus, tmp_path / "cache", tokenizer="wordpiece")


def test_bpe_needs_vocab_size(tmp_path):
    corpus = write(tmp_path / "c.txt", "abc")
    with pytest.raises(DataError, match="needs vocab_size"):
        prepare_text_corpus(corpus, tmp_path / "cache", tokenizer="bpe")
    with pytest.raises(DataError, match="vocab_size=100.*at least 259"):
        prepare_text_corpus(corpus, tmp_path / "cache", tokenizer="bpe", vocab_size=100)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("split, min_tokens", [("train", 1000), ("val", 50)])
def test_corpus_too_small_for_block_size(tmp_path, split, min_tokens):
    corpus = write(tmp_path / "tiny.txt", "x" * 200)  # 180 train + 20 val tokens
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        prepare_text_corpus(corpus, cache, min_tokens=min_tokens)
    msg = str(e.value)
    n = 180 if split == "train" else 20
    assert "tiny.txt" in msg
    assert f"has {n} {split} tokens, needs at least {min_tokens} (block_size+1)" in msg
    assert "smaller block_size" in msg
    assert not cache.exists() or list(cache.iterdir()) == []

    data = prepare_text_corpus(corpus, cache, min_tokens=20)
    assert (data.n_train_tokens, data.n_val_tokens) == (180, 20)
    with pytest.raises(DataError, match=f"has {n} {split} tokens"):  # also checked on a cache hit
        prepare_text_corpus(corpus, cache, min_tokens=min_tokens)


def test_read_corpus_returns_resolved_paths(tmp_path, monkeypatch):
    write(tmp_path / "c.txt", "héllo\n")
    monkeypatch.chdir(tmp_path)
    [(path, text)] = read_corpus("c.txt")
    assert path == (tmp_path / "c.txt").resolve() and path.is_absolute()
    assert text == "héllo\n"
    assert os.fspath(path).endswith("c.txt")


def test_unknown_tokens_of_an_existing_tokenizer_are_counted_and_cached(tmp_path):
    """20 lines "aaxb\n" read with a tokenizer that knows a, b and newline: 100 tokens (one file: no eos), 20 of
    them unknown (x)."""
    tok_dir = tmp_path / "tok"
    train_char_tokenizer(["ab\n"]).save_pretrained(tok_dir)
    corpus = write(tmp_path / "c.txt", "aaxb\n" * 20)
    data = prepare_text_corpus(corpus, tmp_path / "cache", tokenizer_path=tok_dir, val_fraction=0.1)
    assert data.n_train_tokens + data.n_val_tokens == 100 and data.unknown_tokens == 20
    assert data.unknown_rate == pytest.approx(0.2)
    meta_file = data.out_dir / "meta.json"
    assert json.loads(meta_file.read_text())["unknown_tokens"] == 20
    meta = json.loads(meta_file.read_text())
    del meta["unknown_tokens"]  # as written before the count existed: recounted from the stored ids
    meta_file.write_text(json.dumps(meta))
    again = prepare_text_corpus(corpus, tmp_path / "cache", tokenizer_path=tok_dir, val_fraction=0.1)
    assert again.unknown_tokens == 20
    own = prepare_text_corpus(corpus, tmp_path / "cache", tokenizer="char", val_fraction=0.1)
    assert own.unknown_tokens == 0  # a tokenizer trained on the corpus knows every character
