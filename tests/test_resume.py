"""Resuming a stream elsewhere (ingress progress, replica-side text), the prompt-size bound, and the replica's
error items: exact text across any cut, no tokenization of prompts that cannot fit, no internals in errors."""

from __future__ import annotations

import pytest

from deployments.prompt_limits import max_bytes_per_token, min_tokens
from deployments.resume import Progress, ResumedText
from deployments.stream_items import DeltaItem
from engine.detokenizer import IncrementalDetokenizer
from sampling.params import SamplingParams


def test_progress_builds_the_resumed_request():
    p = Progress()
    assert not p.resumable()
    p.prompt_token_ids = [1, 2, 3]
    p.add(DeltaItem("Hel", (7, 8)))
    p.add(DeltaItem("lo", (9,)))
    original = {"messages": [{"role": "user", "content": "x"}], "params": {"max_tokens": 9}, "request_id": "r"}
    resumed = p.resume_request(original)
    assert "messages" not in resumed and resumed["params"] == {"max_tokens": 9}
    assert resumed["prompt_token_ids"] == [1, 2, 3]
    assert resumed["resume"] == {"output_token_ids": [7, 8, 9], "text": "Hello"}


def stream_text(tokenizer, prompt_ids, out_ids, params) -> tuple[list[str], bool]:
    """What one uninterrupted replica streams, one token per step."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.stop, params.skip_special_tokens)
    deltas = []
    for t in out_ids:
        deltas.append(detok.add([t]))
        if detok.stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


@pytest.mark.parametrize("stop", [[], ["\n\n"], ["é b"]])
def test_resumed_text_matches_one_run_at_every_cut(tokenizer, stop):
    prompt_ids = tokenizer("Write:")["input_ids"]
    text = "café au lait\n\nnaïve é b 漢字 🙂 end"
    out_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(stop=stop, max_tokens=64)
    whole, whole_stopped = stream_text(tokenizer, prompt_ids, out_ids, params)
    for cut in range(len(out_ids)):
        sent, _ = stream_text(tokenizer, prompt_ids, out_ids[:cut], SamplingParams(stop=stop))
        sent = "".join(sent[:cut])  # what the first replica had released before it died (no flush)
        if whole_stopped and len(sent) >= len("".join(whole)):
            continue
        resumed = ResumedText(tokenizer, prompt_ids, out_ids[:cut], sent, params)
        rest = []
        for i, t in enumerate(out_ids[cut:]):
            rest.append(resumed.add([t], finished=cut + i + 1 == len(out_ids)))
            if resumed.stopped:
                break
        assert sent + "".join(rest) == "".join(whole), cut
        assert resumed.stopped == whole_stopped


def test_prompt_bound_is_a_true_lower_bound(tokenizer):
    n = max_bytes_per_token(tokenizer)
    assert n is not None and n >= max(len(t) for t in ("<|im_start|>", "<|endoftext|>"))
    for text in ("a" * 20000, " " * 20000, "\n" * 5000, "é漢🙂" * 3000, "def f():\n    return 1\n" * 500):
        assert len(tokenizer(text)["input_ids"]) >= min_tokens(text, n)


def test_prompt_bound_is_none_when_a_normalizer_could_shrink_text(tokenizer):
    class Fake:
        class backend_tokenizer:  # noqa: N801
            @staticmethod
            def to_str():
                return (
                    '{"normalizer": {"type": "NFKC"}, "pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE"}}'
                )

    assert max_bytes_per_token(Fake()) is None
    assert max_bytes_per_token(object()) is None


def test_engine_errors_reach_the_client_without_internals():
    from deployments.ingress import item_error
    from deployments.llm_server import engine_error_item
    from engine.async_engine import EngineStepError, RequestFailed

    internals = 'engine step failed: RuntimeError: File "/home/ray/x.py", line 3, pid=77, ip=10.1.2.3'
    step = item_error(engine_error_item(EngineStepError(internals)), "r-1")
    alone = item_error(engine_error_item(RequestFailed(internals)), "r-1")
    assert (step.status_code, step.code, alone.status_code, alone.code) == (
        503,
        "engine_error",
        500,
        "request_failed",
    )
    for error in (step, alone):
        assert "/home" not in error.message and "pid" not in error.message and "\n" not in error.message
