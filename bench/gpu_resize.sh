#!/usr/bin/env bash
# Issue 21 on a lent GPU machine, in one command (about 5-6 minutes on an H100 with 16 cores; budget 8):
#   end-to-end ROI/s of `fathompipe.infer.run` (fp16, batch 64, 1,584 train-like ROIs twice over) with 6, 8 and 14
#   DataLoader workers, infer.resize=cpu and =device side by side at each count; the model alone (random full-size
#   weights, per precision); the device resize alone; and one worker's CPU per ROI for both paths.
#
#   bash bench/gpu_resize.sh            # from the repository root or anywhere; prints the table at the end
#
# Runs with the machine's own python (PYTHON=..., default python3), which needs a CUDA build of torch and the
# project's requirements (nothing can be installed there: no network). Writes $OUT/bench-infer-gpu.{json,log}
# when $OUT is set (the device tool's output folder), else under /tmp. Record the printed rows in BENCHMARKS.md
# with the card, and choose InferConfig.resize's default from the e2e rows (auto = device on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${OUT:-/tmp}
echo "cores: $(nproc); $(nvidia-smi -L 2>/dev/null | head -1)"
"$PYTHON" bench/infer.py --sections worker,resize,model,e2e --device cuda --images 600 --worker-images 40 \
    --workers 6,8,14 --resize cpu,device --e2e-precisions fp16 --batch-sizes 64 --e2e-repeat 2 \
    --workdir "${WORKDIR:-/tmp/fathompipe-bench-gpu}" --json-out "$DEST/bench-infer-gpu.json" 2>&1 \
    | grep -v "^infer shard\|^wrote \|^slim weights" | tee "$DEST/bench-infer-gpu.log"
