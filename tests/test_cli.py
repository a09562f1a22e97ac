"""The CLI: `specserve bench` JSON for both engines, `generate` streaming, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli.main import main


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    lines = [
        {"id": "raw", "prompt": "def fib(n):\n"},
        {"messages": [{"role": "user", "content": "Name a planet."}]},
        {"id": "turns", "turns": ["What is 2 + 2?", "And 3 + 3?"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("engine", ["specserve", "hf"])
def test_bench_writes_requests_and_summary(prompt_file, tmp_path, capsys, engine):
    out = tmp_path / "r.json"
    argv = ["bench", "--prompts", str(prompt_file), "--max-tokens", "6", "--engine", engine, "--json", str(out)]
    if engine == "specserve":
        argv += ["--speculator", "ngram", "--concurrency", "2"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(out.read_text())
    assert [r["id"] for r in report["requests"]] == ["raw", "1", "turns"]
    for r in report["requests"]:
        assert set(r) >= {
            "id",
            "prompt_token_ids",
            "output_token_ids",
            "text",
            "ttft_s",
            "latency_s",
            "drafted",
            "accepted",
        }
        assert 1 <= len(r["output_token_ids"]) <= 6 and r["latency_s"] >= r["ttft_s"] > 0
    s = report["summary"]
    assert s["output_tokens"] == sum(len(r["output_token_ids"]) for r in report["requests"])
    assert s["output_tokens_per_s"] == pytest.approx(s["output_tokens"] / s["wall_s"], rel=0.01)
    assert {"acceptance_rate", "mean_accepted_per_step"} <= set(s) and printed["output_tokens"] == s["output_tokens"]


def test_bench_and_hf_agree_on_greedy_tokens(prompt_file, tmp_path):
    reports = []
    for engine in ("specserve", "hf"):
        out = tmp_path / f"{engine}.json"
        assert (
            main(["bench", "--prompts", str(prompt_file), "--max-tokens", "8", "--engine", engine, "--json", str(out)])
            == 0
        )
        reports.append(json.loads(out.read_text()))
    for a, b in zip(reports[0]["requests"], reports[1]["requests"]):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["output_token_ids"] == b["output_token_ids"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--prompts", "/no/such/file.jsonl"], "No such file"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--model", "/no/model"], "model path not found"),
        (["generate", "hi", "--weights", "packed", "--dtype", "bfloat16"], "weights: packed runs on device cpu"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specserve: error:") and message in err and "\n" not in err


def test_bad_prompt_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": []}\n')
    assert main(["bench", "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert ":2:" in err and "\n" not in err


def test_generate_streams_to_stdout():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "generate",
            "Say hi.",
            "--max-tokens",
            "8",
            "--speculator",
            "ngram",
            "--stats",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert 1 <= stats["output_tokens"] <= 8
