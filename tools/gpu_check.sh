#!/usr/bin/env bash
# Issue 7 (speed): the GPU measurement, in one call on the GPU machine, so that the
# project's figures and the shared reference's come from the same card.
#
# From the repository root on the device machine (the diffusers wheel travels in .whl):
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
# optionally, in a second call if at least 7 minutes of device time are left:
#   run(command="WITH_COMPILE=1 SKIP_MAIN=1 bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Writes under $OUT (or ./out): gpu.txt (card, driver, versions), bench_gpu.json (+ .log),
# anchor.json + reference.log (shared/bench/reference_nti_gpu.py, verbatim copy in tools/),
# and with WITH_COMPILE=1 bench_compile.json (+ .log): torch.compile warm-up and timing.
# Expected wall time on an H100/H200: bench about 3-4 min, reference about 1.5 min (its
# compile part is off: it took 258 s on an H200), compile run about 5 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# diffusers is not in the machine's image: install the carried wheel (no network there).
# importlib_metadata is not needed on Python >= 3.8 (diffusers uses importlib.metadata).
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/diffusers-*.whl || { echo "no diffusers wheel in .whl" >&2; exit 3; }
  export PYTHONPATH=/tmp/site
fi
# the package is not installed there: import it from the checkout (editor.model finds the
# bundled tokenizer under assets/ when the editor.assets mapping is missing)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [ "${SKIP_MAIN:-0}" != 1 ]; then
  # 1. the project's benchmark: eager fp32 / bf16, static buffers, CUDA graphs (bf16,
  #    bf16 channels-last, fp16) at batch 1 and 8, one P2P edit (fp32 and bf16)
  timeout "${BENCH_TIMEOUT:-330}" python3 -m editor bench gpu --out "$OUT/bench_gpu.json" \
    ${BENCH_ARGS:-} > /dev/null 2> "$OUT/bench_gpu.log"
  echo "bench gpu: exit $?"; tail -n 20 "$OUT/bench_gpu.log"
  # 2. the shared reference on the same card (K of 50 timesteps, scaled; compile off)
  COMPILE=${REF_COMPILE:-0} K=${K:-5} timeout "${REF_TIMEOUT:-180}" \
    python3 tools/reference_nti_gpu.py > "$OUT/reference.log" 2>&1
  echo "reference: exit $?"; tail -n 3 "$OUT/reference.log"
fi

if [ "${WITH_COMPILE:-0}" = 1 ]; then
  # 3. torch.compile: warm-up (compilation) and steady speed, batch 1
  timeout "${COMPILE_TIMEOUT:-500}" python3 -m editor bench gpu --batches 1 --no-edit \
    --variants compile-bf16,compile+cuda-graph-bf16 --out "$OUT/bench_compile.json" \
    > /dev/null 2> "$OUT/bench_compile.log"
  echo "bench compile: exit $?"; tail -n 20 "$OUT/bench_compile.log"
fi
