"""Sampling (temperature, top-k, top-p) and UTF-8-safe streaming of decoded text."""

from __future__ import annotations

import torch


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from (B, V) logits. temperature 0 means greedy. Returns (B, 1) ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


class TextStreamer:
    """Turns a growing list of token ids into text pieces, never emitting half a UTF-8 character.

    Byte-level BPE can split one character over several tokens; decoding those tokens one by one
    would print U+FFFD. We decode everything so far and hold back a trailing replacement character
    until the next token completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def put(self, token_ids) -> str:
        self.ids.extend(int(t) for t in token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        stable = len(text.rstrip("\ufffd"))
        piece, self.emitted = text[self.emitted:stable], max(self.emitted, stable)
        return piece

    def end(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def _hf_cache_argument(model) -> str:
    """The name under which the HF model takes and returns its KV cache: `cache` from transformers 5.2x on,
    `past_key_values` before."""
    import inspect

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _is_native(model) -> bool:
    return hasattr(model, "hidden_states") and hasattr(model, "output_embeddings")


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], max_new_tokens: int | list[int], temperature: float = 1.0,
                       eos_token_id: int | None = None, pad_token_id: int = 0, generator: torch.Generator | None = None,
                       top_p: float | None = None, vocab_size: int | None = None,
                       synced: bool = False) -> list[list[int]]:
    """Batched sampling with a KV cache from the native GPT or any HF causal LM (peft-wrapped too).

    prompts: B token-id lists (any lengths >= 1), left-padded internally with an attention mask and per-row
    position ids; max_new_tokens: one budget for all rows or one per row (0 allowed). Returns, per prompt, the new
    tokens up to and including the first `eos_token_id`, at most its budget. temperature 0 is greedy; `generator`
    (on the model's device) makes the samples a function of its seed alone, leaving torch's global RNG untouched;
    `vocab_size` ignores logits past the tokenizer's ids (padded embedding tables). The model runs as given (the
    caller puts it in eval mode). `synced`: run all max(budgets) steps even when every row has finished, so
    processes sharing sharded weights (FSDP) make the same number of forward calls. Models without a KV cache
    (GPT-1 in transformers 5) re-run the whole sequence each step.
    """
    device = next(model.parameters()).device
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_completions needs one budget per prompt and non-empty prompts")
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_token_id, dtype=torch.long)
    real = torch.zeros((B, P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
        real[i, P - len(p):] = True
    ids, real = ids.to(device), real.to(device)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    budget = torch.as_tensor(budgets, device=device)
    native = _is_native(model)
    cache = [[None, None] for _ in model.blocks] if native else None
    cache_key = None if native else _hf_cache_argument(model)
    out = [[] for _ in range(B)]
    done = budget <= 0
    max_position = model.config.block_size - 1 if native else None
    step_ids, step_pos, past = ids, positions, None
    for step in range(int(budget.max()) if B else 0):
        if native:
            T, S = step_ids.shape[1], real.shape[1]
            keys, queries = torch.arange(S, device=device), torch.arange(S - T, S, device=device)
            # causal over the real keys; a left-padding query sees itself (no row of the mask may be empty)
            mask = (real[:, None, :] & (keys <= queries[:, None])) | (keys == queries[:, None])
            hidden = model.hidden_states(step_ids, position_ids=step_pos.clamp(max=max_position),
                                         attention_mask=mask[:, None], kv_cache=cache)
            logits = model.output_embeddings()(hidden[:, -1])
        else:
            result = model(input_ids=step_ids, attention_mask=real.long(), position_ids=step_pos, use_cache=True,
                           **{cache_key: past})
            past = getattr(result, cache_key, None)
            logits = result.logits[:, -1]
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        token = sample_next_token(logits, temperature, top_p=top_p, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(token[i]))
        finished = torch.as_tensor([len(o) for o in out], device=device) >= budget
        if eos_token_id is not None:
            finished |= token == eos_token_id
        new_real = ~done
        done = done | finished
        if bool(done.all()) and not synced:
            break
        ids, real = torch.cat([ids, token[:, None]], 1), torch.cat([real, new_real[:, None]], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        if native or past is not None:
            step_ids, step_pos = token[:, None], positions[:, -1:]
        else:
            step_ids, step_pos = ids, positions
    return out
