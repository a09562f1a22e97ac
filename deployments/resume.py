"""Resuming a request on another replica after its replica died, from the tokens already streamed.

The engine can recompute a sequence from its prompt and output tokens, so the ingress keeps, per request, the
prompt's token ids (sent by the replica in its first item) and the output tokens and text it has relayed.
A resumed request is the prompt + output so far as token ids, the rest of the token budget, and the text the
client already has. The new replica decodes the output tokens again with the request's stop strings
(`ResumedText`), so text the first replica held back (a possible start of a stop string, half a UTF-8
character) is not lost and a stop string that spans the cut still stops the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments.stream_items import DeltaItem
from engine.detokenizer import IncrementalDetokenizer


@dataclass
class Progress:
    """What the ingress has relayed of one request (ingress side)."""

    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    resumes: int = 0

    def add(self, item: DeltaItem) -> None:
        self.output_token_ids.extend(item.token_ids)
        self.text.append(item.text)

    def resumable(self) -> bool:
        return self.prompt_token_ids is not None

    def resume_request(self, original: dict[str, Any]) -> dict[str, Any]:
        """The engine request that continues `original` where the relayed stream stopped."""
        request = {k: v for k, v in original.items() if k not in ("prompt", "messages")}
        request["prompt_token_ids"] = list(self.prompt_token_ids or ())
        request["resume"] = {"output_token_ids": list(self.output_token_ids), "text": "".join(self.text)}
        return request


class ResumedText:
    """Replica side: the text of a resumed request's new tokens, as one uninterrupted run would have streamed
    it. The engine runs the resumed request without stop strings; `stopped` tells when one was reached."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], output_token_ids: list[int], sent: str, params):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens)
        replayed = self._detok.add(list(output_token_ids))
        self._skip = max(0, len(sent) - len(replayed))  # text already sent that is still to come (rare)
        self._held = replayed[len(sent) :]  # text the first replica had not released yet

    @property
    def stopped(self) -> bool:
        return self._detok.stopped

    def add(self, new_token_ids: list[int], finished: bool) -> str:
        text = self._held + self._detok.add(list(new_token_ids))
        self._held = ""
        if finished or self._detok.stopped:
            text += self._detok.flush()
        if self._skip:
            cut = min(self._skip, len(text))
            text, self._skip = text[cut:], self._skip - cut
        return text
