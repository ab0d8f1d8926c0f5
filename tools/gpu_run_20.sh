#!/usr/bin/env bash
# Issue 20 (GPU speed): the one GPU run that remains, in ONE call on the GPU machine, so that
# every figure of the project's benchmark is also a ratio to the shared reference measured
# on the same card in the same call.
#
# Once, here, in the repository root: the diffusers wheel the machine lacks (pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# Then (device tool), from the repository root:
#   run(command="bash tools/gpu_run_20.sh", carry=[".whl"], timeout_s=540)
#
# Stages, in this order, each under a timeout cut to the time left before the deadline
# (DEADLINE seconds after the start, default 470: the tool's 8-minute budget with a margin):
#   1. gpu.txt          card, driver, versions, which reference script ran (and its sha256)
#   2. anchor.json      the shared reference (../shared/bench/reference_nti_gpu.py when it
#                       travelled, else shared/bench/, else the verbatim copy in tools/): the
#                       published null-text loop and its bf16 / fp16 / batch-8 relatives,
#                       K=3 of 50 timesteps timed and scaled, compile off   (~45 s)
#   3. bench_gpu.json   pivot-edit bench gpu: null-text at batch 1 and 8 for eager / static /
#                       cuda-graph in fp32, bf16, bf16 channels-last, fp16; each variant's
#                       reconstruction PSNR against the fp32 path (10-step whole inversion);
#                       P2P edits with 1 and 4 targets, eager and graphed, fp32 and bf16
#                       (~4 min)
#   4. precision_fp16.json, precision_bf16.json: the bundled model (its own scenes, 50 steps,
#                       early stop on): reconstruction with an fp16 / bf16 UNet against fp32,
#                       the fast path in CUDA graphs (~1 min)
#   5. bench_compile.json: compile+cuda-graph-bf16 at batch 1 with the time left (its warm-up
#                       is minutes: the reference's compile took 258 s on an H200); a run cut
#                       short leaves the JSON as far as it got
#   run.log             every stage's stderr and exit status
# That is 7 files: the tool brings back at most 8.
#
# SMOKE=1: the same stages on a CPU in seconds (tiny model, --cpu-smoke; the reference and
# fp16 are skipped there, the graph variants recorded as skipped): tests/test_gpu_run.py.
# ONLY_COMPILE=1: stage 1 and 5 alone (a second call, when the first left no time for 5).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
START=$(date +%s)
# a CPU (SMOKE=1) has no device budget but may be shared: ten times the stage limits there
if [ "$SMOKE" = 1 ]; then SCALE=10; DEADLINE=${DEADLINE:-4700}; else SCALE=1; DEADLINE=${DEADLINE:-470}; fi
LOG="$OUT/run.log"
: > "$LOG"

left() {  # seconds left before the deadline, at most $1 (x SCALE)
  local l=$(( DEADLINE - ($(date +%s) - START) )) m=$(( $1 * SCALE ))
  [ "$l" -gt "$m" ] && l=$m
  echo "$l"
}

stage() {  # stage NAME MAX_SECONDS COMMAND...: run under the time left, log its status
  local name=$1 max=$2; shift 2
  local t; t=$(left "$max")
  if [ "$t" -lt 20 ]; then
    echo "== $name: skipped, ${t}s left before the deadline" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (timeout ${t}s, $(( $(date +%s) - START ))s in)" | tee -a "$LOG"
  timeout "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc" | tee -a "$LOG"
}

# diffusers is not in the machine's image: install the carried wheel (no network there)
if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/diffusers-*.whl || { echo "no diffusers wheel in .whl" >&2; exit 3; }
  export PYTHONPATH=/tmp/site
fi
# the package is not installed there: import it from the checkout (the bundled model is
# found under assets/ when the editor.assets mapping is missing)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

REF=tools/reference_nti_gpu.py
for cand in ../shared/bench/reference_nti_gpu.py shared/bench/reference_nti_gpu.py; do
  if [ -f "$cand" ]; then REF=$cand; break; fi
done

{
  if [ "$SMOKE" = 1 ]; then echo "smoke run on the CPU: not a measurement"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; fi
  $PY -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  echo "reference: $REF sha256 $(sha256sum "$REF" | cut -d' ' -f1)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [ "$SMOKE" = 1 ]; then
  BENCH=(--cpu-smoke --batches 1 --variants eager-fp32,static-eager-bf16,cuda-graph-bf16
         --quality-steps 2 --no-edit)
  COMPILE=(--cpu-smoke --batches 1 --no-edit --quality-steps 0)
  PREC=(--device cpu --steps 2 --scenes 1 --threads 1)
else
  BENCH=(--timed-steps 3)
  COMPILE=(--batches 1 --no-edit --quality-steps 0 --timed-steps 3)
  PREC=(--mode cuda-graph)
fi

if [ "${ONLY_COMPILE:-0}" != 1 ]; then
  if [ "$SMOKE" = 1 ]; then
    echo "== reference: skipped (needs CUDA)" | tee -a "$LOG"
  else
    stage reference 120 env OUT="$OUT" COMPILE=0 K="${K:-3}" $PY "$REF"
  fi
  stage "bench gpu" 330 $PY -m editor bench gpu --out "$OUT/bench_gpu.json" "${BENCH[@]}"
  if [ "$SMOKE" = 1 ]; then
    echo "== precision fp16: skipped (a float16 UNet needs CUDA)" | tee -a "$LOG"
  else
    stage "precision fp16" 90 $PY -m editor bench precision --unet-dtype float16 \
      --out "$OUT/precision_fp16.json" "${PREC[@]}"
  fi
  stage "precision bf16" 90 $PY -m editor bench precision --unet-dtype bfloat16 \
    --out "$OUT/precision_bf16.json" "${PREC[@]}"
fi
stage "bench compile" 600 $PY -m editor bench gpu --variants compile+cuda-graph-bf16 \
  --out "$OUT/bench_compile.json" "${COMPILE[@]}"
echo "done in $(( $(date +%s) - START ))s" | tee -a "$LOG"
