"""JSON-schema responses with n-gram speculation against plain decoding, interleaved prompt by prompt.

Two engines in one process (plain and n-gram), the same greedy requests with a JSON schema each; every prompt
goes to both, in alternating order (A B, then B A), so drift of the machine falls on both alike. Prints JSON:
output tokens/s per engine, the ratio, the acceptance of the n-gram drafts, and whether the tokens are
identical (they must be: verification with the grammar's masks is lossless).

    python scripts/bench_structured.py --rounds 2 --max-tokens 96
"""

from __future__ import annotations

import argparse
import json
import time

from engine.llm_engine import LLMEngine
from sampling.params import SamplingParams
from sampling.structured import StructuredOutput

STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props)}


# Extraction tasks: the answer's values come from the prompt, as in most structured-output traffic.
TASKS = [
    (
        obj(name=STR, city=STR, age=INT),
        "Alice Smith lives in Paris and is 30 years old. Give her name, city and age as JSON.",
    ),
    (
        obj(items={"type": "array", "items": STR}, express=BOOL),
        "Order: apples, pears and plums, sent express. Give the items and whether it is express as JSON.",
    ),
    (
        obj(title=STR, author=STR, year=INT),
        "The book 'The Old Man and the Sea' by Ernest Hemingway came out in 1952. Give title, author, year as JSON.",
    ),
    (
        obj(function=STR, arguments={"type": "array", "items": STR}, returns=STR),
        "def merge_sorted(left: list, right: list) -> list: merges two sorted lists. Describe the function's "
        "name, its argument names and its return type as JSON.",
    ),
    (
        obj(sender=STR, recipient=STR, subject=STR, urgent=BOOL),
        "Email from john.doe@example.com to mary.jones@example.com, subject 'Quarterly budget review', marked "
        "urgent. Give sender, recipient, subject and urgent as JSON.",
    ),
    (
        obj(product=STR, price=NUM, currency=STR, in_stock=BOOL),
        "The Acme Rocket Skates cost 149.99 US dollars and are in stock. Give product, price, currency and "
        "in_stock as JSON.",
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="n-gram draft tokens per step")
    args = ap.parse_args()
    engines = {
        "plain": LLMEngine(kv_cache_gib=0.5),
        "ngram": LLMEngine(kv_cache_gib=0.5, speculator="ngram", num_speculative_tokens=args.k),
    }
    jobs = [
        ([{"role": "user", "content": text}], StructuredOutput(kind="json_schema", spec=json.dumps(schema)))
        for schema, text in TASKS
    ]
    for engine in engines.values():  # warm-up (compiles each grammar once, per engine)
        engine.generate([m for m, _ in jobs], [SamplingParams(max_tokens=4, structured=s) for _, s in jobs])
    wall = dict.fromkeys(engines, 0.0)
    tokens = dict.fromkeys(engines, 0)
    drafted0, accepted0 = engines["ngram"].spec.drafted, engines["ngram"].spec.accepted
    same, valid, i = True, 0, 0
    for _ in range(args.rounds):
        for messages, spec in jobs:
            order = ("plain", "ngram") if i % 2 == 0 else ("ngram", "plain")
            i += 1
            got = {}
            for name in order:
                t0 = time.perf_counter()
                out = engines[name].generate([messages], SamplingParams(max_tokens=args.max_tokens, structured=spec))[0]
                wall[name] += time.perf_counter() - t0
                tokens[name] += len(out.output_token_ids)
                got[name] = out
            same &= got["plain"].output_token_ids == got["ngram"].output_token_ids
            try:
                valid += isinstance(json.loads(got["ngram"].text), dict)
            except ValueError:
                pass
    tps = {name: tokens[name] / wall[name] for name in engines}
    spec = engines["ngram"].spec
    drafted, accepted = spec.drafted - drafted0, spec.accepted - accepted0
    report = {
        "requests_per_engine": i,
        "max_tokens": args.max_tokens,
        "k": args.k,
        "plain_tokens_per_s": round(tps["plain"], 2),
        "ngram_tokens_per_s": round(tps["ngram"], 2),
        "ratio_ngram_over_plain": round(tps["ngram"] / tps["plain"], 3),
        "output_tokens": tokens,
        "ngram_drafted": drafted,
        "ngram_accepted": accepted,
        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
        "identical_tokens": same,
        "json_objects": f"{valid}/{i}",
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
