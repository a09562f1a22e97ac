"""IncrementalDetokenizer against the default model's real tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from engine.detokenizer import IncrementalDetokenizer

PROMPT = "<|im_start|>user\nWrite something.<|im_end|>\n<|im_start|>assistant\n"
ASCII = "The quick brown fox jumps over the lazy dog. It's 42 degrees, isn't it?"
CODE = 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n\n\nclass Foo:\n\tx = [1,  2]\n'
MULTIBYTE = "Café naïve façade — 日本語のテキスト、中文也可以。Emoji 🎉🚀 and 👍🏽, señor Müller."


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(
    tokenizer: Any, output_ids: list[int], stop: list[str] | None = None, step: int = 1
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed `output_ids` `step` tokens at a time, then flush; return the detokenizer and all deltas."""
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT), stop=stop)
    deltas = [detok.add(output_ids[i : i + step]) for i in range(0, len(output_ids), step)]
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", [ASCII, CODE, MULTIBYTE], ids=["ascii", "code", "multibyte"])
@pytest.mark.parametrize("step", [1, 3])
def test_stream_matches_full_decode(tokenizer: Any, text: str, step: int) -> None:
    ids = encode(tokenizer, text)
    detok, deltas = stream(tokenizer, ids, step=step)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == text
    assert "".join(deltas) == detok.text == expected
    assert not any("\ufffd" in d for d in deltas)
    assert not detok.stopped


def test_multibyte_text_really_splits_characters(tokenizer: Any) -> None:
    # Otherwise the multibyte streaming test could not catch a partial character being emitted.
    assert any("\ufffd" in tokenizer.decode([i]) for i in encode(tokenizer, MULTIBYTE))


def test_special_tokens_skipped_or_kept(tokenizer: Any) -> None:
    ids = encode(tokenizer, "Hi there.") + [tokenizer.eos_token_id]
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == "Hi there."
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT), skip_special_tokens=False)
    assert detok.add(ids) + detok.flush() == "Hi there." + tokenizer.eos_token


def test_flush_emits_unfinished_character(tokenizer: Any) -> None:
    ids = encode(tokenizer, "ok 🎉")
    partial = ids[:-1]
    assert tokenizer.decode(partial).endswith("\ufffd")
    detok, deltas = stream(tokenizer, partial)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert detok.text == tokenizer.decode(partial)


def test_decodes_only_a_window(tokenizer: Any) -> None:
    class CountingTokenizer:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, **kwargs)

    counting = CountingTokenizer()
    ids = encode(tokenizer, " ".join([ASCII] * 20))
    detok = IncrementalDetokenizer(counting, encode(tokenizer, PROMPT * 20))
    text = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 200 and counting.longest <= 8


def test_stop_truncates_exactly_before_stop_string(tokenizer: Any) -> None:
    ids = encode(tokenizer, "Hello world. STOP here and more text after it.")
    detok, deltas = stream(tokenizer, ids, stop=["STOP"])
    assert detok.stopped
    assert detok.text == "".join(deltas) == "Hello world. "
    assert detok.add(encode(tokenizer, " more")) == "" and detok.flush() == ""


def test_stop_inside_a_token_and_earliest_of_several(tokenizer: Any) -> None:
    ids = encode(tokenizer, "one two three four")
    detok, _ = stream(tokenizer, ids, stop=["four", "hre"])
    assert detok.stopped and detok.text == "one two t"
    detok, _ = stream(tokenizer, ids, step=len(ids), stop=["four", "hre"])
    assert detok.stopped and detok.text == "one two t"


def test_stop_string_split_across_tokens(tokenizer: Any) -> None:
    text, stop = "Hello world, how are you?", "lo wor"
    ids = encode(tokenizer, text)
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    detok, deltas = stream(tokenizer, ids, stop=[stop])
    assert detok.stopped
    assert "".join(deltas) == detok.text == "Hel"


def test_partial_stop_is_held_back_then_released(tokenizer: Any) -> None:
    stop = ["The end!"]
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT), stop=stop)
    seen = []
    for token in encode(tokenizer, "The end is near. The end"):
        seen.append(detok.add([token]))
        assert not detok.text.endswith(("T", "The", "The end"))
    assert not detok.stopped
    assert "".join(seen) == detok.text == "The end is near. "
    assert seen[0] == ""  # "The" could start "The end!"
    assert detok.flush() == "The end"
    assert detok.text == "The end is near. The end"


def test_stop_split_across_multibyte_tokens(tokenizer: Any) -> None:
    ids = encode(tokenizer, "Party 🎉🚀 now")
    detok, deltas = stream(tokenizer, ids, stop=["🚀"])
    assert detok.stopped and detok.text == "".join(deltas) == "Party 🎉"
    assert not any("\ufffd" in d for d in deltas)
