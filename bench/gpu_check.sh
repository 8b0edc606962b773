#!/usr/bin/env bash
# The GPU check: one prepared script for a lent GPU machine (the `device` tool), under 8 minutes on one H200.
# Prepare on the CPU machine first (`bash bench/gpu_prepare.sh`), then run it through the device tool as
#     run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu-data"], timeout_s=560)
# It runs, each under its own time limit so one slow part cannot eat the others:
#   1. the bloodmnist MedMNIST v2 reproduction on the GPU path (bf16 AMP, channels-last, data on the device);
#   2. the pre-training throughput bench (SimCLR, SparK);
#   3. a short slice of the `paper` preset (EfficientNet-Lite0 at 112 px, SSL pre-training, three protocols).
# Every number goes to $OUT/gpu_check.jsonl (or ./gpu_check.out/ without $OUT), logs beside it, for BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check.out}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.jsonl"
WORK="$(mktemp -d)"
export PYTHONUNBUFFERED=1 MEDPRETRAIN_OFFLINE=1 MEDPRETRAIN_DATA="$PWD/.gpu-data" XDG_CACHE_HOME="$WORK/cache"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH="$PWD/src:$WORK/site:$PWD"
else
    export PYTHONPATH="$PWD/src:$PWD"
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, record rc and wall time
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit}" >> "$RESULTS"
    grep -h '^{' "$OUT/$name.log" | sed "s/^{/{\"step\": \"$name\", /" >> "$RESULTS"
    tail -n 3 "$OUT/$name.log"
}

python3 - >> "$RESULTS" <<'PY'
import json, platform, torch
print(json.dumps({"step": "machine", "python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/machine.log" 2>&1

# 1. MedMNIST v2 ResNet-18 (28) recipe, all 100 epochs (published: AUC 0.998, ACC 0.958).
step reproduce 210 python3 bench/reproduce_medmnist_v2.py --dataset bloodmnist --precision bf16-mixed --out "$WORK/repro"

# 2. Pre-training throughput: pipeline vs bare compute vs lightly's PIL pipeline.
step throughput 90 python3 bench/pretrain_throughput.py --dataset bloodmnist --methods simclr spark --steps 30

# 3. A slice of the paper preset: its backbone, size and protocols on one small dataset, 2 seeds.
cat > "$WORK/slice.yaml" <<'YAML'
name: paper-slice
datasets: [pneumoniamnist]
backbone: efficientnet_lite0
image_size: 112
inits: [scratch, {method: simclr, epochs: 5}, {method: spark, epochs: 5}]
protocols: [linear, knn, finetune]
budgets: {fractions: [0.01, 0.1, 1.0]}
seeds: 2
finetune: {min_steps: 100}   # the paper's 500 steps × 2 learning rates × 18 cells would not fit this check
YAML
step paper_slice 170 python3 -m medpretrain run "$WORK/slice.yaml" --out "$WORK/slice" --no-report --no-progress
python3 - "$WORK/slice/results.db" >> "$RESULTS" <<'PY'
import json, sqlite3, sys
try:
    rows = sqlite3.connect(sys.argv[1]).execute("SELECT init, protocol, fraction, seed, auc, steps, seconds FROM results")
    for r in rows:
        print(json.dumps({"step": "paper_slice_row", **dict(zip(["init", "protocol", "fraction", "seed", "auc", "steps", "seconds"], r))}))
except sqlite3.Error as err:
    print(json.dumps({"step": "paper_slice_row", "error": str(err)}))
PY
cp "$WORK"/slice/run_log.jsonl "$OUT/" 2>/dev/null || true
echo "results: $RESULTS"
