"""data_prep/instructions.py and the finetune / distill recipes on users' instruction data: alpaca, prompt_completion,
chat messages and plain text, read from JSON, JSONL, CSV, Parquet and save_to_disk folders; chat loss masks checked
token by token on a Llama-3-style and a ChatML-style template; bad rows refused in one line naming file, row and field.
"""

import copy
import json
import re
from pathlib import Path

import pytest

from tune.errors import ConfigError, DataError
from tune.losses import IGNORE_INDEX

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# ChatML with its replies marked for transformers' return_assistant_tokens_mask
CHATML_GENERATION = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
                     "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
                     "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                     "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "And goodbye?"},
        {"role": "assistant", "content": "Goodbye now."}]

ALPACA_ROWS = [{"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
               {"instruction": "Name a colour.", "input": "", "output": "blue"},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer with the special tokens of both templates."""
    from data_prep.text import train_bpe_tokenizer

    texts = [m["content"] for m in CHAT] * 20 + [r[k] for r in ALPACA_ROWS for k in r] * 20
    tok = train_bpe_tokenizer(texts, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                                                          "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return tok


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """HF dir: a random 2-layer GPT-2 (context 256) and a byte-level BPE tokenizer trained on this file's rows (no
    chat template of its own), so these tests need no data from ../shared."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_prep.text import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tiny_chat_lm")
    texts = [m["content"] for row in chats(8) for m in row["messages"]] + [r[k] for r in ALPACA_ROWS for k in r]
    tokenizer = train_bpe_tokenizer(texts * 10, 400)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(out)
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` written in the format of path's suffix (.json list, .jsonl, .csv with lists as JSON, .parquet), or as a
    save_to_disk folder for a path without suffix."""
    import pandas as pd
    from datasets import Dataset

    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    elif path.suffix == ".csv":
        pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
                     ).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMATS = [".json", ".jsonl", ".csv", ".parquet", ""]


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_kind_reads_the_same_rows_from_every_format(tmp_path, suffix):
    from data_prep.instructions import read_records

    pc = [{"question": "2+2?", "answer": "4"}, {"question": "Capital of France?", "answer": "Paris"}]
    chats = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    texts = [{"text": "one line"}, {"text": "another\nline"}]
    cases = [("alpaca", ALPACA_ROWS, None), ("prompt_completion", pc, {"prompt": "question", "completion": "answer"}),
             ("chat", chats, None), ("text", texts, None)]
    for kind, rows, columns in cases:
        path = write_rows(tmp_path / f"{kind}{suffix}", rows)
        records = read_records(path, kind, columns, cache_dir=tmp_path / "cache")
        mapping = {ours: theirs for ours, theirs in (columns or {}).items()}
        expected = [{f: r[mapping.get(f, f)] for f in ([*mapping] if columns else r)} for r in rows]
        assert [r.fields for r in records] == expected, (kind, suffix)
        assert [r.where for r in records] == [f"{path} row {i}" for i in (1, 2, 3)[:len(rows)]]
        assert {r.group for r in records} == {kind}


def test_alpaca_prompts_and_masks(tmp_path, chat_tokenizer):
    from data_prep.instructions import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FormatSettings, Formatter, read_records

    records = read_records(write_rows(tmp_path / "a.jsonl", ALPACA_ROWS), "alpaca")
    tok = chat_tokenizer
    fmt = Formatter(FormatSettings(kind="alpaca", max_length=256), tok)
    assert fmt.prompt_and_completion(records[0]) == (ALPACA_PROMPT.format(instruction="Reverse the word.", input="cat"),
                                                     "tac")
    assert fmt.prompt_and_completion(records[1])[0] == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    examples, report = fmt.encode(records)
    prompt = tok(ALPACA_PROMPT.format(instruction="Reverse the word.", input="cat"), add_special_tokens=False)["input_ids"]
    output = tok("tac", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert examples[0]["input_ids"] == prompt + output and examples[0]["prompt_len"] == len(prompt)
    # targets[t] is the token at t+1 when that token is part of the output (or the eos)
    assert examples[0]["targets"] == [IGNORE_INDEX] * (len(prompt) - 1) + output + [IGNORE_INDEX]
    assert report.total == 3 and report.dropped == 0 and report.examples == 3
    everything, _ = Formatter(FormatSettings(kind="alpaca", max_length=256, train_on="all"), tok).encode(records[:1])
    assert everything[0]["targets"] == everything[0]["input_ids"][1:] + [IGNORE_INDEX]
    custom = Formatter(FormatSettings(kind="alpaca", template="Q: {instruction} {input}\nA:"), tok)
    assert custom.prompt_and_completion(records[0]) == ("Q: Reverse the word. cat\nA:", "tac")


def chat_formatter(tok, template, train_on="completion", max_length=256):
    from data_prep.instructions import FormatSettings, Formatter

    return Formatter(FormatSettings(kind="chat", max_length=max_length, train_on=train_on, chat_template=template), tok)


def expected_chat(tok, pieces):
    """ids and labels from (text, trained) pieces, each tokenized on its own."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


CHATML_PIECES = [("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n"
                  "<|im_start|>assistant\n", False), ("Hello there.<|im_end|>", "first"),
                 ("\n<|im_start|>user\nAnd goodbye?<|im_end|>\n<|im_start|>assistant\n", False),
                 ("Goodbye now.<|im_end|>", "last"), ("\n", False)]
LLAMA3_PIECES = [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nSay hello.<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("Hello there.<|eot_id|>", "first"),
                 ("<|start_header_id|>user<|end_header_id|>\n\nAnd goodbye?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("Goodbye now.<|eot_id|>", "last")]


@pytest.mark.parametrize("template,pieces", [(CHATML, CHATML_PIECES), (LLAMA3, LLAMA3_PIECES),
                                             (CHATML_GENERATION, CHATML_PIECES),
                                             (CHATML_GENERATION.replace("{{ message['content'] + '<|im_end|>' }}"
                                                                        "{% endgeneration %}",
                                                                        "{{ message['content'] }}{% endgeneration %}"
                                                                        "{{ '<|im_end|>' }}"), CHATML_PIECES)],
                         ids=["chatml", "llama3", "chatml_generation_blocks", "generation_blocks_without_end_of_turn"])
def test_chat_label_masks_token_by_token(chat_tokenizer, template, pieces):
    from data_prep.instructions import Record

    tok = chat_tokenizer
    if template is LLAMA3:
        tok = copy.deepcopy(tok)
        tok.bos_token = "<|begin_of_text|>"
    record = Record({"messages": CHAT}, "chat.jsonl row 1", "chat", "chat-1")
    for train_on, trained in (("completion", {"first", "last"}), ("all_assistant", {"first", "last"}),
                              ("last_assistant", {"last"}), ("all", {"first", "last", False})):
        ids, labels = expected_chat(tok, [(text, kind in trained) for text, kind in pieces])
        example = chat_formatter(tok, template, train_on).encode([record])[0][0]
        assert example["input_ids"] == ids, train_on
        assert example["targets"] == labels[1:] + [IGNORE_INDEX], train_on
        shown = tok.decode([t for t in example["targets"] if t != IGNORE_INDEX], skip_special_tokens=False)
        end = "<|im_end|>" if "im_end" in pieces[1][0] else "<|eot_id|>"
        if train_on == "last_assistant":
            assert shown == f"Goodbye now.{end}"
        elif train_on != "all":
            assert shown == f"Hello there.{end}Goodbye now.{end}"
    # the prompt evaluation and distillation see: everything before the last reply, with the generation prompt
    fmt = chat_formatter(tok, template)
    prompt, reference = fmt.prompt_and_completion(record)
    assert prompt == "".join(text for text, _ in pieces[:3]) and reference == "Goodbye now."
    assert fmt.end_of_turn == tok.convert_tokens_to_ids(["<|im_end|>" if "im_end" in pieces[1][0] else "<|eot_id|>"])


PLAIN_NO_END_OF_TURN = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_chat_masks_when_the_tokenizer_merges_across_the_reply_boundary(chat_tokenizer):
    """A template whose generation prompt ends in a space ("assistant: "): tokenizing the whole conversation merges
    that space into the reply's first token (" t"), which then started in the prompt and was left untrained. The text
    between the replies and each reply are tokenized on their own (as alpaca's prompt and output are; LLaMA-Factory's
    way), so every reply token is a target and a generation prompt ends as it does alone. Without an end-of-turn
    token, the newline after the last reply and the eos are trained (the way to the stop)."""
    from data_prep.instructions import Record

    tok = chat_tokenizer
    messages = [*CHAT[:2], {"role": "assistant", "content": "terse now."}, CHAT[3], {"role": "assistant", "content": "now."}]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    reply = text.index("assistant: ") + len("assistant: ")
    whole = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert any(a < reply < b for a, b in whole["offset_mapping"])  # " t" straddles the boundary: the case at issue
    record = Record({"messages": messages}, "chat.jsonl row 1", "chat", "chat-1")
    pieces = [("system: You are terse.\nuser: Say hello.\nassistant: ", None), ("terse now.", "first"),
              ("\nuser: And goodbye?\nassistant: ", None), ("now.", "last"), ("\n", "last")]
    for train_on, trained in (("completion", {"first", "last"}), ("last_assistant", {"last"})):
        ids, labels = expected_chat(tok, [(t, kind in trained) for t, kind in pieces])
        ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
        fmt = chat_formatter(tok, PLAIN_NO_END_OF_TURN, train_on)
        example = fmt.encode([record])[0][0]
        assert example["input_ids"] == ids and example["targets"] == labels[1:] + [IGNORE_INDEX], train_on
        prompt, _ = fmt.prompt_and_completion(record)  # the evaluation prompt ends where the last reply's ids start
        assert tok.decode(example["input_ids"][:example["prompt_len"]]) == prompt


def test_chat_masks_with_a_tokenizer_that_prefixes_every_text(tmp_path):
    """A SentencePiece-style tokenizer (Metaspace, prepend "first": Llama-2, Mistral v0.1) writes "▁" before every
    text it is given, so the replies are not tokenized on their own there: the ids are the whole conversation's
    (no "▁Hello" where the text has "Hello" after a special token), and each reply's tokens are trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep.instructions import Record

    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    model.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    model.train_from_iterator([" ".join(m["content"] for m in CHAT) + " system user assistant"] * 50,
                              trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>",
                                                                                  "<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok.convert_ids_to_tokens(tok("Hello", add_special_tokens=False)["input_ids"]) == ["\u2581Hello"]
    record = Record({"messages": CHAT}, "chat.jsonl row 1", "chat", "chat-1")
    fmt = chat_formatter(tok, CHATML)
    assert not fmt.pieces_tokenize_alone
    example = fmt.encode([record])[0][0]
    text = "".join(piece for piece, _ in CHATML_PIECES)
    assert example["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    trained = tok.convert_ids_to_tokens([t for t in example["targets"] if t != IGNORE_INDEX])
    assert "".join(trained).replace("\u2581", " ") == "Hello there.<|im_end|>Goodbye now.<|im_end|>"
    prompt, _ = fmt.prompt_and_completion(record)
    assert example["input_ids"][:example["prompt_len"]] == tok(prompt, add_special_tokens=False)["input_ids"]


# Qwen3's way (simplified): the replies after the last user turn get an (empty) thinking block, earlier ones do not, so
# a reply is written differently once a later user turn follows
QWEN3_LIKE = ("{%- set ns = namespace(found=false, last_query=messages|length - 1) %}{%- for m in messages[::-1] %}"
              "{%- if m.role == 'user' and not ns.found %}{%- set ns.found = true %}"
              "{%- set ns.last_query = (messages|length - 1) - loop.index0 %}{%- endif %}{%- endfor %}"
              "{%- for m in messages %}{%- if m.role == 'assistant' and loop.index0 > ns.last_query %}"
              "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
              "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_that_rewrites_earlier_turns_trains_the_last_reply_with_its_end_of_turn(chat_tokenizer):
    """Templates like Qwen3's write a reply differently once a later turn follows: every reply's span cannot be
    found by prefixes (refused, naming the fix), but the last reply's can, so data.train_on=last_assistant (and all)
    work; the end-of-turn token is found behind the reply's thinking block, so no eos is appended after it."""
    from data_prep.instructions import Record

    tok = chat_tokenizer
    record = Record({"messages": CHAT}, "chat.jsonl row 1", "chat", "chat-1")
    with pytest.raises(DataError, match=r"^chat.jsonl row 1: field messages\[2\]: .*\(data.train_on=last_assistant\)"):
        chat_formatter(tok, QWEN3_LIKE).encode([record])
    fmt = chat_formatter(tok, QWEN3_LIKE, "last_assistant")
    assert fmt.end_of_turn == tok.convert_tokens_to_ids(["<|im_end|>"])
    prompt = CHATML_PIECES[0][0] + "Hello there.<|im_end|>" + CHATML_PIECES[2][0]
    ids, labels = expected_chat(tok, [(prompt, False), ("<think>\n\n</think>\n\nGoodbye now.<|im_end|>", True),
                                      ("\n", False)])
    example = fmt.encode([record])[0][0]
    assert example["input_ids"] == ids and example["targets"] == labels[1:] + [IGNORE_INDEX]
    assert fmt.prompt_and_completion(record) == (prompt, "Goodbye now.")
    everything = chat_formatter(tok, QWEN3_LIKE, "all").encode([record])[0][0]
    assert everything["input_ids"] == ids and everything["targets"] == ids[1:] + [IGNORE_INDEX]


# -- the finetune recipe on these kinds ------------------------------------------------------------
PLAIN_CHAT_FILE = Path(__file__).resolve().parents[1] / "recipes" / "templates" / "plain_chat.jinja"  # shipped
PLAIN_CHAT = PLAIN_CHAT_FILE.read_text(encoding="utf-8")


def chats(n: int) -> list[dict]:
    """n short chats with a system turn and two exchanges: the reply repeats the user's word."""
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "light"]
    return [{"messages": [{"role": "system", "content": "Repeat the word."},
                          {"role": "user", "content": words[i % 8]}, {"role": "assistant", "content": words[i % 8]},
                          {"role": "user", "content": words[(i + 3) % 8]},
                          {"role": "assistant", "content": words[(i + 3) % 8]}]} for i in range(n)]


def finetune_cfg(tmp_path, base, **data):
    from recipes.finetune import FinetuneConfig
    from tune.config import load_config

    return load_config(FinetuneConfig, data={
        "recipe": "finetune", "method": "lora", "base_model": str(base), "output_dir": str(tmp_path / "run"),
        "lora": {"r": 4}, "data": {"max_length": 128, "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"max_steps": 3, "micro_batch_size": 4, "grad_accum_steps": 1, "lr": 1e-2, "warmup_steps": 1,
                  "eval_every": 3, "eval_batches": 2, "log_every": 1, "progress": False},
        "eval": {"max_new_tokens": 4, "max_instances_per_task": 3}})


def test_lora_on_chat_rows_packs_reports_val_loss_and_evaluates(tmp_path, tiny_lm, capsys):
    from data_prep.instructions import FormatSettings, Formatter, read_records
    from recipes.finetune import run
    from tune.hf import load_tokenizer

    train = write_rows(tmp_path / "chats.jsonl", chats(16))
    template = PLAIN_CHAT_FILE
    cfg = finetune_cfg(tmp_path, tiny_lm, kind="chat", train=str(train), chat_template=str(template),
                       heldout_fraction=0.25, packing=True)
    cfg.train.num_samples = 2
    result = run(cfg)
    out = capsys.readouterr().out
    assert "train (chat): 12/12 rows kept (12 examples" in out and "held out: 4 examples of 4 rows" in out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics) and result.val_loss is not None
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    held = results["heldout"]
    assert held["n_instances"] == 3 and set(held["overall"]["mean_over_instances"]) == {
        "rougeL", "exact_match", "copy_input_rougeL", "copy_input_exact_match"}
    # the prompt is the conversation before the last reply, rendered as at training, with the generation prompt;
    # the reference is the last reply, which the copy-input baseline (the last user message) matches exactly
    tokenizer = load_tokenizer(tiny_lm)
    first = held["predictions"][0]
    record = next(r for r in read_records(train, "chat") if r.id == first["id"])
    messages = record.fields["messages"]
    prompt = "".join(f"{m['role']}:\n{m['content']}" + (tokenizer.eos_token if m["role"] == "assistant" else "") + "\n"
                     for m in messages[:-1]) + "assistant:\n"
    assert held["example_prompts"]["chats"] == prompt
    assert first["references"] == [messages[-1]["content"]]
    assert held["overall"]["mean_over_instances"]["copy_input_exact_match"] == 100.0
    fmt = Formatter(FormatSettings(kind="chat", chat_template=PLAIN_CHAT), tokenizer)
    assert fmt.end_of_turn == [tokenizer.eos_token_id]
    # the final evaluation's sample completions: the first held-out chats, prompted and decoded as evaluated
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    final = [s for s in samples if s["step"] == 3]
    assert len(final) == 2 and final[0]["prompt"] == held["example_prompts"]["chats"]
    for sample, evaluated in zip(final, held["predictions"][:2]):
        assert sample["reference"] == evaluated["references"][0] and sample["prediction"] == evaluated["prediction"]
    # the adapter's tokenizer carries data.chat_template: it renders the held-out prompt as training did
    saved = load_tokenizer(tmp_path / "run" / "adapter")
    assert saved.chat_template == PLAIN_CHAT
    assert saved.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) == prompt


def test_no_heldout_rows_means_no_val_loss_not_zero(tmp_path, tiny_lm, capsys):
    """data.heldout_fraction=0 without data.eval: the rows tokenize (an empty held-out batch used to crash the
    tokenizer for alpaca / prompt_completion / text) and the run measures no val_loss, where it logged 0.0 (the mean
    of nothing), on which stop_at_val_loss stopped at the first evaluation."""
    from data_prep.instructions import FormatSettings, Formatter
    from recipes.finetune import run
    from tune.hf import load_tokenizer

    tokenizer = load_tokenizer(tiny_lm)
    for kind in ("alpaca", "prompt_completion", "text"):
        assert Formatter(FormatSettings(kind=kind), tokenizer).encode([])[0] == []
    train = write_rows(tmp_path / "rows.jsonl", ALPACA_ROWS * 4)
    cfg = finetune_cfg(tmp_path, tiny_lm, kind="alpaca", train=str(train), heldout_fraction=0.0)
    cfg.train.eval_every, cfg.train.stop_at_val_loss = 1, 1.0
    result = run(cfg)
    assert result.step == 3 and result.val_loss is None
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_loss" in m for m in metrics) and max(m["step"] for m in metrics) == 3
    assert "no validation examples: val_loss is not measured" in capsys.readouterr().out


@pytest.mark.slow  # three short runs: ~20 s on a loaded CPU
def test_a_run_on_chat_rows_resumes_exactly(tmp_path, tiny_lm, monkeypatch):
    """Ctrl-C in step 5 of 6 on chat rows (packed, held-out share): train.resume=true continues from the step-3
    checkpoint to the same losses, val losses and held-out scores as the uninterrupted run."""
    from recipes.finetune import run
    from tune.packing import NIBatches

    train = write_rows(tmp_path / "chats.jsonl", chats(16))

    def cfg(out, **extra):
        c = finetune_cfg(tmp_path / out, tiny_lm, kind="chat", train=str(train), chat_template=str(PLAIN_CHAT_FILE),
                         heldout_fraction=0.25)
        c.train.max_steps, c.train.save_every, c.train.resume = 6, 3, extra.get("resume", False)
        return c

    full = run(cfg("a"))
    original = NIBatches.step_batches

    def dies_in_step_5(self, step, rank, world):
        if step == 5:
            raise KeyboardInterrupt  # as Ctrl-C: the engine saves a checkpoint and re-raises
        return original(self, step, rank, world)

    monkeypatch.setattr(NIBatches, "step_batches", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(cfg("b"))
    monkeypatch.setattr(NIBatches, "step_batches", original)
    resumed = run(cfg("b", resume=True))

    def losses(out):
        rows = [json.loads(line) for line in (tmp_path / out / "run" / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m.get("loss"), m.get("val_loss")) for m in rows if "loss" in m or "val_loss" in m]

    assert losses("b") == losses("a") and resumed.val_loss == full.val_loss
    scores = [json.loads((tmp_path / out / "run" / "eval_results.json").read_text())["heldout"]["predictions"]
              for out in ("a", "b")]
    assert scores[0] == scores[1]


# -- the distill recipe reuses the data section ----------------------------------------------------
def test_distill_on_chat_rows_from_the_teacher_cache_compares_students_on_the_heldout_replies(tmp_path, tiny_lm, capsys):
    from recipes.distill import DistillConfig, run
    from tune.config import load_config

    train = write_rows(tmp_path / "chats.jsonl", chats(12))
    template = PLAIN_CHAT_FILE
    cfg = load_config(DistillConfig, data={
        "recipe": "distill", "output_dir": str(tmp_path / "distill"), "teacher": {"model": str(tiny_lm), "cache": True,
                                                                "cache_dir": str(tmp_path / "teacher_cache")},
        "student": {"preset": "tiny-gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16},
        "data": {"kind": "chat", "train": str(train), "chat_template": str(template), "heldout_fraction": 0.25,
                 "max_length": 128, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "micro_batch_size": 4, "grad_accum_steps": 1, "warmup_steps": 1, "eval_every": 2,
                  "eval_batches": 1, "log_every": 1, "progress": False},
        "compare": {"ce_only": True, "max_instances_per_task": 2, "max_new_tokens": 3}})
    result = run(cfg)
    assert result.step == 2 and (tmp_path / "distill" / "student" / "config.json").is_file()
    rows = json.loads((tmp_path / "distill" / "comparison.json").read_text())
    for name in ("teacher", "off-policy KD", "CE-only student"):
        assert rows[name]["n_instances"] == 2 and 0 <= rows[name]["rougeL"] <= 100, rows
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
    assert "train (chat): 9/9 rows kept" in capsys.readouterr().out
    assert len(list((tmp_path / "teacher_cache").iterdir())) == 1  # the students distilled from the cached teacher


# -- bad input: one line naming file, row and field, nothing written --------------------------------
BAD_CASES = {
    "missing_column": ("alpaca", [{"instruction": "a", "answer": "b"}], {},
                       r"^error: data.train: {train} has no column 'output' for field output of data.kind=alpaca "
                       r"\(columns: instruction, answer\); set data.columns.output=<column>$"),
    "empty_completion": ("prompt_completion", [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": " "}],
                         {}, r"^error: {train} row 2: field completion \(column 'completion'\) is empty; fill it in or "
                             r"remove the row$"),
    "null_output": ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "c"}], {},
                    r"^error: {train} row 2: field output \(column 'output'\) is missing \(null\)"),
    "last_turn_user": ("chat", [{"messages": CHAT[:2]}], {},
                       r"^error: {train} row 1: field messages \(column 'messages'\): the last turn is the user's, not "
                       r"the assistant's; end every chat with the assistant reply to train on$"),
    "unknown_role": ("chat", [{"messages": [CHAT[1], {"role": "tool", "content": "x"}, CHAT[2]]}], {},
                     r"^error: {train} row 1: field messages\[1\] \(column 'messages'\): role 'tool' is not one of "
                     r"system, user, assistant; rename it or remove the message$"),
    "template_fails": ("chat", [{"messages": CHAT[1:3]}, {"messages": CHAT[:3]}],
                       {"chat_template": "{% for m in messages %}{% if m['role'] == 'system' %}"
                                         "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}"
                                         "{% endfor %}"},
                       r"^error: {train} row 2: field messages: data.chat_template=\S+ does not render it "
                       r"\(TemplateError: no system turns\); fix the template or the row$"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_rows_are_one_line_errors_naming_file_row_and_field(tmp_path, tiny_lm, case, capsys):
    import re

    from tune.cli import main
    from tune.config import save_config

    kind, rows, extra, pattern = BAD_CASES[case]
    train = write_rows(tmp_path / "train.jsonl", rows)
    if "chat_template" in extra:
        (tmp_path / "t.jinja").write_text(extra["chat_template"], encoding="utf-8")
    elif kind == "chat":
        (tmp_path / "t.jinja").write_text(PLAIN_CHAT, encoding="utf-8")
    data = {"kind": kind, "train": str(train), "heldout_fraction": 0.0,
            **({"chat_template": str(tmp_path / "t.jinja")} if kind == "chat" else {})}
    save_config(finetune_cfg(tmp_path, tiny_lm, **data), tmp_path / "cfg.yaml")
    assert main(["run", "finetune", "--config", str(tmp_path / "cfg.yaml")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and re.match(pattern.format(train=re.escape(str(train))), errors[0]), errors
    assert not (tmp_path / "run").exists()


def test_sharegpt_turns_are_read_as_role_and_content(tmp_path):
    """axolotl / LLaMA-Factory's ShareGPT rows ({from, value}; human / gpt) read as chat messages, as TRL converts
    them; in a JSONL file and in Parquet (a list of structs)."""
    from data_prep.instructions import read_records

    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]
    for path in (write_rows(tmp_path / "share.jsonl", [{"conversations": turns}]),
                 write_rows(tmp_path / "share.parquet", [{"conversations": turns}])):
        assert read_records(path, "chat", {"messages": "conversations"})[0].fields["messages"] == [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey"}]


@pytest.mark.parametrize("kind,row,message", [
    ("text", {"text": 42}, "field text (column 'text') must be text, got int '42'; write it as text (in JSON: quoted)"),
    ("alpaca", {"instruction": {"a": 1}, "output": "y"},
     "field instruction (column 'instruction') must be text, got dict \"{'a': 1}\"; map data.columns.instruction to a "
     "text column, or flatten this one into text"),
    ("chat", {"messages": {"role": "user", "content": "hi"}},
     "field messages (column 'messages') must be a non-empty list of {role, content} objects, got dict; give the "
     "turns as a list, one object per turn, or remove the row"),
    ("chat", {"messages": []}, "field messages (column 'messages') must be a non-empty list of {role, content} objects, "
                               "got an empty list; give the turns as a list, one object per turn, or remove the row"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, CHAT[2]]},
     "field messages[0] (column 'messages'): content must be text, got list; join its text parts into one string"),
    ("chat", {"messages": ["hi", "there"]}, "field messages[0] (column 'messages') must be an object with 'role' and "
                                            "'content', got str; write each turn as {\"role\": ..., \"content\": ...}"),
], ids=["number", "nested", "messages_dict", "messages_empty", "content_parts", "messages_strings"])
def test_values_of_the_wrong_type_name_row_field_and_fix(tmp_path, kind, row, message):
    from data_prep.instructions import read_records

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"id": 1, "text": "ok", "instruction": "i", "output": "o", "messages": CHAT}) + "\n" +
                    json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_records(path, kind, cache_dir=tmp_path / "cache")
    assert str(e.value) == f"{path} row 2: {message}"


def test_tsv_rows_are_read_and_a_file_that_is_not_utf8_is_named(tmp_path):
    """A .tsv file reads as classify's rows do (tab-separated, header checked by validate); a CSV without its header
    row is told to add one; a Latin-1 CSV (a spreadsheet's default export) gets the fix, not a codec error."""
    from data_prep.instructions import read_records, source_problems

    tsv = tmp_path / "rows.tsv"
    tsv.write_text("instruction\tinput\toutput\nRépète, s'il te plaît\tcafé\tcafé 日本\n", encoding="utf-8")
    assert [r.fields for r in read_records(tsv, "alpaca", cache_dir=tmp_path / "c")] == [
        {"instruction": "Répète, s'il te plaît", "input": "café", "output": "café 日本"}]
    assert source_problems("alpaca", {"data.train": tsv}, {"output": "answer"}, None, None) == [
        f"data.train: {tsv} has no column 'answer' for field output of data.kind=alpaca (columns: instruction, input, "
        "output); set data.columns.output=<column> or add a header row (the first line names the columns)"]
    headless = tmp_path / "headless.csv"  # a header row forgotten: the first row reads as the column names
    headless.write_text("Reverse the word.,cat,tac\nName a colour.,,blue\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_records(headless, "alpaca", cache_dir=tmp_path / "c")
    assert str(e.value) == (f"{headless}: no column 'instruction' for field instruction of data.kind=alpaca (columns "
                            "there: Reverse the word., cat, tac); set data.columns.instruction=<column> or add a "
                            "header row (the first line names the columns)")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("instruction,output\nRépète,café\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_records(latin, "alpaca", cache_dir=tmp_path / "c")
    assert str(e.value) == (f"{latin}: cannot read it as CSV rows: it is not UTF-8 text; save it as UTF-8 (e.g. from a "
                            "spreadsheet: CSV UTF-8)")


def test_files_with_the_same_name_in_two_folders_stay_apart(tmp_path):
    """data.train=[a/train.jsonl, b/train.jsonl]: each file is its own group (ids, the per-file cap, the reports),
    not one group "train" with every id twice."""
    from data_prep.instructions import read_records, split_records

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [write_rows(tmp_path / d / "train.jsonl", [{"text": f"{d} {i}"} for i in range(3)]) for d in "ab"]
    paths.append(write_rows(tmp_path / "other.jsonl", [{"text": "x"}]))
    records = read_records(paths, "text", cache_dir=tmp_path / "c")
    a, b = str(tmp_path / "a" / "train"), str(tmp_path / "b" / "train")
    assert [r.group for r in records] == [a] * 3 + [b] * 3 + ["other"]
    assert len({r.id for r in records}) == 7 and records[3].id == f"{b}-1"
    train, _ = split_records(records, [], 0.0, 0, max_train_per_group=2)
    assert [r.fields["text"] for r in train] == ["a 0", "a 1", "b 0", "b 1", "x"]


def test_a_malformed_json_line_is_named_by_its_line_number(tmp_path):
    """datasets reports a JSON-lines parse error as "in row 1" for the second line (0-based, per block); the error
    names the file's line as users count them, and what is wrong."""
    from data_prep.instructions import read_records

    good = json.dumps({"instruction": "a", "output": "b"})
    cases = {"comma.jsonl": (f"{good}\n\n{good[:-1]},}}\n", "line 3: not valid JSON (Expecting property name "
                                                               "enclosed in double quotes at column 36)"),
             "list.jsonl": (f"{good}\n[1, 2]\n", "line 2: a JSON list, not an object")}
    for name, (text, problem) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(DataError) as e:
            read_records(tmp_path / name, "alpaca", cache_dir=tmp_path / "c")
        assert str(e.value) == f"{tmp_path / name} {problem}; fix that line (one JSON object per line, or one JSON list)"


def test_a_template_that_fails_every_row_is_reported_at_the_first_row(tmp_path, tiny_lm):
    """The held-out rows are rendered first (to fail before training, not at the evaluation); when one fails, the
    error still names the file's first failing row (row 1 here, a training row), not the first held-out one."""
    from recipes.finetune import load_data
    from tune.hf import load_tokenizer

    template = tmp_path / "alternating.jinja"  # Mistral's rule: no system turn, user / assistant alternating
    template.write_text("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                        "{% endif %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    train = write_rows(tmp_path / "chats.jsonl", chats(8))  # every chat starts with a system turn
    cfg = finetune_cfg(tmp_path, tiny_lm, kind="chat", train=str(train), chat_template=str(template),
                       heldout_fraction=0.5)
    with pytest.raises(DataError, match=f"^{re.escape(str(train))} row 1: field messages: .* Conversation roles must "
                                        "alternate"):
        load_data(cfg, load_tokenizer(tiny_lm))


def test_a_missing_column_found_while_reading_names_the_file_and_the_fix(tmp_path):
    from data_prep.instructions import read_records

    folder = write_rows(tmp_path / "rows", [{"instruction": "a", "answer": "b"}])  # a save_to_disk folder
    with pytest.raises(DataError) as e:
        read_records(folder, "alpaca")
    assert str(e.value) == (f"{folder}: no column 'output' for field output of data.kind=alpaca (columns there: "
                            "instruction, answer); set data.columns.output=<column>")
    with pytest.raises(ConfigError, match=r"^data.columns.answer: not a field of data.kind=alpaca"):
        read_records(folder, "alpaca", {"answer": "output"})
    assert read_records(folder, "alpaca", {"output": "answer"})[0].fields == {"instruction": "a", "input": "",
                                                                               "output": "b"}
    # alpaca's input may be absent, but not when data.columns names a column for it (a typo would drop every input)
    with pytest.raises(DataError, match=r"no column 'contxt' for field input of data.kind=alpaca \(columns there: "
                                        r"instruction, answer\); set data.columns.input=<column>$"):
        read_records(folder, "alpaca", {"output": "answer", "input": "contxt"})
    from data_prep.instructions import source_problems

    assert source_problems("alpaca", {"data.train": folder}, {"output": "answer", "input": "contxt"}, None, None) == [
        f"data.train: {folder} has no column 'contxt' for field input of data.kind=alpaca (columns: instruction, "
        "answer); set data.columns.input=<column>"]


def test_validate_checks_files_kind_and_columns_without_torch(tmp_path, model_dir):
    import subprocess
    import sys

    train = write_rows(tmp_path / "rows.csv", [{"question": "q", "answer": "a"}])
    config = tmp_path / "cfg.yaml"
    config.write_text(f"recipe: finetune\nbase_model: {model_dir}\noutput_dir: {tmp_path / 'run'}\n"
                      f"data:\n  kind: prompt_completion\n  train: [{train}, {tmp_path / 'gone.jsonl'}]\n"
                      f"  columns: {{prompt: question}}\n  train_on: last_assistant\n"
                      f"  chat_template: {tmp_path / 'none.jinja'}\n", encoding="utf-8")
    code = ("import sys\nfrom tune.cli import main\n"
            f"code = main(['validate', {str(config)!r}])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "error: 4 problems in " + str(config) + ":", lines
    assert sorted(lines[1:]) == sorted([
        f"  - data.train: {tmp_path / 'gone.jsonl'} does not exist (paths are relative to where you run tune)",
        "  - data.train_on=last_assistant applies to data.kind=chat; for prompt_completion use completion or all",
        f"  - data.train: {train} has no column 'completion' for field completion of data.kind=prompt_completion "
        "(columns: question, answer); set data.columns.completion=<column> or add a header row (the first line names "
        "the columns)",
        "  - data.chat_template applies to data.kind=chat, not prompt_completion"])


def test_validate_reads_the_columns_of_json_lists_and_dataset_dict_splits_and_refuses_empty_files(tmp_path):
    """tune validate's cheap checks reach every format: a JSON list (one line or pretty-printed) and a DatasetDict
    folder's chosen split have their columns checked, a split that is not there and an empty file are named; the
    run says the same of an empty file or a CSV header without rows (not datasets' "StopIteration")."""
    from datasets import Dataset, DatasetDict

    from data_prep.instructions import SplitChoice, read_records, source_problems

    rows = [{"instruction": "a", "response": "b"}]
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(rows), encoding="utf-8")
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    folder = tmp_path / "dd"
    DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows)).save_to_disk(str(folder))
    splits = {"data.train": SplitChoice(None, "train", "data.split"),
              "data.eval": SplitChoice(None, "validation", "data.eval_split")}
    missing = "has no column 'output' for field output of data.kind=alpaca (columns: instruction, response); " \
              "set data.columns.output=<column>"
    assert source_problems("alpaca", {"data.train": [compact, pretty, folder], "data.eval": folder}, None, None, None,
                           splits=splits) == [
        f"data.eval: {folder}: no split 'validation' (splits: train, test); set data.eval_split to one of them",
        f"data.train: {compact} {missing}", f"data.train: {pretty} {missing}", f"data.train: {folder} {missing}"]
    assert source_problems("alpaca", {"data.train": [compact, folder]}, {"output": "response"}, None, None,
                           splits=splits) == []
    empty = "is empty (no rows); write one row per object / line (CSV: a header row, then the rows)"
    for name, text in (("none.jsonl", ""), ("blank.jsonl", "\n\n"), ("list.json", " [ ] "), ("bom.csv", "\ufeff")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert source_problems("text", {"data.train": tmp_path / name}, None, None, None) == [
            f"data.train: {tmp_path / name} {empty}"]
        with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / name))} {re.escape(empty)}$"):
            read_records(tmp_path / name, "text")
    (tmp_path / "header.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'header.csv'))} {re.escape(empty)}$"):
        read_records(tmp_path / "header.csv", "text", cache_dir=tmp_path / "cache")


def test_validate_names_a_chat_run_on_a_tokenizer_without_a_chat_template(tmp_path, tiny_lm):
    """data.kind=chat without data.chat_template on a base whose tokenizer has none: tune validate says so (it was
    found only by the run, after loading the tokenizer); a tokenizer saved with a template passes."""
    import shutil

    from recipes.finetune import validate
    from tune.hf import load_tokenizer

    train = write_rows(tmp_path / "chats.jsonl", chats(4))
    with pytest.raises(ConfigError) as e:
        validate(finetune_cfg(tmp_path, tiny_lm, kind="chat", train=str(train)))
    assert str(e.value) == (f"data.kind=chat: the tokenizer of base_model={tiny_lm} has no chat template; give one as "
                            "data.chat_template=<a .jinja file> (e.g. recipes/templates/plain_chat.jinja)")
    validate(finetune_cfg(tmp_path, tiny_lm, kind="chat", train=str(train), chat_template=str(PLAIN_CHAT_FILE)))
    own = tmp_path / "own"
    shutil.copytree(tiny_lm, own)
    tokenizer = load_tokenizer(own)
    tokenizer.chat_template = PLAIN_CHAT
    tokenizer.save_pretrained(own)
    validate(finetune_cfg(tmp_path, own, kind="chat", train=str(train)))


# -- text rows, truncation report, held-out split, cache -------------------------------------------
def test_text_rows_train_on_every_token_in_max_length_pieces(chat_tokenizer):
    from data_prep.instructions import FormatSettings, Formatter, Record

    tok = chat_tokenizer
    text = "Hello there. Goodbye now. " * 6
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    examples, report = Formatter(FormatSettings(kind="text", max_length=16), tok).encode(
        [Record({"text": text}, "t.jsonl row 1", "t", "t-1")])
    assert [ex["input_ids"] for ex in examples] == [ids[i:i + 16] for i in range(0, len(ids), 16)]
    assert all(ex["targets"] == ex["input_ids"][1:] + [IGNORE_INDEX] for ex in examples)
    assert report.examples == len(examples) > 1 and report.dropped == 0 and [ex["id"] for ex in examples][:2] == [
        "t-1", "t-1#1"]


def test_long_prompts_lose_their_start_and_long_completions_are_dropped(chat_tokenizer):
    from data_prep.instructions import FormatSettings, Formatter, Record

    tok = chat_tokenizer
    rows = [Record({"prompt": "Say hello. " * 20, "completion": "Hello there."}, "r row 1", "r", "r-1"),
            Record({"prompt": "Say hello.", "completion": "Hello there. " * 20}, "r row 2", "r", "r-2"),
            Record({"prompt": "Say hello.", "completion": "Hello there."}, "r row 3", "r", "r-3")]
    completion = tok("Hello there.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = tok("Say hello. " * 20, add_special_tokens=False)["input_ids"]
    limit = len(tok("Say hello.", add_special_tokens=False)["input_ids"]) + len(completion)  # row 3 just fits
    examples, report = Formatter(FormatSettings(kind="prompt_completion", max_length=limit), tok).encode(rows)
    assert examples[0]["input_ids"] == prompt[len(prompt) - (limit - len(completion)):] + completion
    assert [ex["id"] for ex in examples] == ["r-1", "r-3"]
    assert (report.total, report.prompt_truncated, report.dropped, report.dropped_ids) == (3, 1, 1, ["r-2"])
    assert str(report).startswith("2/3 rows kept (2 examples, ") and "1 had the start of their prompt cut" in str(report)
    chat = Record({"messages": CHAT}, "c row 1", "c", "c-1")  # a chat is kept whole or not at all
    length = len(chat_formatter(tok, CHATML).encode([chat])[0][0]["input_ids"])
    assert chat_formatter(tok, CHATML, max_length=length).encode([chat])[1].dropped == 0
    examples, report = chat_formatter(tok, CHATML, max_length=length - 1).encode([chat])
    assert examples == [] and (report.dropped, report.dropped_ids) == (1, ["c-1"])


def test_heldout_rows_are_a_seeded_share_or_the_eval_file(tmp_path):
    from data_prep.instructions import Record, split_records

    rows = [Record({"text": str(i)}, f"f row {i}", "f", f"f-{i}") for i in range(20)]
    train, held = split_records(rows, None, 0.25, seed=3)
    again, held_again = split_records(rows, None, 0.25, seed=3)
    assert [r.id for r in held] == [r.id for r in held_again] and len(held) == 5 and len(train) == 15
    assert sorted(r.id for r in train + held) == sorted(r.id for r in rows)
    assert [r.id for r in split_records(rows, None, 0.25, seed=4)[1]] != [r.id for r in held]
    counted = split_records(rows, None, 0.25, seed=3, heldout_rows=8)[1]
    assert len(counted) == 8 and {r.id for r in held} <= {r.id for r in counted}  # the same seeded order, 8 deep
    assert len(split_records(rows, None, 0.25, seed=3, heldout_rows=50)[0]) == 1  # never all
    eval_rows = rows[:2]
    train, held = split_records(rows, eval_rows, 0.25, seed=3, max_train_per_group=7)
    assert held == eval_rows and [r.id for r in train] == [f"f-{i}" for i in range(7)]


def test_heldout_rows_that_are_also_training_rows_are_warned_about(tmp_path):
    from data_prep.instructions import Record, heldout_overlap_warning, split_records

    rows = [Record({"prompt": "p", "completion": "c"}, f"f.jsonl row {i + 1}", "f", f"f-{i + 1}") for i in range(8)]
    rows += [Record({"prompt": f"q{i}", "completion": "c"}, f"f.jsonl row {i + 9}", "f", f"f-{i + 9}") for i in range(8)]
    train, held = split_records(rows, None, 0.25, seed=0)
    shared = [r for r in held if r.fields["prompt"] == "p"]
    assert shared  # the seeded split puts some of the 8 copies on each side
    assert heldout_overlap_warning(train, held) == (
        f"warning: {len(shared)} of 4 held-out rows are also training rows (e.g. {shared[0].where}): their val loss "
        "and scores measure recall; remove duplicated rows (or data.eval's rows from data.train)")
    assert heldout_overlap_warning(rows[8:12], rows[12:]) is None


def test_tokenized_rows_are_cached_by_content_settings_and_template(tmp_path, chat_tokenizer, monkeypatch):
    from data_prep.instructions import FormatSettings, Formatter, Record, build_format_dataset

    records = [Record({"messages": CHAT}, "c row 1", "c", "c-1")]
    fmt = chat_formatter(chat_tokenizer, CHATML)
    first, report = build_format_dataset(records, fmt, tmp_path)
    expected = fmt.encode(records)[0][0]
    assert first[0] == expected and report.examples == 1
    monkeypatch.setattr(Formatter, "encode", lambda *a: pytest.fail("tokenized again"))
    second, _ = build_format_dataset(records, chat_formatter(chat_tokenizer, CHATML), tmp_path)
    assert second[0] == expected
    monkeypatch.undo()
    other, _ = build_format_dataset(records, chat_formatter(chat_tokenizer, CHATML, "last_assistant"), tmp_path)
    llama, _ = build_format_dataset(records, chat_formatter(chat_tokenizer, LLAMA3), tmp_path)
    assert other[0]["targets"] != expected["targets"] and llama[0]["input_ids"] != expected["input_ids"]
    assert len(list(tmp_path.glob("chat-*"))) == 3


def test_heldout_examples_are_prompt_references_and_group_for_every_kind(tmp_path, tiny_lm):
    """What evaluation, the sample completions and distillation's comparison read: (prompt as trained, references,
    group) — the NI task's Tk-Instruct prompt and outputs, or a row's rendered prompt and its completion."""
    from conftest import NI_TASKS
    from data_prep.instructions import ALPACA_PROMPT
    from data_prep.natural_instructions import PromptConfig, encode_prompt, load_task
    from recipes.finetune import heldout_examples, load_data
    from tune.hf import load_tokenizer

    tokenizer = load_tokenizer(tiny_lm)
    train = write_rows(tmp_path / "alpaca.jsonl", ALPACA_ROWS * 4)
    data = load_data(finetune_cfg(tmp_path, tiny_lm, kind="alpaca", train=str(train), heldout_fraction=0.25), tokenizer)
    held = heldout_examples(data, cap=2)["heldout"]
    assert len(held) == 2 and len(data.heldout_records) == 3 and len(data.train_records) == 9
    for example, record in zip(held, data.heldout_records):
        f = record.fields
        assert example.references == [f["output"]] and example.group == "alpaca" and example.id == record.id
        if f["input"]:
            assert example.prompt == ALPACA_PROMPT.format(instruction=f["instruction"], input=f["input"])
    task_file = NI_TASKS / "task363_sst2_polarity_classification.json"
    if task_file.is_file():
        cfg = finetune_cfg(tmp_path, tiny_lm, train_tasks=[str(task_file)], heldout_instances_per_task=3)
        data = load_data(cfg, tokenizer)
        held = heldout_examples(data)["heldout_instances"]
        task = load_task(task_file)
        assert [(e.prompt, e.references, e.group) for e in held] == [
            (encode_prompt(task, inst.input, PromptConfig()), inst.outputs, task.name)
            for _, inst in data.splits["heldout_instances"]] and len(held) == 3


def test_a_data_key_of_the_other_kind_is_refused_not_ignored(tmp_path):
    from recipes.finetune import NIDataSection, check_data_sources
    from tune.errors import Problems

    rows = write_rows(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c"}])
    cases = [(NIDataSection(train_tasks=str(rows), train=str(rows)),
              "data.train applies to your rows (data.kind=alpaca, prompt_completion, chat or text); NI tasks are "
              "data.train_tasks / data.eval_tasks: set data.kind or drop it"),
             (NIDataSection(kind="prompt_completion", train=str(rows), eval_tasks=str(rows)),
              "data.eval_tasks names NI tasks, which data.kind=prompt_completion does not read; held-out rows come "
              "from data.eval (or data.heldout_fraction of data.train): set data.eval_tasks=null"),
             (NIDataSection(kind="chat", train=None), "data.kind=chat reads your rows from data.train (.json / .jsonl "
                                                      "/ .csv / .parquet files or a save_to_disk folder); set it "
                                                      "(README: Data formats)")]
    for section, expected in cases:
        problems = Problems()
        check_data_sources(section, problems)
        assert [str(e) for e in problems.errors] == [expected]


def test_on_policy_distillation_completes_the_prompts_of_alpaca_rows(tmp_path, tiny_lm):
    from recipes.distill import DistillConfig, run
    from tune.config import load_config

    train = write_rows(tmp_path / "alpaca.jsonl", ALPACA_ROWS * 4)
    cfg = load_config(DistillConfig, data={
        "recipe": "distill", "output_dir": str(tmp_path / "gkd"), "teacher": {"model": str(tiny_lm)},
        "student": {"preset": "tiny-gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16},
        "kd": {"alpha": 1.0, "lmbda": 1.0, "max_new_tokens": 4},
        "data": {"kind": "alpaca", "train": str(train), "max_length": 128, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "eval_every": 2,
                  "eval_batches": 1, "log_every": 1, "progress": False},
        "compare": {"ce_only": False}})
    result = run(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows if "on_policy" in r] == [1.0, 1.0]


def test_a_chat_template_is_needed_and_must_parse(tmp_path, chat_tokenizer):
    from data_prep.instructions import FormatSettings, Formatter, template_problem

    with pytest.raises(ConfigError, match=r"data.kind=chat: the tokenizer .* has no chat template; give one as "
                                          r"data.chat_template=<a .jinja file>$"):
        Formatter(FormatSettings(kind="chat"), chat_tokenizer)
    good, bad = tmp_path / "good.jinja", tmp_path / "bad.jinja"
    good.write_text(CHATML_GENERATION, encoding="utf-8")
    bad.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor", encoding="utf-8")
    assert template_problem(good) is None
    assert template_problem(bad).startswith(f"data.chat_template={bad}: not a valid Jinja template (line 2: ")


def test_evaluate_recipe_scores_chat_rows_as_finetune_prompts_them(tmp_path, tiny_lm, capsys):
    """`tune run evaluate --config eval_rows`: the first N rows of each file, prompted with the turns before the last
    reply (rendered as at training, generation prompt included), the model's greedy continuation (stopping at the
    end-of-turn token) scored against the last reply; NI-only keys and missing rows refused in one line."""
    from transformers import AutoModelForCausalLM

    from tune.cli import main
    from tune.evaluation import generate_predictions
    from tune.hf import load_tokenizer

    rows = write_rows(tmp_path / "test.jsonl", chats(5))
    other = write_rows(tmp_path / "more.jsonl", chats(3))
    common = ["--config", "eval_rows", f"model={tiny_lm}", "adapter=null", f"output_dir={tmp_path / 'eval'}",
              f"data.chat_template={PLAIN_CHAT_FILE}", "generation.max_new_tokens=4"]
    assert main(["run", "evaluate", *common, f"data.rows=[{rows},{other}]", "data.max_instances_per_task=4"]) == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["n_instances"] == 7 and {t: r["n"] for t, r in results["tasks"].items()} == {"test": 4, "more": 3}
    tokenizer = load_tokenizer(tiny_lm)
    messages = chats(5)[0]["messages"]
    prompt = "".join(f"{m['role']}:\n{m['content']}" + (tokenizer.eos_token if m["role"] == "assistant" else "") + "\n"
                     for m in messages[:-1]) + "assistant:\n"
    first = results["predictions"][0]
    assert first["references"] == [messages[-1]["content"]] and results["example_prompts"]["test"] == prompt
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    assert first["prediction"] == generate_predictions(model, tokenizer, [prompt], max_new_tokens=4,
                                                       stop_ids=[tokenizer.eos_token_id])[0]
    assert results["overall"]["mean_over_instances"]["copy_input_exact_match"] == 100.0
    capsys.readouterr()
    assert main(["run", "evaluate", *common, f"data.rows={rows}", "data.exclude_train_of=runs/x"]) == 2
    assert "data.exclude_train_of applies to Natural-Instructions tasks, which data.kind=chat" in capsys.readouterr().err
    assert main(["run", "evaluate", *common, "data.rows=null"]) == 2
    assert "data.kind=chat scores your rows from data.rows" in capsys.readouterr().err
    assert main(["run", "evaluate", *common, f"data.rows={rows}", "data.columns={messages: turns}"]) == 2
    assert f"{rows}" in capsys.readouterr().err
