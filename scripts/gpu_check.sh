#!/usr/bin/env bash
# The GPU part of issue 24 in one call (about 8 minutes on one H200): serving speed at model
# level, FP8 2:4, the dispatcher, tests/gpu, and `crepe prune` on CUDA against a CPU reference.
#
#   bash scripts/gpu_check.sh              on the GPU machine (its bare python3: torch, transformers)
#   bash scripts/gpu_check.sh --dry-run    here, on the CPU: every part with tiny shapes, the CUDA-only
#                                          calls recorded as 'skipped: no CUDA'
#   options: --only install,env,fp8_gemm,model_bf16,compress,tests_gpu,model_fp8   --budget SECONDS
#
# Needs .gpu-carry/ (scripts/gpu_prepare.sh builds it: wheels, the cut SmolLM2 GGUF, WikiText-2, the
# CPU reference). Writes $OUT/gpu_check.json (rewritten after every part), $OUT/gpu_check.log and
# $OUT/gpu_masks.npz (every mask of section 3, for `scripts/gpu_compress.py compare` here). Each part
# runs under its own time limit inside the overall budget; a part that fails or runs out of time is
# recorded as such and the next one runs. The table printed last is the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
ONLY=""
BUDGET=${CREPE_GPU_BUDGET_S:-480}
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=",$2,"; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "error: unknown argument $1 (--dry-run, --only PARTS, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done

# a dry run on this CPU exercises the code, not the timing: its limits are SCALE times longer
SCALE=1
((DRY)) && SCALE=${CREPE_GPU_DRY_SCALE:-8}
BUDGET=$((BUDGET * SCALE))

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/crepe-gpu-check.XXXXXX")
PARTS=$WORK/parts
mkdir -p "$PARTS"
LOG=$OUT/gpu_check.log
RESULTS=$OUT/gpu_check.json
CARRY=${CREPE_GPU_CARRY:-$ROOT/.gpu-carry}
PY=${PYTHON:-python3}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

