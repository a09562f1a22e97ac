"""Prompt files: the JSONL formats, their errors, and the HumanEval / ShareGPT converters."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from cli.prompts import PromptSpec, humaneval_to_jsonl, load_prompts, sharegpt_to_jsonl

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.jsonl.gz"

LINES = [
    {"prompt": "Once upon a time"},
    {
        "id": "chat-1",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    },
    {"turns": ["First question", "Follow-up that is ignored"], "id": 7},
]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_three_formats_ids_and_blank_lines(tmp_path: Path) -> None:
    lines = [json.dumps(LINES[0]), "", "   ", json.dumps(LINES[1]), json.dumps(LINES[2])]
    specs = load_prompts(write(tmp_path / "p.jsonl", lines))
    assert specs == [
        PromptSpec("0", "Once upon a time", None),
        PromptSpec("chat-1", None, LINES[1]["messages"]),
        PromptSpec("7", None, [{"role": "user", "content": "First question"}]),
    ]


def test_default_id_is_line_index(tmp_path: Path) -> None:
    lines = ["", json.dumps({"prompt": "a"}), json.dumps({"prompt": "b"})]
    assert [s.id for s in load_prompts(write(tmp_path / "p.jsonl", lines))] == ["1", "2"]


def test_limit(tmp_path: Path) -> None:
    # The bad last line is never read.
    path = write(tmp_path / "p.jsonl", [json.dumps(line) for line in LINES] + ["not json"])
    assert [s.id for s in load_prompts(path, limit=2)] == ["0", "chat-1"]
    assert load_prompts(path, limit=0) == []
    with pytest.raises(ValueError):
        load_prompts(path)


def test_gzip(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in LINES))
    assert load_prompts(path) == load_prompts(write(tmp_path / "p.jsonl", [json.dumps(x) for x in LINES]))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "unterminated', "invalid JSON"),
        ('["prompt", "x"]', "expected a JSON object, got list"),
        ('{"id": "x"}', "found none"),
        ('{"prompt": "a", "turns": ["b"]}', "found 'prompt', 'turns'"),
        ('{"prompt": 3}', "'prompt' must be a string, got int"),
        ('{"prompt": "a", "id": [1]}', "'id' must be a string or integer"),
        ('{"messages": "hi"}', "'messages' must be a list, got str"),
        ('{"messages": []}', "'messages' is empty"),
        ('{"messages": ["hi"]}', "message 0 must be an object"),
        ('{"messages": [{"content": "hi"}]}', "message 0 has no 'role'"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}', "message 1 has no 'content'"),
        ('{"messages": [{"role": "user", "content": null}]}', "message 0 'content' must be a string"),
        ('{"turns": []}', "'turns' is empty"),
        ('{"turns": "hi"}', "'turns' must be a list"),
        ('{"turns": [1]}', "turn 0 must be a string"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), "", line])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and message in text
    assert "\n" not in text


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_prompts(path)


def test_humaneval_conversion(tmp_path: Path) -> None:
    if not HUMANEVAL.is_file():
        pytest.skip(f"{HUMANEVAL} not present")
    dst = tmp_path / "humaneval.jsonl"
    assert humaneval_to_jsonl(HUMANEVAL, dst) == 164
    specs = load_prompts(dst)
    assert len(specs) == 164 and len({s.id for s in specs}) == 164
    assert all(s.prompt is None and s.messages and len(s.messages) == 1 for s in specs)
    first = specs[0]
    assert first.id == "HumanEval/0"
    content = first.messages[0]["content"]
    assert first.messages[0]["role"] == "user"
    assert content.startswith("Complete the following Python function:\n\n```python\nfrom typing import List")
    assert content.endswith('"""\n```')


def test_sharegpt_conversion(tmp_path: Path) -> None:
    dst = tmp_path / "sharegpt16.jsonl"
    assert sharegpt_to_jsonl(dst, 16) == 16
    specs = load_prompts(dst)
    assert len(specs) == 16 and len({s.id for s in specs}) == 16
    assert all(s.messages and s.messages[0]["role"] == "user" and s.messages[0]["content"].strip() for s in specs)
    assert all(len(json.loads(line)["turns"]) == 1 for line in dst.read_text(encoding="utf-8").splitlines())


def test_sharegpt_falls_back_to_multi_turn(tmp_path: Path) -> None:
    def conv(cid: str, *turns: tuple[str, str]) -> dict:
        return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}

    data = [
        conv("multi", ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")),
        conv("gpt-first", ("gpt", "hello"), ("human", "q")),
        conv("empty", ("human", "  "), ("gpt", "a")),
        conv("single", ("human", "only"), ("gpt", "a")),
    ]
    src = tmp_path / "sharegpt.json"
    src.write_text(json.dumps(data)[:-1] + ', {"id": "cut", "conv', encoding="utf-8")  # truncated file
    dst = tmp_path / "out.jsonl"
    assert sharegpt_to_jsonl(dst, 1, src=src) == 1
    assert [s.id for s in load_prompts(dst)] == ["single"]
    assert sharegpt_to_jsonl(dst, 5, src=src) == 2
    lines = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"id": "single", "turns": ["only"]}, {"id": "multi", "turns": ["q1"]}]
    assert sharegpt_to_jsonl(dst, 5, src=src, max_chars=3) == 1  # "only" (4 characters) is too long
    assert [s.id for s in load_prompts(dst)] == ["multi"]
