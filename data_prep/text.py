"""Text corpus -> tokenizer + memory-mapped token shards (train.bin / val.bin), cached by content.

Layout of a prepared corpus (``out_root/<kind>-<key[:12]>/``)::

    tokenizer.json, tokenizer_config.json   loadable with transformers.AutoTokenizer
    train.bin, val.bin                      raw token ids (np.memmap, dtype in meta.json)
    meta.json                               TextData fields + cache key

Files are encoded one by one and joined with the eos token; the first (1 - val_fraction)
of the token stream is train, the rest val (as in nanoGPT).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tune.errors import DataError
from tune.files import directory_written_aside

FORMAT_VERSION = 1
TOKENIZER_KINDS = ("char", "bpe")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
MODEL_MAX_LENGTH = int(1e30)
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
_CHUNK_CHARS = 1 << 16
# A chunk may end only after "<non-space>\n" and before a non-space character: there the
# byte-level pre-tokenizer splits the same way whether or not the text is cut, so chunked
# encoding gives the same ids as encoding the whole file.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")

PathLike = Union[str, os.PathLike]


@dataclass
class TextData:
    """What prepare_text_corpus returns."""

    out_dir: Path
    tokenizer_dir: Path
    train_path: Path
    val_path: Path
    dtype: str
    vocab_size: int
    eos_token_id: int
    n_train_tokens: int
    n_val_tokens: int
    unknown_tokens: int | None = None  # tokens equal to the tokenizer's unk token (None: it has none)

    @property
    def unknown_rate(self) -> float:
        """Fraction of all tokens (train + val) the tokenizer could not represent."""
        return (self.unknown_tokens or 0) / max(self.n_train_tokens + self.n_val_tokens, 1)

    def train_tokens(self) -> np.memmap:
        """The train split as a read-only memmap."""
        return _memmap(self.train_path, self.dtype, self.n_train_tokens)

    def val_tokens(self) -> np.memmap:
        """The val split as a read-only memmap."""
        return _memmap(self.val_path, self.dtype, self.n_val_tokens)


def _memmap(path: Path, dtype: str, n_tokens: int) -> np.memmap:
    if n_tokens == 0:
        # np.memmap refuses empty files.
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def read_corpus(corpus: PathLike | Sequence[PathLike]) -> list[tuple[Path, str]]:
    """Read a .txt file, a directory of .txt files (recursive, sorted) or a list of these as UTF-8.

    Returns ``[(resolved_path, text), ...]``. Raises DataError for missing paths, directories
    without .txt files, files that are not UTF-8 and files that are empty or only whitespace.
    """
    if isinstance(corpus, (str, os.PathLike)):
        roots = [Path(corpus)]
    else:
        roots = [Path(p) for p in corpus]
        if not roots:
            raise DataError("corpus: the list of corpus paths is empty; pass at least one .txt file or directory")

    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            found = sorted(p for p in root.rglob("*.txt") if p.is_file())
            if not found:
                raise DataError(f"{root}: directory contains no .txt files; put the corpus in *.txt files or pass the file paths")
            files.extend(found)
        elif root.is_file():
            files.append(root)
        else:
            raise DataError(f"{root}: corpus path does not exist; check the path (relative paths are taken from {Path.cwd()})")

    out = []
    for path in files:
        path = path.resolve()
        out.append((path, _decode(path, path.read_bytes())))
    return out


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 (byte offset {e.start}: {e.reason}); "
            f"re-encode it, e.g. `iconv -f <its encoding> -t UTF-8 {path} > {path}.utf8 && mv {path}.utf8 {path}`"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: file is empty or only whitespace; remove it from the corpus or add text")
    return text


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )


def train_char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one id per distinct character of ``texts`` (sorted), then the specials.

    ``decode(encode(x)) == x`` for any text made of seen characters; unseen ones become ``<|unk|>``.
    """
    chars = sorted(set().union(*map(set, texts)) - set(SPECIAL_TOKENS))
    vocab = {c: i for i, c in enumerate(chars)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tokenizer)


