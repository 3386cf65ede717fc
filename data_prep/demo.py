"""A small built-in corpus, generated in code, so the quick start runs on a fresh clone with no data.

The text is a deterministic stream of short sentences from a tiny grammar: regular enough that a
small model visibly learns it in a few CPU minutes, varied enough not to be memorised at once.
"""

from __future__ import annotations

import random
from pathlib import Path

_SUBJECTS = ["the cat", "the dog", "a small bird", "the old fox", "my neighbour", "the farmer", "a young girl",
             "the king", "the baker", "an owl", "the miller", "a tired horse"]
_VERBS = [("sees", "see"), ("follows", "follow"), ("finds", "find"), ("calls", "call"), ("helps", "help"),
          ("watches", "watch"), ("greets", "greet"), ("feeds", "feed"), ("chases", "chase"), ("waits for", "wait for")]
_OBJECTS = ["the river", "a red apple", "the green hill", "the quiet village", "a wooden boat", "the morning sun",
            "the little mouse", "an open door", "the stone bridge", "a bag of bread"]
_PLACES = ["in the garden", "by the sea", "under the oak tree", "at the market", "near the mill", "on the road"]
_TIMES = ["at dawn", "every evening", "in the spring", "after the rain", "before supper", "on sunday"]


def demo_sentences(rng: random.Random):
    while True:
        s, (v, v_plural), o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        form = rng.random()
        if form < 0.4:
            yield f"{s} {v} {o} {rng.choice(_PLACES)}."
        elif form < 0.7:
            yield f"{rng.choice(_TIMES)}, {s} {v} {o}."
        elif form < 0.85:
            yield f"does {s} see {o}? yes, {s} {v} it {rng.choice(_PLACES)}."
        else:
            yield f"{s} and {rng.choice(_SUBJECTS)} {v_plural} {o} together."


def demo_text(n_chars: int = 300_000, seed: int = 0) -> str:
    """About `n_chars` characters of demo text, sentences grouped into short paragraphs."""
    rng = random.Random(seed)
    parts, size, sentences = [], 0, demo_sentences(rng)
    while size < n_chars:
        paragraph = " ".join(next(sentences) for _ in range(rng.randint(2, 5)))
        paragraph = paragraph[0].upper() + paragraph[1:] + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)


def write_demo_corpus(directory: Path, n_chars: int = 300_000) -> Path:
    """Write the demo corpus to directory/demo.txt (once) and return its path."""
    path = Path(directory) / "demo.txt"
    text = demo_text(n_chars)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path
