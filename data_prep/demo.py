"""A small built-in corpus and instruction set, generated in code, so the quick start runs on a fresh clone.

The text is a deterministic stream of short sentences from a tiny grammar: regular enough that a
small model visibly learns it in a few CPU minutes, varied enough not to be memorised at once. A share
of its paragraphs are instruction passages in the Natural-Instructions prompt format (Tk-Instruct's
"Definition: ... Positive Example 1 - ... Now complete the following example - ...") of a few
*pretraining* tasks (copy the sentence, its first word, its last word, what is acted on), as web text holds
such passages: the pretrained model knows the format, every character of it, and how to copy a part of the
input.

`demo_tasks` are the *fine-tuning* tasks, which pretraining never shows: NI task objects (definition,
positive examples, instances) about the same sentences (is it a question? who does it, where,
when?), that a tiny model really learns. `write_demo_tasks` writes them as NI task JSON files.
"""

from __future__ import annotations

import json
import os
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

INSTRUCTION_SHARE = 0.35  # of the corpus's paragraphs: an instruction passage of a pretraining task


def _demo_sentence(rng: random.Random) -> dict:
    """One sentence of the grammar and its parts: text, subject, object, place and time (or None), question."""
    s, (v, v_plural), o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    form = rng.random()
    place, time, question = None, None, False
    if form < 0.4:
        place = rng.choice(_PLACES)
        text = f"{s} {v} {o} {place}."
    elif form < 0.7:
        time = rng.choice(_TIMES)
        text = f"{time}, {s} {v} {o}."
    elif form < 0.85:
        place, question = rng.choice(_PLACES), True
        text = f"does {s} see {o}? yes, {s} {v} it {place}."
    else:
        s = f"{s} and {rng.choice(_SUBJECTS)}"
        text = f"{s} {v_plural} {o} together."
    return {"text": text, "subject": s, "object": o, "place": place, "time": time, "question": question}


def demo_sentences(rng: random.Random):
    while True:
        yield _demo_sentence(rng)["text"]


# (name, definition, answer(sentence parts) -> output or None when the task does not apply)
_PRETRAIN_TASKS = [
    ("copy", "Copy the sentence.", lambda p: p["text"]),
    ("first_word", "Write the first word of the sentence.", lambda p: p["text"].split()[0]),
    ("last_word", "Write the last word of the sentence.", lambda p: p["text"].split()[-1].rstrip(".?")),
    ("what", "What do they act on? Write the thing.", lambda p: p["object"]),
]
DEMO_TASKS = [
    ("demo_question", "Is the sentence a question? Answer yes or no.", lambda p: "yes" if p["question"] else "no"),
    ("demo_who", "Who does it? Write the words that name them.",
     lambda p: p["subject"] if p["text"].startswith(p["subject"]) else None),  # the sentences that start with it
    ("demo_where", "Where does it happen? Write the place.", lambda p: p["place"]),
    ("demo_when", "When does it happen? Write the time.", lambda p: p["time"]),
]


def _instruction_passage(rng: random.Random) -> str:
    """A pretraining task's prompt in the NI format (with one demonstration or none), then its answer."""
    from data_prep.natural_instructions import NIExample, NITask, PromptConfig, encode_prompt

    _, definition, answer = rng.choice(_PRETRAIN_TASKS)
    demo, instance = _demo_sentence(rng), _demo_sentence(rng)
    task = NITask(name="", path=Path(), definition=definition, negative_examples=[], instances=[],
                  positive_examples=[NIExample(demo["text"], answer(demo))])
    return encode_prompt(task, instance["text"], PromptConfig(num_pos=rng.randint(0, 1))) + answer(instance)


def demo_text(n_chars: int = 300_000, seed: int = 0) -> str:
    """About `n_chars` characters of demo text: sentences grouped into short paragraphs, and a share
    (INSTRUCTION_SHARE) of instruction passages of the pretraining tasks, each followed by a blank line."""
    rng = random.Random(seed)
    parts, size, sentences = [], 0, demo_sentences(rng)
    while size < n_chars:
        if rng.random() < INSTRUCTION_SHARE:
            paragraph = _instruction_passage(rng) + "\n\n"
        else:
            paragraph = " ".join(next(sentences) for _ in range(rng.randint(2, 5)))
            paragraph = paragraph[0].upper() + paragraph[1:] + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several processes of one run may write at once
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def write_demo_corpus(directory: Path, n_chars: int = 300_000) -> Path:
    """Write the demo corpus to directory/demo.txt (once) and return its path."""
    path = Path(directory) / "demo.txt"
    _write_if_changed(path, demo_text(n_chars))
    return path


def demo_tasks(n_instances: int = 300, seed: int = 1) -> dict[str, dict]:
    """The built-in fine-tuning tasks as NI task JSON objects, by task name: "Definition", two "Positive
    Examples", and `n_instances` "Instances" with distinct inputs (ids "<task>-<n>"). demo_question has as many
    questions as statements; demo_where and demo_when use the sentences that have a place or a time, demo_who those that start with who does it. Deterministic in `seed`."""
    rng = random.Random(seed)
    tasks = {}
    for name, definition, answer in DEMO_TASKS:
        rows, seen = [], set()
        while len(rows) < n_instances + 2:
            parts = _demo_sentence(rng)
            if name == "demo_question":  # balanced: half questions, half statements
                while parts["question"] != (len(rows) % 2 == 0):
                    parts = _demo_sentence(rng)
            output = answer(parts)
            if output is not None and parts["text"] not in seen:
                seen.add(parts["text"])
                rows.append((parts["text"], output))
        tasks[name] = {
            "Definition": [definition],
            "Source": ["gpt-tune built-in demo (data_prep/demo.py)"],
            "Positive Examples": [{"input": i, "output": o, "explanation": ""} for i, o in rows[:2]],
            "Negative Examples": [],
            "Instances": [{"id": f"{name}-{n}", "input": i, "output": [o]} for n, (i, o) in enumerate(rows[2:])],
        }
    return tasks


def write_demo_tasks(directory: Path) -> Path:
    """Write the built-in tasks as NI task files directory/<name>.json (rewritten only when they differ; other
    .json files there, e.g. tasks of an earlier version, are removed: the directory holds these tasks alone) and
    return the directory."""
    directory = Path(directory)
    tasks = demo_tasks()
    for name, task in tasks.items():
        _write_if_changed(directory / f"{name}.json", json.dumps(task, indent=1) + "\n")
    for stale in directory.glob("*.json"):
        if stale.stem not in tasks:
            stale.unlink(missing_ok=True)
    return directory
