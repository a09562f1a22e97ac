"""vLLM's offline engine behind a line protocol, for `bench_vllm.py`; runs in vLLM's own environment.

    <vllm venv>/bin/python scripts/vllm_worker.py MODEL_FOLDER [--no-prefix-caching]

Prints {"ready": true} once loaded, then for each JSON line {"prompts": [[token ids]...], "max_tokens": N,
"stop_token_ids": [...]} on stdin prints {"outputs": [[token ids]...], "wall_s": S}: greedy, all prompts in
flight at once (one `LLM.generate` call). Imports nothing from specserve (its environment is vLLM's).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    caching = "--no-prefix-caching" not in sys.argv[2:]
    llm = LLM(model=sys.argv[1], dtype="float32", seed=0, enable_prefix_caching=caching)
    warm = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 4])], warm, use_tqdm=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(
            temperature=0.0, max_tokens=job["max_tokens"], stop_token_ids=job["stop_token_ids"], ignore_eos=False
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        print(json.dumps({"outputs": [list(o.outputs[0].token_ids) for o in outs], "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()
