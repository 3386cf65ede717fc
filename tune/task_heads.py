"""GPT-1's task heads: a linear layer on the final hidden state of the extract token, trained with an auxiliary
language-modelling loss (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training", 3.3).

    classification   <s> text <e>                      -> W h<e>                 -> softmax over the labels
    entailment       <s> premise <$> hypothesis <e>    -> W h<e>                 -> softmax over the labels
    similarity       <s> a <$> b <e>, <s> b <$> a <e>  -> W (h<e>(ab) + h<e>(ba)) -> softmax (or one score)
    multiple choice  <s> context <$> choice_k <e>      -> w . h<e>(k), one score per choice -> softmax over choices

The loss of an example is  L_task + lambda * L_LM  with L_LM the mean next-token cross-entropy of its sequences
(averaged over the example's sequences), as OpenAI's finetune-transformer-lm computes it; the engine averages over
the examples of a step. The data side (input transformations, truncation, label sets) is data_prep/task_data.py.

Batches (collate_task) hold N sequences for B examples: input_ids / attention_mask / lm_targets / lm_weights (N, L),
extract_index, example_index, choice_index (N,), and `targets` (B,): the class or choice index (int64), or the
score (float32, regression). The engine normalises by the number of `targets` entries, i.e. by examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune.errors import ConfigError, DataError
from tune.losses import IGNORE_INDEX, chunked_ce_sum, hidden_and_head
from tune.packing import NIBatches

KINDS = ("classification", "entailment", "similarity", "multiple_choice")
TASK_FILE = "task.json"  # kind, labels, special tokens, how to load: next to every saved task model
HEAD_FILE = "task_head.safetensors"  # the head's weight (and bias), keys "weight" / "bias"


def add_task_tokens(tokenizer, start: str, delimiter: str, extract: str) -> tuple[dict[str, int], list[str]]:
    """Register GPT-1's start / delimiter / extract tokens (and a pad token when the tokenizer has none) as special
    tokens of `tokenizer`, in place. Tokens the vocabulary already has (Llama's `<s>`) are reused.

    Returns ({"start": id, "delimiter": id, "extract": id}, the tokens that were new). Raises ConfigError when two of
    the names are equal, one is an ordinary vocabulary token (text would produce it), or the extract token is the pad
    token (the exported HF classifiers read the last non-pad token, which must be the extract token)."""
    names = {"start": start, "delimiter": delimiter, "extract": extract}
    if len(set(names.values())) < 3:
        raise ConfigError(f"task.tokens must be three different strings, got {names}")
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    for key, tok in names.items():
        if tok in vocab and tok not in special:
            raise ConfigError(f"task.tokens.{key}={tok!r} is an ordinary token of the tokenizer's vocabulary (text uses "
                              "it); choose a string the vocabulary does not have, e.g. the default <s>, <$>, <e>")
    new = [t for t in names.values() if t not in vocab]
    extra = {"extra_special_tokens": new} if new else {}
    if tokenizer.pad_token is None:
        extra["pad_token"] = "<pad>"
        if "<pad>" not in vocab:
            new.append("<pad>")
    if extra:
        tokenizer.add_special_tokens(extra, replace_extra_special_tokens=False)
    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in names.items()}
    if ids["extract"] == tokenizer.pad_token_id:
        raise ConfigError(f"task.tokens.extract={extract!r} is the tokenizer's pad token; the exported classifier reads "
                          "the last non-pad token: choose another extract token or pad_token")
    return ids, new


def resize_embeddings(lm: nn.Module, vocab_size: int) -> int:
    """Grow the input (and an untied output) embedding of the HF causal LM `lm` to `vocab_size` rows; every new row is
    the mean of the existing rows (Hewitt 2021: new tokens start where the model's average token is, and the same
    every time, so a LoRA adapter reloads onto exactly the rows it was trained from). Returns the rows added."""
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    old = inner.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return 0
    inner.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m): m for m in (inner.get_input_embeddings(), inner.get_output_embeddings()) if m is not None}.values():
            emb.weight[old:] = emb.weight[:old].float().mean(0).to(emb.weight.dtype)
    return vocab_size - old


class TaskHeadModel(nn.Module):
    """A causal LM (HF, peft-wrapped or 4-bit) with GPT-1's task head: Dropout(p) then Linear(d_model, n_outputs) on
    the final hidden state of each sequence's extract token. n_outputs: the labels (1 for regression); multiple
    choice always 1 (a score per choice). The head has no bias except for multiple choice, as GPT-1's W_y and HF's
    *ForSequenceClassification `score` (so the export is exact); multiple choice keeps HF DoubleHeads' bias."""

    def __init__(self, lm: nn.Module, kind: str, n_outputs: int, dropout: float = 0.1):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"task.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.lm, self.kind = lm, kind
        d_model = _hidden_size(lm)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, 1 if kind == "multiple_choice" else n_outputs, bias=kind == "multiple_choice")
        nn.init.normal_(self.head.weight, std=0.02)  # GPT-1's initialisation
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        self.head.to(_first_float_dtype(lm))
        inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self._no_split_modules = list(getattr(inner, "_no_split_modules", None) or [])  # FSDP wrap, compile_blocks

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        from tune.hf import enable_activation_checkpointing

        enable_activation_checkpointing(self.lm)

    def forward(self, batch: dict, with_lm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, n_outputs) — (B, C) over the choices for multiple choice, -inf where an example has fewer
        choices —, the summed per-example LM loss (fp32 scalar) or None without `with_lm`)."""
        hidden, lm_head = hidden_and_head(self.lm, {"input_ids": batch["input_ids"],
                                                    "attention_mask": batch["attention_mask"]})
        n = hidden.shape[0]
        h = hidden[torch.arange(n, device=hidden.device), batch["extract_index"]]  # (N, d)
        n_examples = batch["targets"].shape[0]
        if self.kind == "similarity":  # sequences come in (a$b, b$a) pairs: their states are added
            h = h.view(n_examples, 2, -1).sum(1)
        out = self.head(self.dropout(h.to(self.head.weight.dtype)))
        if self.kind == "multiple_choice":
            n_choices = int(batch["choice_index"].max()) + 1
            logits = out.new_full((n_examples, n_choices), float("-inf"))
            logits[batch["example_index"], batch["choice_index"]] = out[:, 0]
            out = logits
        lm_sum = None
        if with_lm:
            lm_sum, _ = chunked_ce_sum(hidden, lm_head, batch["lm_targets"], weights=batch["lm_weights"])
        return out, lm_sum


def _hidden_size(lm: nn.Module) -> int:
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return inner.get_input_embeddings().weight.shape[1]


def _first_float_dtype(lm: nn.Module) -> torch.dtype:
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return inner.get_input_embeddings().weight.dtype


def task_loss_fn(lm_coef: float, regression: bool):
    """The engine's loss function for a TaskHeadModel: (summed loss, number of examples, extras).

    Per example: cross-entropy of the label (regression: squared error of the score) + lm_coef * the example's LM
    loss (mean over its sequences of the mean next-token cross-entropy), GPT-1's L3 = L2 + lambda * L1. lm_coef=0
    skips the LM forward part entirely: the loss is then exactly the task loss. Extras (summed; the engine reports
    their per-example means): task_loss, lm_loss, accuracy (not for regression), and in eval mode the sums that
    val_metrics turns into macro-F1 / Pearson."""

    def loss_fn(model: nn.Module, batch: dict):
        logits, lm_sum = model(batch, with_lm=lm_coef > 0)
        y = batch["targets"]
        if regression:
            task = F.mse_loss(logits[:, 0].float(), y.float(), reduction="sum")
        else:
            task = F.cross_entropy(logits.float(), y, reduction="sum")
        extras = {"task_loss": task.detach()}
        loss = task
        if lm_sum is not None:
            loss = task + lm_coef * lm_sum
            extras["lm_loss"] = lm_sum.detach()
        if not regression:
            extras["accuracy"] = (logits.argmax(-1) == y).sum().float()
        if not model.training:  # evaluation: the sums val_metrics turns into macro-F1 / Pearson
            extras.update(_eval_sums(logits.detach(), y, regression, model.kind))
        return loss, torch.tensor(y.shape[0], device=y.device), extras

    return loss_fn


def _eval_sums(logits: torch.Tensor, y: torch.Tensor, regression: bool, kind: str) -> dict[str, torch.Tensor]:
    """Per-class true / false positives and false negatives (classification, entailment, similarity), or the moment
    sums of (prediction, target) (regression), summed over the batch; none for multiple choice."""
    if regression:
        x, t = logits[:, 0].float(), y.float()
        return {"m_x": x.sum(), "m_y": t.sum(), "m_xx": (x * x).sum(), "m_yy": (t * t).sum(), "m_xy": (x * t).sum()}
    if kind == "multiple_choice":
        return {}
    pred = logits.argmax(-1)
    sums = {}
    for c in range(logits.shape[1]):
        hit, true = pred == c, y == c
        sums.update({f"tp_{c}": (hit & true).sum().float(), f"fp_{c}": (hit & ~true).sum().float(),
                     f"fn_{c}": (~hit & true).sum().float()})
    return sums


def val_metrics(means: dict[str, float]) -> dict[str, float]:
    """The engine's validation extras (per-example means of the sums task_loss_fn returns) with the per-class counts
    turned into macro_f1 (the mean over classes with a true or predicted example of 2TP / (2TP + FP + FN): ratios of
    means equal ratios of sums) and the moments into pearson (regression). Fractions in [0, 1] (-1..1 for pearson)."""
    out = {k: v for k, v in means.items() if not k.startswith(("tp_", "fp_", "fn_", "m_"))}
    classes = sorted({int(k[3:]) for k in means if k.startswith("tp_")})
    f1 = [2 * means[f"tp_{c}"] / d for c in classes
          if (d := 2 * means[f"tp_{c}"] + means[f"fp_{c}"] + means[f"fn_{c}"]) > 0]
    if f1:
        out["macro_f1"] = sum(f1) / len(f1)
    if "m_xy" in means:
        cov = means["m_xy"] - means["m_x"] * means["m_y"]
        var = (means["m_xx"] - means["m_x"] ** 2) * (means["m_yy"] - means["m_y"] ** 2)
        out["pearson"] = cov / math.sqrt(var) if var > 0 else float("nan")
    return out


def collate_task(examples, kind: str, pad_id: int, regression: bool = False) -> dict:
    """One batch from encoded examples (data_prep.task_data.EncodedExample: `sequences`, `target`).

    Right-padded to the longest sequence. lm_targets[n, t] = input_ids[n, t + 1] over the sequence (every token after
    the start token, the delimiter and extract tokens included, as GPT-1's L1 over the transformed input), and
    lm_weights = 1 / (the sequence's targets x the example's sequences), so summing weighted token losses gives the
    per-example mean of per-sequence means."""
    sequences, example_index, choice_index, lm_weights = [], [], [], []
    for b, ex in enumerate(examples):
        expected = 2 if kind == "similarity" else 1 if kind != "multiple_choice" else None
        if expected is not None and len(ex.sequences) != expected:
            raise DataError(f"a {kind} example has {len(ex.sequences)} sequences, expected {expected}")
        for c, seq in enumerate(ex.sequences):
            sequences.append(seq)
            example_index.append(b)
            choice_index.append(c)
            lm_weights.append(1.0 / (max(len(seq) - 1, 1) * len(ex.sequences)))
    width = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    lm_targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((n, width), dtype=torch.float32)
    for i, seq in enumerate(sequences):
        ids = torch.as_tensor(seq, dtype=torch.long)
        input_ids[i, :len(seq)] = ids
        attention_mask[i, :len(seq)] = 1
        lm_targets[i, :len(seq) - 1] = ids[1:]
        weights[i, :len(seq) - 1] = lm_weights[i]
    targets = torch.tensor([ex.target for ex in examples], dtype=torch.float32 if regression else torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "lm_targets": lm_targets, "lm_weights": weights,
            "extract_index": torch.tensor([len(s) - 1 for s in sequences]),
            "example_index": torch.tensor(example_index), "choice_index": torch.tensor(choice_index),
            "targets": targets}


class TaskBatches(NIBatches):
    """Engine BatchSource over encoded examples: tune.packing.NIBatches' order (a pure function of (seed, step): epoch
    e a permutation of the examples seeded by (seed, e), cut into global batches of micro_batch_size *
    grad_accum_steps * world examples), one example per unit, each micro-batch built by collate_task."""

    def __init__(self, train, val, micro_batch_size: int, grad_accum_steps: int, seed: int, pad_id: int, kind: str,
                 regression: bool = False):
        if not train:
            raise DataError("the training set is empty; check data.train (or data.ni_task)")
        super().__init__(train, val, micro_batch_size, grad_accum_steps, seed, packing=False, max_length=0,
                         pad_id=pad_id)
        self.kind, self.regression = kind, regression

    def _collate(self, examples, units) -> dict:
        return collate_task([examples[int(i)] for unit in units for i in unit], self.kind, self.pad_id, self.regression)


@torch.no_grad()
def predict(model: TaskHeadModel, examples, pad_id: int, regression: bool, batch_size: int = 16,
            device=None) -> torch.Tensor:
    """Class probabilities (E, K) — over the choices for multiple choice, padded with 0 — or scores (E,) for
    regression, for encoded examples, in order, with the model in eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    outs = []
    for start in range(0, len(examples), batch_size):
        batch = collate_task(examples[start:start + batch_size], model.kind, pad_id, regression)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, _ = model(batch, with_lm=False)
        outs.append(logits[:, 0].float().cpu() if regression else logits.float().softmax(-1).cpu())
    model.train(was_training)
    if regression:
        return torch.cat(outs)
    width = max(o.shape[1] for o in outs)
    return torch.cat([F.pad(o, (0, width - o.shape[1])) for o in outs])


