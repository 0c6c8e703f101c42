#!/usr/bin/env bash
# The GPU tables of issue 13 in one run, sized for a 15-minute device session on one
# H200 (the two benchmarks take about 6 minutes there by estimate; each is capped).
#
#   make gpu-site            # here: the two peers, pure Python, into benchmarks/out/gpu_site
#   bash benchmarks/gpu.sh   # there, with benchmarks/out/gpu_site carried along
#
# Needs a Python whose torch has CUDA (PYTHON, else python3); bnnify's core needs
# torch only, and is imported from this checkout. Results go to $OUT (the device
# runner's folder) or benchmarks/out.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/out}
mkdir -p "$DEST"
export PYTHONPATH="$PWD:$PWD/benchmarks/out/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: $PY has no CUDA-enabled torch; set PYTHON" >&2
    exit 2
fi
"$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' | tee "$DEST/gpu_env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$DEST/gpu_env.txt" 2>&1
status=0
timeout 420 "$PY" benchmarks/bench_peers.py --device cuda --repeats 7 \
    --out "$DEST/bench_peers_cuda.json" > "$DEST/bench_peers_cuda.md" 2> "$DEST/bench_peers_cuda.log" \
    || status=$?
timeout 300 "$PY" benchmarks/bench_core.py --device cuda --repeats 7 \
    --out "$DEST/bench_core_cuda.json" > "$DEST/bench_core_cuda.md" 2> "$DEST/bench_core_cuda.log" \
    || status=$?
cat "$DEST/bench_peers_cuda.md" "$DEST/bench_core_cuda.md"
tail -n 5 "$DEST"/*.log
exit "$status"
