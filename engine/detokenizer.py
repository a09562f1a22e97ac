"""Incremental detokenization: token ids in, streamed text out, UTF-8 safe and stop-string aware.

Not tokenizers' `DecodeStream`: it cannot flush an unfinished last character and takes only a Rust tokenizer.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded as left context, so the first output token decodes as it would in the full text.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Uses the prefix/read offset technique: only a short window of tokens is decoded per call, and text is
    released only when it does not end in U+FFFD (a multi-byte character still split across tokens).
    Text that could be the start of a stop string is held back until it is known not to be one; when a
    stop string appears, the output is cut right before it and `stopped` is set.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop: list[str] = [s for s in (stop or []) if s]
        self.text = ""
        self.stopped = False
        # Decode window: tokens[:read] were already turned into text (read as `prefix_text`), the rest not.
        self._tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._read = len(self._tokens)
        self._prefix_text = self._decode(self._tokens)
        self._pending = ""  # decoded output text not yet emitted (possible start of a stop string)

    def add(self, new_token_ids: list[int]) -> str:
        """Append output tokens; return the newly visible text (possibly empty)."""
        if self.stopped:
            return ""
        self._tokens.extend(new_token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: emit held-back text (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(final=True)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self, final: bool) -> str:
        if self._read < len(self._tokens):
            new_text = self._decode(self._tokens)
            if len(new_text) > len(self._prefix_text) and (final or not new_text.endswith(_REPLACEMENT)):
                self._pending += new_text[len(self._prefix_text) :]
                del self._tokens[: self._read]  # the window now starts at the old read offset
                self._read = len(self._tokens)
                self._prefix_text = self._decode(self._tokens)
        return self._emit(final)

    def _emit(self, final: bool) -> str:
        """Move pending text to `text`, stopping at a stop string and holding back a possible one."""
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif final:
            end = len(self._pending)
        else:
            end = len(self._pending) - self._partial_stop_len()
        delta, self._pending = self._pending[:end], self._pending[end:]
        if self.stopped:
            self._pending = ""
        self.text += delta
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop), default=1) - 1
        for k in range(min(longest, len(self._pending)), 0, -1):
            tail = self._pending[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