main() {
echo "# gpu_check $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET}s carry=$CARRY python=$($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [[ ! -d $CARRY ]]; then
  echo "error: $CARRY is missing: run scripts/gpu_prepare.sh here, and name .gpu-carry in the run tool's carry" >&2
  exit 2
fi

status() {  # name status rc seconds limit [note]
  "$PY" scripts/gpu_report.py status --parts "$PARTS" --out "$RESULTS" --name "$1" --status "$2" \
    --rc "$3" --seconds "$4" --limit "$5" ${6:+--note "$6"} || echo "warning: could not record part $1"
}

since() { local ms=$((($(date +%s%N) - $1) / 1000000)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }

wanted() { [[ -z $ONLY || $ONLY == *",$1,"* ]]; }

# part NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, what is left of the budget)
part() {
  local name=$1 cap=$2
  shift 2
  wanted "$name" || return 0
  cap=$((cap * SCALE))
  local left=$((START + BUDGET - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "=== $name: skipped (${left}s of the budget left)"
    status "$name" skipped 0 0 "$limit" "budget spent"
    return 0
  fi
  echo "=== $name (limit ${limit}s, $((left))s of the budget left) ==="
  local t0 rc st
  t0=$(date +%s%N)
  timeout -k 15 "$limit" "$@"
  rc=$?
  case $rc in
    0) st=ok ;;
    124 | 137) st="timed out" ;;
    *) st=failed ;;
  esac
  status "$name" "$st" "$rc" "$(since "$t0")" "$limit"
  echo "=== $name: $st (rc $rc)"
}

# ---------------------------------------------------------------- install: the carried wheels
# llm-compressor and what the bare machine lacks. First into the machine's own environment with
# pip's resolver (it proves the set is complete against what is installed); if that fails, every
# wheel without dependency checks into $WORK/site, put first on PYTHONPATH. A dry run only checks
# the wheels' Python 3.12 tags, unless CREPE_GPU_INSTALL=1 (scripts/gpu_prepare.sh mimic).
install() {
  wanted install || return 0
  local t0 rc=0 how
  t0=$(date +%s%N)
  local wheels=${CREPE_GPU_WHEELS:-$CARRY/wheels}
  local links=()
  for d in $wheels; do links+=(--find-links "$d"); done
  echo "=== install (wheels from $wheels) ==="
  if ((DRY)) && [[ ${CREPE_GPU_INSTALL:-0} != 1 ]]; then
    # the GPU machine's Python is 3.12: check every carried wheel installs there (tags), without installing
    timeout 120 "$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --target "$WORK/site-check" "$CARRY"/wheels/*.whl
    rc=$?
    how="dry run: cp312 tags checked with pip --dry-run; this environment already has the packages"
  elif timeout 150 "$PY" -m pip install -q --no-index --no-cache-dir "${links[@]}" \
      llmcompressor==0.14.0.1 compressed-tensors==0.19.0 gguf==0.19.0 loguru pydantic datasets; then
    how="resolver, into $($PY -c 'import sys; print(sys.prefix)')"
  else
    echo "resolver install failed; installing every carried wheel with --no-deps into $WORK/site"
    timeout 150 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$CARRY"/wheels/*.whl
    rc=$?
    export PYTHONPATH=$WORK/site:$PYTHONPATH
    how="--no-deps --target $WORK/site (resolver failed)"
  fi
  "$PY" -c "import llmcompressor, compressed_tensors, datasets, pydantic, loguru, gguf; from llmcompressor import oneshot; import crepe_plugin.modifiers; print('imports ok: llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__)" || rc=1
  "$PY" -m pip check 2>&1 | head -20 || true
  status install "$([[ $rc == 0 ]] && echo ok || echo failed)" "$rc" "$(since "$t0")" 300 "$how"
}

if ((DRY)); then
  TINY=(--tiny)
  COMPRESS=(--dry-run)
else
  TINY=()
  COMPRESS=()
fi

install
part env 60 "$PY" scripts/gpu_report.py env --out "$PARTS/env.json" $( ((DRY)) && echo --dry-run)
part fp8_gemm 60 "$PY" benchmarks/fp8_2of4.py --tokens 2048 --json "$PARTS/fp8_gemm.json" "${TINY[@]}"
part model_bf16 170 "$PY" benchmarks/model_speed.py --formats bf16 --json "$PARTS/model_bf16.json" "${TINY[@]}"
part compress 180 "$PY" scripts/gpu_compress.py run --work "$WORK/compress" --json "$PARTS/compress.json" \
  --masks-out "$OUT/gpu_masks.npz" --real-2of4-out "$WORK/compress/real_2of4.safetensors" "${COMPRESS[@]}"
# tests/gpu on the shipped code, with real 2:4 weights (SmolLM2, pruned above) when section 3 ran
REAL=$WORK/compress/real_2of4.safetensors
REALENV=()
[[ -f $REAL ]] && REALENV=("CREPE_REAL_2OF4=$REAL")
part tests_gpu 120 env "${REALENV[@]}" "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rfE \
  --junitxml "$WORK/tests_gpu.xml" -o junit_family=xunit1
if wanted tests_gpu; then
  note=""
  [[ -f $REAL ]] || note="no real 2:4 weights (section 3 did not write them)"
  if ((DRY)); then
    note="tests/gpu refuses to run without CUDA, so the collection error above is expected"
    status tests_gpu "skipped: no CUDA" 0 0 0 "$note"
  fi
  "$PY" scripts/gpu_report.py junit --xml "$WORK/tests_gpu.xml" --out "$PARTS/tests_gpu.json" ${note:+--note "$note"}
fi
part model_fp8 90 "$PY" benchmarks/model_speed.py --formats fp8 --prompts 2048 --prefill-batch 1,8 \
  --decode-batch 1,64,256 --json "$PARTS/model_fp8.json" "${TINY[@]}"

echo "# done in $(($(date +%s) - START)) s; results: $RESULTS, log: $LOG"
"$PY" scripts/gpu_report.py table --json "$RESULTS"
}

main 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
