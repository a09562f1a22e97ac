"""Structured output through xgrammar: grammars compiled once per distinct spec, and per sequence a matcher
whose token masks apply to the target's logits rows at verification.

Under speculation one forward scores a whole draft: row i scores the token after the output so far plus draft
tokens 0..i-1, so row i is masked with the grammar's state after those tokens (the matcher advances along the
draft filling one bitmask row per position, then rolls back). Masked tokens get -inf before temperature /
top-k / top-p, so the accepted, recovered and bonus tokens all obey the grammar, greedy and sampled, and the
processed distribution is exactly what one-token-at-a-time decoding with the grammar samples from. A draft
token the grammar forbids could never be emitted at its position (p = 0 there), so the draft ends before it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any

import torch
import xgrammar as xgr

from sampling.structured import StructuredOutput

MAX_CACHED_GRAMMARS = 256
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # xgrammar's "[time] file.cc:line: " before its message


class GrammarError(ValueError):
    """A spec the compiler refuses; the message says why in one line."""


class GrammarDeadEnd(ValueError):
    """The grammar allows no next token after the output so far (e.g. a regex `ab$c`): the request's own spec
    cannot be followed further, so the request ends as refused, not as an engine failure."""


class GrammarCompiler:
    """Compiles specs against one tokenizer and vocabulary, each distinct spec once (LRU-bounded); safe on any
    thread (the engine compiles on its input thread, never on a server's event loop)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Collection[int]):
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`; GrammarError naming the problem."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        try:
            compiled = self._compile(spec)
        except Exception as e:  # noqa: BLE001 - whatever the compiler refuses is the spec's problem (a 400)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GrammarError(_LOG_PREFIX.sub("", first)) from None
        if not self._admits_a_first_token(compiled):  # e.g. a regex no string matches: refused here, not mid-step
            raise GrammarError("no output can match it (it allows no first token)")
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _admits_a_first_token(self, compiled: xgr.CompiledGrammar) -> bool:
        return _allows_a_token(xgr.GrammarMatcher(compiled), self.vocab_size)

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        # Compact JSON (no free whitespace between tokens): a small model can otherwise emit newlines forever.
        if spec.kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "json_schema":
            return self._compiler.compile_json_schema(spec.spec, any_whitespace=False, strict_mode=spec.strict)
        if spec.kind == "regex":
            return self._compiler.compile_regex(spec.spec)
        # JSON string literals are EBNF string literals (same escapes).
        return self._compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choices))


class GrammarState:
    """One sequence's place in its grammar: the output so far has been accepted by its matcher."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, output: Sequence[int] = ()):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._row = xgr.allocate_token_bitmask(1, vocab_size)  # allowed_prefix's dead-end check, reused
        self.advance(output)

    @property
    def terminated(self) -> bool:
        """The grammar has ended (its stop token was accepted): the sequence is finished."""
        return self.matcher.is_terminated()

    def allowed_prefix(self, draft: Sequence[int]) -> tuple[int, bool]:
        """(n, forbidden): the draft's first n tokens are the ones to verify. It ends before the first token the
        grammar forbids (forbidden = True: the target gives that token p = 0), or before one after which it
        allows no token at all (the row after it would have nothing to emit; plain decoding would take that
        token and then end refused, and so does a shorter draft)."""
        accepted = 0
        for tok in draft:
            if self.matcher.is_terminated() or not self.matcher.accept_token(tok):
                self.matcher.rollback(accepted)
                return accepted, True
            accepted += 1
            if not self.matcher.is_terminated() and not _allows_a_token(self.matcher, self.vocab_size, self._row):
                self.matcher.rollback(accepted)
                return accepted - 1, False
        self.matcher.rollback(accepted)
        return accepted, False

    def mask(
        self, logits: torch.Tensor, draft: Sequence[int] = (), unprocessed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N, V] logits -> float32 logits (a new tensor) with what the grammar forbids at -inf; row i in the
        state after `draft[:i]`. Rows past a forbidden or final draft token are left as they are: no token is
        emitted there (verification stops at that token). A row the grammar and the logits controls leave
        without any token (min_tokens masking the end the grammar requires) takes the grammar's mask over
        `unprocessed` (the logits before the controls): the grammar's end outranks min_tokens."""
        x = logits.float().clone()
        bitmask = xgr.allocate_token_bitmask(x.shape[0], self.vocab_size)  # all allowed
        n = 0
        for i in range(x.shape[0]):
            if self.matcher.is_terminated():
                break
            self.matcher.fill_next_token_bitmask(bitmask, i)
            if i >= len(draft) or i == x.shape[0] - 1 or not self.matcher.accept_token(draft[i]):
                break
            n += 1
        self.matcher.rollback(n)
        xgr.apply_token_bitmask_inplace(x, bitmask, vocab_size=self.vocab_size)
        if unprocessed is not None:
            dead = ~torch.isfinite(x).any(-1)
            if bool(dead.any()):
                y = unprocessed.float().clone()
                xgr.apply_token_bitmask_inplace(y, bitmask, vocab_size=self.vocab_size)
                x[dead] = y[dead]
        if not bool(torch.isfinite(x[0]).any()):
            raise GrammarDeadEnd("no output can continue to match it after the tokens so far")
        return x

    def advance(self, tokens: Sequence[int]) -> None:
        """Accept emitted tokens (each was allowed by its row's mask)."""
        for tok in tokens:
            if self.matcher.is_terminated():
                return
            if not self.matcher.accept_token(tok):
                raise ValueError(f"token {tok} does not follow the grammar")


def _allows_a_token(matcher: xgr.GrammarMatcher, vocab_size: int, row: torch.Tensor | None = None) -> bool:
    """Whether the matcher's state allows any next token (a grammar can compile yet lead where nothing does):
    read from the bitmask's words (`row`, reused if given), the bits past the vocabulary left out."""
    row = xgr.allocate_token_bitmask(1, vocab_size) if row is None else row
    matcher.fill_next_token_bitmask(row, 0)
    full, rest = divmod(vocab_size, 32)
    if bool(row[0, :full].ne(0).any()):
        return True
    return rest > 0 and bool(int(row[0, full]) & ((1 << rest) - 1))
