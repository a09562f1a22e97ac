"""`specserve generate` (one prompt, streamed), `specserve bench` (a prompt file, JSON out) and `specserve serve`
(a Serve config on a private local Ray cluster)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--weights",
        choices=["auto", "fp32", "packed"],
        default="auto",
        help="a quantized GGUF's linear layers kept in their blocks (packed) or dequantized (fp32); auto = packed "
        "on CPU in float32",
    )
    p.add_argument(
        "--quantization",
        choices=["none", "int8"],
        default="none",
        help="int8: float weights quantized to int8 at load (a different model: outputs differ from float32)",
    )
    p.add_argument("--speculator", choices=["none", "ngram", "suffix", "draft", "mlp", "eagle", "auto"], default="none")
    p.add_argument("--plan", default=None, help="auto: the plan `specserve profile` wrote (default: ngram for all)")
    p.add_argument("--speculator-model", default=None, help="mlp/eagle: the drafter folder `specserve distill` wrote")
    p.add_argument("--candidates", type=int, default=1, help="candidate paths verified per step (1 = one chain)")
    p.add_argument("--k", type=int, default=4, help="max speculative tokens per step")
    p.add_argument("--draft-model", default=None, help="draft model folder or .gguf (same tokenizer)")
    p.add_argument("--draft-layers", type=int, default=None, help="truncate the draft to its first N layers")
    p.add_argument("--no-adaptive-k", action="store_true", help="keep k fixed instead of backing off")
    p.add_argument(
        "--k-policy",
        choices=["auto", "cost", "backoff"],
        default="auto",
        help="adaptive k: the backoff on misses, or the cost model (k = 0 where drafts do not pay); "
        "auto = the cost model under --speculator auto, the backoff otherwise",
    )
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _config(args: argparse.Namespace):
    from model.config import EngineConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        weights=args.weights,
        quantization=args.quantization,
        speculator=args.speculator,
        speculator_model=args.speculator_model,
        plan=args.plan,
        num_speculative_tokens=args.k,
        num_candidates=args.candidates,
        draft_model=args.draft_model,
        draft_num_layers=args.draft_layers,
        adaptive_k=not args.no_adaptive_k,
        k_policy=args.k_policy,
        kv_cache_gib=args.kv_cache_gib,
    )


def _generate(args: argparse.Namespace) -> int:
    from engine.llm_engine import LLMEngine
    from sampling.params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or [],
    )
    engine = LLMEngine(_config(args))
    if args.raw:
        engine.add_request(args.prompt, params)
    else:
        engine.add_request(messages=[{"role": "user", "content": args.prompt}], params=params)
    final = None
    for out in engine.run():
        sys.stdout.write(out.delta)
        sys.stdout.flush()
        final = out
    sys.stdout.write("\n")
    if final is not None and args.stats:
        m = final.metrics
        stats = {
            "output_tokens": len(final.output_token_ids),
            "finish_reason": final.finish_reason,
            "ttft_s": round(m.ttft or 0, 4),
            "latency_s": round(m.latency or 0, 4),
            **m.spec.as_dict(),
        }
        print(json.dumps(stats), file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from cli.bench import run_hf, run_specserve
    from cli.prompts import load_prompts

    specs = load_prompts(args.prompts, args.limit)
    if not specs:
        raise ValueError(f"{args.prompts}: no prompts")
    if args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    config = {k: v for k, v in vars(args).items() if k not in ("func", "json")}
    if args.engine == "hf":
        result = run_hf(specs, args.model, args.dtype, args.max_tokens, args.temperature, args.seed, args.device)
    else:
        result = run_specserve(specs, _config(args), args.max_tokens, args.concurrency, args.temperature, args.seed)
    report = result.to_json(config)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report["summary"] | {"engine": args.engine, "speculator": args.speculator}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cli.serve import ServeError, serve_config

    try:
        return serve_config(args.config, args.address, args.num_cpus, args.start_timeout)
    except ServeError as e:
        raise ValueError(str(e)) from e


def _distill(args: argparse.Namespace) -> int:
    from cli.distill import run
    from model.config import EngineConfig
    from speculator.distill import DistillOptions

    options = DistillOptions(
        n_predict=args.n_predict, draft_vocab=args.draft_vocab, epochs=args.epochs, batch_size=args.batch_size,
        samples=args.samples,
    )  # fmt: skip
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, kv_cache_gib=args.kv_cache_gib)
    report = run(
        args.prompts, args.out, kind=args.kind, max_tokens=args.max_tokens, limit=args.limit, options=options,
        engine_config=config,
    )  # fmt: skip
    keys = ("num_prompts", "generated_tokens", "accuracy_by_position", "expected_tokens_per_step", "total_s")
    print(json.dumps({k: report[k] for k in keys} | {"out": args.out}))
    return 0


def _profile_options(args: argparse.Namespace, **extra):
    """What `profile` and `adapt` share of their flags."""
    from cli.profile import ProfileOptions

    drafters = tuple(filter(None, args.drafters.split(",")))
    return ProfileOptions(limit=args.limit, max_tokens=args.max_tokens, k=args.k, classes=args.classes,
                          class_rules=args.class_rules, drafters=drafters, **extra)  # fmt: skip


def _profile(args: argparse.Namespace) -> int:
    from cli.profile import run
    from model.config import EngineConfig

    options = _profile_options(args, speculator_models=tuple(args.speculator_model))
    base = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, kv_cache_gib=args.kv_cache_gib)
    plan = run(args.prompts, args.out, base, options, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"out": args.out, "classes": [c.model_dump() for c in plan.classes]}))
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from cli.adapt import AdaptOptions, run
    from model.config import EngineConfig
    from speculator.distill import DistillOptions

    profile = _profile_options(args)
    distill = DistillOptions(
        n_predict=args.n_predict or args.k, draft_vocab=args.draft_vocab, epochs=args.epochs, batch_size=args.batch_size
    )
    options = AdaptOptions(kind=args.kind, target_speedup=args.target_speedup, min_prompts=args.min_prompts)
    base = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, kv_cache_gib=args.kv_cache_gib)
    report = run(args.prompts, args.out, base, profile, distill, options, log=lambda line: print(line, file=sys.stderr))
    classes = [
        {"name": c.name, "before": c.before.drafter, "after": c.after.drafter, "speedup": c.after.expected_speedup}
        for c in report.classes
    ]
    print(json.dumps({"out": args.out, "classes": classes, "wall_s": report.wall_s}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from one prompt, streamed to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="complete the raw text (no chat template)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print request metrics as JSON on stderr")
    _engine_args(gen)
    gen.set_defaults(func=_generate)
    bench = sub.add_parser("bench", help="benchmark a JSONL prompt file; prints a JSON summary")
    bench.add_argument("--prompts", required=True, help="JSONL: {prompt} | {messages} | {turns}, optional id")
    bench.add_argument("--limit", type=int, default=None)
    bench.add_argument("--engine", choices=["specserve", "hf"], default="specserve")
    bench.add_argument("--concurrency", type=int, default=1)
    bench.add_argument("--json", default=None, help="write the full report (requests + summary) here")
    _engine_args(bench)
    bench.set_defaults(func=_bench)
    serve = sub.add_parser(
        "serve",
        help="serve a Serve config (default serve_config.yaml) on a private local Ray cluster until Ctrl-C/SIGTERM",
    )
    serve.add_argument("config", nargs="?", type=Path, default=Path("serve_config.yaml"))
    serve.add_argument("--address", default=None, help="deploy onto this running Ray cluster instead (or 'auto')")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private cluster (default: all)")
    serve.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for RUNNING")
    serve.set_defaults(func=_serve)
    dist = sub.add_parser("distill", help="train a learned drafter on the target's greedy outputs for a prompt file")
    dist.add_argument("--prompts", required=True, help="JSONL: {prompt} | {messages} | {turns}, optional id")
    dist.add_argument("--kind", choices=["mlp", "eagle"], default="mlp")
    dist.add_argument("--out", required=True, help="folder for the drafter, its draft vocabulary and report.json")
    dist.add_argument("--max-tokens", type=int, default=128, help="greedy tokens generated per prompt")
    dist.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    dist.add_argument("--draft-vocab", type=int, default=8192, help="predict over the K most frequent tokens; 0 = all")
    dist.add_argument("--epochs", type=int, default=4)
    dist.add_argument("--n-predict", type=int, default=3, help="tokens the drafter proposes per step")
    dist.add_argument("--batch-size", type=int, default=256)
    dist.add_argument("--samples", type=int, default=1, help="outputs per prompt: greedy, and N - 1 sampled at 0.8")
    dist.add_argument("--model", default=None, help="HF model folder or .gguf (default: SmolLM2-135M-Instruct)")
    dist.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    dist.add_argument("--device", default="cpu")
    dist.add_argument("--kv-cache-gib", type=float, default=1.0)
    dist.set_defaults(func=_distill)
    prof = sub.add_parser("profile", help="measure drafters per workload class; write the plan of --speculator auto")
    prof.add_argument("--prompts", required=True, help="JSONL: {prompt} | {messages} | {turns}, optional id")
    prof.add_argument("--out", required=True, help="the plan (JSON)")
    prof.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    prof.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt and drafter")
    prof.add_argument("--k", type=int, default=4, help="the most draft tokens per step a plan may choose")
    prof.add_argument("--classes", type=int, default=None, help="k-means classes (default: 2..4 by silhouette)")
    prof.add_argument("--class-rules", default=None, help="JSON list of {name, regex} instead of k-means")
    prof.add_argument("--drafters", default="ngram,suffix,draft", help="drafters without a folder to measure")
    prof.add_argument(
        "--speculator-model", action="append", default=[], help="a learned drafter's folder ([mlp=|eagle=]DIR)"
    )
    prof.add_argument("--model", default=None, help="HF model folder or .gguf (default: SmolLM2-135M-Instruct)")
    prof.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--kv-cache-gib", type=float, default=0.5)
    prof.set_defaults(func=_profile)
    adapt = sub.add_parser(
        "adapt", help="profile, distill a drafter for each class short of a target speedup, profile again"
    )
    adapt.add_argument("--prompts", required=True, help="JSONL: {prompt} | {messages} | {turns}, optional id")
    adapt.add_argument("--out", required=True, help="folder: plan-before.json, drafters/, plan.json, adapt.json/png")
    adapt.add_argument("--kind", choices=["mlp", "eagle"], default="mlp", help="the drafter distilled per class")
    adapt.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    adapt.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt (profile and distill)")
    adapt.add_argument("--k", type=int, default=4, help="the most draft tokens per step a plan may choose")
    adapt.add_argument("--classes", type=int, default=None, help="k-means classes (default: 2..4 by silhouette)")
    adapt.add_argument("--class-rules", default=None, help="JSON list of {name, regex} instead of k-means")
    adapt.add_argument("--drafters", default="ngram,suffix,draft", help="drafters without training to profile")
    adapt.add_argument(
        "--target-speedup", type=float, default=1.5, help="distill for classes expected below it (large: every class)"
    )
    adapt.add_argument("--min-prompts", type=int, default=2, help="classes with fewer prompts are not distilled")
    adapt.add_argument("--epochs", type=int, default=4)
    adapt.add_argument("--draft-vocab", type=int, default=8192, help="predict over the K most frequent tokens; 0 = all")
    adapt.add_argument("--n-predict", type=int, default=None, help="tokens the drafter proposes (default: --k)")
    adapt.add_argument("--batch-size", type=int, default=256)
    adapt.add_argument("--model", default=None, help="HF model folder or .gguf (default: SmolLM2-135M-Instruct)")
    adapt.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    adapt.add_argument("--device", default="cpu")
    adapt.add_argument("--kv-cache-gib", type=float, default=0.5)
    adapt.set_defaults(func=_adapt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except ValidationError as e:
        from sampling.params import describe_validation_error

        print(f"specserve: error: {describe_validation_error(e)}", file=sys.stderr)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"specserve: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    except KeyboardInterrupt:
        print("specserve: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
