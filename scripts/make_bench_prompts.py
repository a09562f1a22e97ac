"""Write the benchmark prompt files: OUT_DIR/humaneval.jsonl (all 164), OUT_DIR/sharegpt16.jsonl, and with
`--sharegpt N` OUT_DIR/sharegptN.jsonl (N prompts of at most `--max-chars` characters, for train/test splits)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli.prompts import humaneval_to_jsonl, sharegpt_to_jsonl  # noqa: E402

DEFAULT_HUMANEVAL = REPO.parent / "shared" / "data" / "humaneval.jsonl.gz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="directory to write the JSONL files into")
    parser.add_argument("--humaneval", type=Path, default=DEFAULT_HUMANEVAL, help="HumanEval .jsonl(.gz)")
    parser.add_argument("--sharegpt", type=int, default=0, help="also write N ShareGPT prompts to sharegptN.jsonl")
    parser.add_argument("--max-chars", type=int, default=2000, help="longest first turn --sharegpt takes")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    count = humaneval_to_jsonl(args.humaneval, args.out_dir / "humaneval.jsonl")
    print(f"wrote {count} prompts to {args.out_dir / 'humaneval.jsonl'}")
    count = sharegpt_to_jsonl(args.out_dir / "sharegpt16.jsonl", 16)
    print(f"wrote {count} prompts to {args.out_dir / 'sharegpt16.jsonl'}")
    if args.sharegpt:
        dst = args.out_dir / f"sharegpt{args.sharegpt}.jsonl"
        count = sharegpt_to_jsonl(dst, args.sharegpt, max_chars=args.max_chars)
        print(f"wrote {count} prompts to {dst}")


if __name__ == "__main__":
    main()
