"""The engine's logprobs (token ids) as the text the API reports: each token's exact UTF-8 bytes and the string
they decode to (a token that holds part of a character decodes to U+FFFD, as in other servers). Made on the
replica, which has the tokenizer; the ingress only lays them out."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from deployments.stream_items import LogprobEntry
from sampling.logprobs import TokenLogprob

LOGPROB_FLOOR = -9999.0  # -inf is no JSON number: a token the model rules out reads as this (vLLM's floor)


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (printable bytes stand for themselves, the rest are
    shifted to 256 + n), as byte-level BPE tokenizers spell their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes)}


class TokenTexts:
    """Token id -> (text, bytes), remembered per id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self._known: dict[int, tuple[str, tuple[int, ...]]] = {}

    def text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        known = self._known.get(token_id)
        if known is None:
            known = self._known[token_id] = self._spell(token_id)
        return known

    def _spell(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_level_decoder()
        if isinstance(piece, str) and piece and all(ch in decoder for ch in piece) and token_id not in self._special:
            raw = bytes(decoder[ch] for ch in piece)
        else:  # special tokens, and tokenizers that do not spell tokens in bytes (SentencePiece)
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), tuple(raw)

    def entry(self, token_id: int, logprob: float | None, top: tuple[LogprobEntry, ...] = ()) -> LogprobEntry:
        text, raw = self.text(token_id)
        return LogprobEntry(text, raw, None if logprob is None else max(logprob, LOGPROB_FLOOR), top)

    def entries(self, logprobs: list[TokenLogprob]) -> tuple[LogprobEntry, ...]:
        return tuple(self.entry(lp.token_id, lp.logprob, tuple(self.entry(t, v) for t, v in lp.top)) for lp in logprobs)

    def prompt_entries(self, prompt_token_ids: list[int] | tuple[int, ...], logprobs: list[TokenLogprob]):
        """The prompt's entries: its first token unscored, then one per scored token."""
        first = (self.entry(prompt_token_ids[0], None),) if prompt_token_ids else ()
        return first + self.entries(logprobs)