# -- saving, loading, HF export --------------------------------------------------------------------------------

def save_head(model: TaskHeadModel, out: Path, meta: dict) -> None:
    """The head's weights (HEAD_FILE) and the task description (TASK_FILE) into `out`."""
    from safetensors.torch import save_file

    tensors = {"weight": model.head.weight.detach().float().cpu().contiguous()}
    if model.head.bias is not None:
        tensors["bias"] = model.head.bias.detach().float().cpu().contiguous()
    save_file(tensors, str(Path(out) / HEAD_FILE))
    (Path(out) / TASK_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


# where the head lives inside an HF class export (export_hf): our weight / bias under these keys
HF_HEAD_KEYS = {"weight": ("score.weight", "multiple_choice_head.summary.weight"),
                "bias": ("multiple_choice_head.summary.bias",)}


def load_head(model: TaskHeadModel, directory: Path) -> None:
    """The head's weights from HEAD_FILE in `directory`, or from the weights of an HF class export (its `score` /
    `multiple_choice_head.summary`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / HEAD_FILE).is_file():
        tensors = load_file(str(directory / HEAD_FILE))
    else:
        tensors = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for ours, theirs in HF_HEAD_KEYS.items():
                    for key in theirs:
                        if key in f.keys():
                            tensors[ours] = f.get_tensor(key)
        if "weight" not in tensors:
            raise DataError(f"{directory} holds neither {HEAD_FILE} nor an HF classifier head (score.weight); "
                            "give the model/ or adapter/ directory of a `tune run classify` run")
    with torch.no_grad():
        model.head.weight.copy_(tensors["weight"])
        if model.head.bias is not None:
            model.head.bias.copy_(tensors["bias"])


def read_task_meta(directory) -> dict:
    """TASK_FILE of a saved task model; DataError naming the directory when it is missing or unreadable."""
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise DataError(f"{directory} holds no {TASK_FILE}: give the model/ or adapter/ directory a "
                        "`tune run classify` run saved (or the run directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read ({e}); the run's saved model is damaged") from None


def task_model_dir(path) -> Path:
    """`path` itself when it holds TASK_FILE, else its model/ or adapter/ that does (a run directory), else `path`
    (read_task_meta then names what is missing)."""
    path = Path(path)
    for candidate in (path, path / "model", path / "adapter"):
        if (candidate / TASK_FILE).is_file():
            return candidate
    return path


def load_task_model(directory, device=None, dtype: str = "auto", base_model=None):
    """(TaskHeadModel in eval mode, tokenizer, meta) from a saved task model: a full model directory (causal LM +
    head) or a LoRA / QLoRA adapter directory (its base is read from the path the run recorded; QLoRA: loaded in
    4 bits as trained; `base_model` overrides that path), or the run's hf/ export (an HF classifier: its backbone is read as the causal LM, the head
    from its `score`). A run directory is accepted too (its model/ or adapter/)."""
    from transformers import AutoModelForCausalLM

    from tune.hf import load_tokenizer, quiet_third_party, resolve_dtype

    directory = task_model_dir(directory)
    meta = read_task_meta(directory)
    tokenizer = load_tokenizer(directory, "model", pad_with_eos=False)
    torch_dtype = resolve_dtype(dtype)
    with quiet_third_party():
        if meta["format"] == "peft_adapter":
            from peft import PeftModel

            base_path = Path(base_model or meta["base_model"])
            if not (base_path / "config.json").is_file():
                raise DataError(f"{directory} is a LoRA adapter of the base {base_path}, which "
                                f"{'does not exist' if not base_path.exists() else 'holds no config.json'}; give the "
                                "base's directory (tune predict --base DIR)")
            meta = {**meta, "base_model": str(base_path)}
            from tune.adapters import attention_implementation, load_base_model
            from tune.train_config import QuantSection
            # loaded as the run loaded it to train (QLoRA: the same 4-bit weights, on the training kernel)
            method = "qlora" if meta.get("qlora") else "lora"
            base = load_base_model(base_path, method, torch_dtype, QuantSection(**meta.get("qlora", {})),
                                   attn_implementation=attention_implementation(base_path)[0])
            resize_embeddings(base, len(tokenizer))
            lm = PeftModel.from_pretrained(base, directory)
        else:
            lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, trust_remote_code=False)
    model = TaskHeadModel(lm, meta["kind"], meta["n_outputs"], dropout=0.0)
    load_head(model, directory)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, meta


def with_template(tokenizer, meta: dict):
    """A copy of `tokenizer` whose encoding of one text is `<s> text <e>` and of a pair `<s> a <$> b <e>` (a tokenizers
    TemplateProcessing post-processor, saved with it), so plain transformers use (pipeline("text-classification"),
    tokenizer(premise, hypothesis)) feeds the exported model GPT-1's transformation. The original is unchanged: the
    recipe builds sequences from ids. Tokenizers without a Rust backend are returned as they are."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    names, ids = meta.get("tokens"), meta.get("token_ids")
    if backend is None or not names or not ids:
        return tokenizer
    s, d, e = names["start"], names["delimiter"], names["extract"]
    backend.post_processor = TemplateProcessing(
        single=f"{s} $A {e}", pair=f"{s} $A {d} $B:0 {e}",
        special_tokens=[(s, ids["start"]), (d, ids["delimiter"]), (e, ids["extract"])])
    return tokenizer