def _check_bpe_vocab_size(vocab_size) -> None:
    if vocab_size is None:
        raise DataError("tokenizer='bpe' needs vocab_size; set vocab_size (e.g. 8000; GPT-1 used 40,000 merges)")
    min_size = 256 + len(SPECIAL_TOKENS)
    if int(vocab_size) < min_size:
        raise DataError(
            f"vocab_size={vocab_size}: byte-level BPE needs at least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
            "set a larger vocab_size (GPT-1 used 40,000 merges)"
        )


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, no prefix space) with ``vocab_size`` entries including the specials."""
    _check_bpe_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return _wrap(tokenizer)


def _chunks(text: str) -> list[str]:
    if len(text) <= _CHUNK_CHARS:
        return [text]
    chunks, start = [], 0
    for m in _SAFE_CUT.finditer(text, _CHUNK_CHARS):
        cut = m.start()
        if cut - start >= _CHUNK_CHARS:
            chunks.append(text[start:cut])
            start = cut
    chunks.append(text[start:])
    return chunks


def _encode_files(tok: PreTrainedTokenizerBase, texts: Iterable[str], eos_id: int, chunked: bool) -> np.ndarray:
    """Token ids of every text, with eos between consecutive texts (no specials added otherwise).

    chunked: split each text at safe places and encode the pieces in parallel; only valid for
    the tokenizers built here (e.g. a Metaspace tokenizer would add "▁" at every piece).
    """
    backend = getattr(tok, "backend_tokenizer", None)
    parts: list[np.ndarray] = []
    for i, text in enumerate(texts):
        if i:
            parts.append(np.array([eos_id], dtype=np.int64))
        chunks = _chunks(text) if chunked else [text]
        if backend is not None:
            encodings = backend.encode_batch(chunks, add_special_tokens=False)
            ids_per_chunk = [e.ids for e in encodings]
        else:
            ids_per_chunk = [tok.encode(c, add_special_tokens=False) for c in chunks]
        parts.extend(np.asarray(ids, dtype=np.int64) for ids in ids_per_chunk)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _load_tokenizer(tokenizer_path: PathLike) -> PreTrainedTokenizerBase:
    path = Path(tokenizer_path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers raises many types here
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot load tokenizer ({msg}); pass a directory saved with save_pretrained") from None
    if tok.eos_token_id is None:
        raise DataError(f"{path}: tokenizer has no eos_token; set eos_token in its tokenizer_config.json")
    return tok


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _cache_key(files: list[tuple[Path, str]], kind: str, vocab_size, val_fraction: float, tok_digest) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, kind, vocab_size, val_fraction, tok_digest]).encode())
    for path, text in files:
        h.update(b"\0file\0" + path.name.encode() + b"\0")
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()


def _corpus_name(corpus) -> str:
    if isinstance(corpus, (str, os.PathLike)):
        return str(corpus)
    paths = [str(p) for p in corpus]
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"


def _check_size(name: str, n_train: int, n_val: int, min_tokens: int, val_fraction: float) -> None:
    for split, n in (("train", n_train), ("val", n_val)):
        if n < min_tokens:
            raise DataError(
                f"{name}: corpus too small for the context window: has {n} {split} tokens, needs at least "
                f"{min_tokens} (block_size+1) (val_fraction={val_fraction}); "
                "use a larger corpus or a smaller block_size / val_fraction"
            )


def _load_cached(out_dir: Path, key: str) -> TextData | None:
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    data = TextData(
        out_dir=out_dir,
        tokenizer_dir=out_dir / meta["tokenizer_dir"],
        train_path=out_dir / meta["train_path"],
        val_path=out_dir / meta["val_path"],
        dtype=meta["dtype"],
        vocab_size=meta["vocab_size"],
        eos_token_id=meta["eos_token_id"],
        n_train_tokens=meta["n_train_tokens"],
        n_val_tokens=meta["n_val_tokens"],
    )
    if not (data.train_path.is_file() and data.val_path.is_file()):
        return None
    if "unknown_tokens" in meta:
        data.unknown_tokens = meta["unknown_tokens"]
    else:  # a cache written before unknown tokens were counted: count them now
        data.unknown_tokens = _count_unknown(_load_tokenizer(data.tokenizer_dir),
                                             [data.train_tokens(), data.val_tokens()])
    return data


def _count_unknown(tok: PreTrainedTokenizerBase, arrays) -> int | None:
    from tune.hf import unknown_token_id

    unk = unknown_token_id(tok)
    return None if unk is None else int(sum((np.asarray(a) == unk).sum() for a in arrays))


def prepare_text_corpus(
    corpus: PathLike | Sequence[PathLike],
    out_root: PathLike,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    min_tokens: int = 0,
    tokenizer_path: PathLike | None = None,
) -> TextData:
    """Tokenize ``corpus`` into ``out_root/<kind>-<key[:12]>/`` and return its TextData (reused if cached).

    tokenizer: "char" or "bpe" (needs vocab_size); ignored when ``tokenizer_path`` (an
    AutoTokenizer-loadable dir) is given, in which case ``kind`` is "pretrained".
    min_tokens: both splits must hold at least this many tokens (pass block_size + 1).
    """
    if tokenizer_path is None and tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"tokenizer={tokenizer!r}: unknown tokenizer kind; use one of {', '.join(TOKENIZER_KINDS)} or pass tokenizer_path")
    if tokenizer_path is None and tokenizer == "bpe":
        _check_bpe_vocab_size(vocab_size)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1); e.g. 0.1")
    val_fraction = float(val_fraction)

    files = read_corpus(corpus)
    name = _corpus_name(corpus)

    tok_digest = None
    if tokenizer_path is not None:
        kind = "pretrained"
        vocab_size = None
        if not Path(tokenizer_path).is_dir():
            raise DataError(f"{tokenizer_path}: tokenizer_path is not a directory; pass a directory saved with save_pretrained")
        tok_digest = _dir_digest(Path(tokenizer_path))
    else:
        kind = tokenizer
        vocab_size = int(vocab_size) if kind == "bpe" else None

    key = _cache_key(files, kind, vocab_size, val_fraction, tok_digest)
    out_dir = Path(out_root) / f"{kind}-{key[:12]}"
    cached = _load_cached(out_dir, key)
    if cached is not None:
        _check_size(name, cached.n_train_tokens, cached.n_val_tokens, min_tokens, val_fraction)
        return cached

    texts = [text for _, text in files]
    if tokenizer_path is not None:
        tok = _load_tokenizer(tokenizer_path)
    elif kind == "char":
        tok = train_char_tokenizer(texts)
    else:
        tok = train_bpe_tokenizer(texts, vocab_size)
    eos_id = tok.eos_token_id

    ids = _encode_files(tok, texts, eos_id, chunked=tokenizer_path is None)
    n_vocab = len(tok)
    max_id = int(ids.max()) if len(ids) else 0
    dtype = "uint16" if max(n_vocab, max_id + 1) <= 65535 else "uint32"
    n_train = int(len(ids) * (1.0 - val_fraction))
    n_val = len(ids) - n_train
    _check_size(name, n_train, n_val, min_tokens, val_fraction)

    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "tokenizer": kind,
        "tokenizer_dir": ".",
        "train_path": TRAIN_FILE,
        "val_path": VAL_FILE,
        "dtype": dtype,
        "vocab_size": n_vocab,
        "eos_token_id": eos_id,
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "unknown_tokens": _count_unknown(tok, [ids]),
        "val_fraction": val_fraction,
        "files": [path.name for path, _ in files],
    }
    _write_atomically(out_dir, tok, ids.astype(dtype), n_train, meta)
    result = _load_cached(out_dir, key)
    if result is None:
        raise DataError(f"{out_dir}: cache directory was written but cannot be read back; delete it and run again")
    return result


def _write_atomically(out_dir: Path, tok: PreTrainedTokenizerBase, ids: np.ndarray, n_train: int, meta: dict) -> None:
    # a stale or incomplete out_dir is replaced; one a concurrent run completed first is kept
    with directory_written_aside(out_dir, lambda path: _load_cached(path, meta["key"]) is not None) as tmp:
        tok.save_pretrained(str(tmp))
        ids[:n_train].tofile(tmp / TRAIN_FILE)
        ids[n_train:].tofile(tmp / VAL_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
