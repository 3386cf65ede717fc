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
