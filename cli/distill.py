"""`specserve distill`: train a learned drafter on the target's own greedy outputs for a prompt file.

The engine generates every prompt's continuation (batched, greedy), one teacher-forced pass over prompt + output
collects the target's final hidden states, `speculator.distill.distill` trains the drafter, and the output folder
gets the drafter (an MLP speculator in IBM's format, or an EAGLE head: config.json, model.safetensors,
draft_vocab.json) and report.json. An EAGLE head also reads the prompt's hidden states, as context.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cli.prompts import PromptSpec, load_prompts
from engine.llm_engine import LLMEngine
from engine.tokenization import RequestError
from model.config import EngineConfig
from model.runner import StepInput
from sampling.params import SamplingParams
from speculator.distill import DistillOptions, distill, proposal_seconds
from speculator.distill_data import teacher_forced_records
from speculator.eagle import TargetParts, save_eagle
from speculator.eagle_proposer import proposal_seconds as eagle_proposal_seconds
from speculator.factory import quantize_for_drafting
from speculator.mlp_checkpoint import save_speculator


@dataclass
class Generated:
    token_ids: list[int]  # prompt + output
    output_start: int
    prompt: int  # index of the prompt in the file's order
    sampled: bool


def generate(
    engine: LLMEngine, specs: list[PromptSpec], max_tokens: int, samples: int = 1, temperature: float = 0.8
) -> tuple[list[Generated], int]:
    """Per prompt its greedy continuation and `samples - 1` sampled at `temperature` (seeded), batched by the
    engine; and how many prompts did not fit."""
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    wanted, skipped = [], 0
    for p, spec in enumerate(specs):
        params = [greedy] + [
            SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=p * samples + j)
            for j in range(1, samples)
        ]
        try:
            wanted += [
                (engine.add_request(spec.prompt, sp, messages=spec.messages), p, j > 0) for j, sp in enumerate(params)
            ]
        except RequestError:
            skipped += 1
    done = {}
    with tqdm(total=len(wanted), desc="generate", unit="req") as bar:
        for out in engine.run():
            if out.finished:
                done[out.request_id] = out
                bar.update(1)
    return [
        Generated(done[i].prompt_token_ids + done[i].output_token_ids, len(done[i].prompt_token_ids), p, sampled)
        for i, p, sampled in wanted
    ], skipped


def target_step_seconds(engine: LLMEngine, context: int = 128, repeats: int = 30) -> float:
    """Median wall time of one target decode step for one sequence at `context` tokens (the engine idle; its
    KV pages are written, so its block manager is reset afterwards)."""
    runner, bs = engine.runner, engine.config.block_size
    table = list(range(1, 2 + context // bs))
    runner.execute([StepInput([1] * context, 0, table, 1)])
    times = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        runner.execute([StepInput([1], context, table, 1)])
        times.append(time.perf_counter() - t0)
    engine.reset_kv()
    return sorted(times[3:])[repeats // 2]


def run(
    prompts: str,
    out_dir: str,
    *,
    kind: str = "mlp",
    max_tokens: int = 128,
    limit: int | None = None,
    options: DistillOptions,
    engine_config: EngineConfig,
) -> dict:
    """The whole command; returns the report it wrote."""
    specs = load_prompts(prompts, limit)
    digest = hashlib.sha256(Path(prompts).read_bytes()).hexdigest()
    return distill_prompts(
        specs, out_dir, kind=kind, max_tokens=max_tokens, options=options, engine_config=engine_config,
        source=str(prompts), source_sha256=digest,
    )  # fmt: skip


def distill_prompts(
    specs: list[PromptSpec],
    out_dir: str | Path,
    *,
    kind: str,
    max_tokens: int,
    options: DistillOptions,
    engine_config: EngineConfig,
    source: str,
    source_sha256: str,
) -> dict:
    """A drafter distilled on `specs` (drawn from the prompt file `source`) written to `out_dir` with its
    report.json; returns the report."""
    if kind not in ("mlp", "eagle"):
        raise ValueError(f"--kind {kind}: expected mlp or eagle")
    if len(specs) < 2:
        raise ValueError(f"{source}: distillation needs at least 2 prompts")
    t_start = time.perf_counter()
    engine = LLMEngine(engine_config)
    t0 = time.perf_counter()
    generated, skipped = generate(engine, specs, max_tokens, options.samples, options.sample_temperature)
    sequences = [(g.token_ids, g.output_start) for g in generated]
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.reset_kv()  # the teacher-forced pass owns the KV pages from here
    eagle = kind == "eagle"
    with tqdm(total=len(sequences), desc="hidden states", unit="seq") as bar:
        wanted = [(tokens, 1) for tokens, _ in sequences] if eagle else sequences
        records = teacher_forced_records(engine.runner, wanted, progress=bar.update)
    for record, g in zip(records, generated):
        record.output_start, record.prompt, record.sampled = g.output_start, g.prompt, g.sampled
    hidden_s = time.perf_counter() - t0
    step_s = target_step_seconds(engine)
    target = TargetParts.from_model(engine.runner.model) if eagle else None
    result = distill(
        records, kind, target_vocab_size=engine.arch.vocab_size, options=options, arch=engine.arch, target=target
    )
    drafter = result.model
    out = Path(out_dir)
    (save_eagle if eagle else save_speculator)(drafter, out)
    proposal_tokens = options.n_predict
    # timed as it will draft: in int8 where the engine would run it so (saved in float32 above)
    int8 = quantize_for_drafting(drafter, engine_config, engine_config.device)
    proposal_s = eagle_proposal_seconds(drafter, proposal_tokens) if eagle else proposal_seconds(drafter)
    metrics = asdict(result.metrics)
    report = {
        "kind": kind,
        "prompts": source,
        "prompts_sha256": source_sha256,
        "num_prompts": len({g.prompt for g in generated}),
        "num_sequences": len(sequences),
        "skipped_prompts": skipped,
        "max_tokens": max_tokens,
        "generated_tokens": sum(len(t) - first for t, first in sequences),
        "model": engine_config.model,
        "options": options.model_dump(),
        "draft_vocab_size": len(drafter.draft_vocab.ids) if drafter.draft_vocab else drafter.config.vocab_size,
        **{k: metrics[k] for k in metrics if k != "history"},
        "generate_s": round(generate_s, 2),
        "hidden_states_s": round(hidden_s, 2),
        "total_s": round(time.perf_counter() - t_start, 2),
        "cost": {
            "proposal_s": proposal_s,
            "int8": int8,
            "proposal_tokens": proposal_tokens,
            "target_step_s": step_s,
            "proposal_per_target_step": proposal_s / step_s,
            "per_token_per_target_step": proposal_s / proposal_tokens / step_s,
        },
        "history": metrics["history"],
        "torch_threads": torch.get_num_threads(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