def export_hf(model: TaskHeadModel, lm_full: nn.Module, tokenizer, meta: dict, out) -> tuple[Path, str]:
    """A standard HF checkpoint of the task model in `out`, loadable by plain transformers, and the class it holds.

    `lm_full` is the trained causal LM as plain full-precision weights (for LoRA / QLoRA: merged). Classification /
    entailment (and regression): <Arch>ForSequenceClassification (its `score` is our head; it reads the last non-pad
    token, which the transformation makes the extract token). Multiple choice on GPT-2 / OpenAIGPT:
    <Arch>DoubleHeadsModel (its multiple_choice_head reads the positions given as mc_token_ids). Where transformers
    has no class (similarity's summed orders, multiple choice on other architectures): the causal LM plus HEAD_FILE,
    to load with load_task_model or the few lines in the README. TASK_FILE and the tokenizer go along in every case,
    the tokenizer with GPT-1's transformation as its template (with_template).
    """
    import copy

    import transformers

    from tune.hf import quiet_third_party

    out = Path(out)
    config = copy.deepcopy(lm_full.config)
    arch = type(lm_full).__name__.removesuffix("LMHeadModel").removesuffix("ForCausalLM")
    hf_class = None
    if model.kind in ("classification", "entailment"):
        hf_class = getattr(transformers, f"{arch}ForSequenceClassification", None)
        labels = meta.get("labels") or ["score"]
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        config.problem_type = "regression" if meta.get("regression") else "single_label_classification"
        config.pad_token_id = tokenizer.pad_token_id
    elif model.kind == "multiple_choice" and arch in ("GPT2", "OpenAIGPT"):
        hf_class = getattr(transformers, f"{arch}DoubleHeadsModel")
        config.num_labels = 1
        config.summary_type, config.summary_use_proj, config.summary_proj_to_labels = "cls_index", True, True
        config.summary_activation, config.summary_first_dropout = None, 0.0
    with quiet_third_party():
        if hf_class is None:
            lm_full.save_pretrained(out, safe_serialization=True)
            save_head(model, out, {**meta, "format": "causal_lm"})
            with_template(tokenizer, meta).save_pretrained(out)
            return out, type(lm_full).__name__ + f" + {HEAD_FILE}"
        exported = hf_class(config)
        prefix = exported.base_model_prefix
        getattr(exported, prefix).load_state_dict(getattr(lm_full, prefix).state_dict())
        head = model.head
        with torch.no_grad():
            if model.kind == "multiple_choice":
                exported.lm_head.weight.copy_(lm_full.get_output_embeddings().weight)
                exported.multiple_choice_head.summary.weight.copy_(head.weight)
                exported.multiple_choice_head.summary.bias.copy_(head.bias)
            else:
                exported.score.weight.copy_(head.weight)
        exported.to(next(lm_full.parameters()).dtype)
        exported.save_pretrained(out, safe_serialization=True)
    with_template(tokenizer, meta).save_pretrained(out)
    (out / TASK_FILE).write_text(json.dumps({**meta, "format": hf_class.__name__}, indent=2, ensure_ascii=False),
                                 encoding="utf-8")
    return out, hf_class.__name__
