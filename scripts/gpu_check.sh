#!/usr/bin/env bash
# One time-boxed GPU check (about 7 minutes): a 1-epoch cifar10-r18 run that also measures the epoch time,
# then cifar10-r18 shortened to as many epochs as fit BUDGET seconds of pretraining, evaluated as usual.
# Usage: bash scripts/gpu_check.sh [OUT_DIR [EXTRA RUN.PY FLAGS]]   (OUT_DIR default: $OUT, else gpu_check/).
# Needs CIFAR-10 under data/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then OUT_DIR=$1; shift; else OUT_DIR=${OUT:-gpu_check}; fi
BUDGET=${BUDGET:-300}
mkdir -p "$OUT_DIR"
export PYTHONPATH=.
{ nvidia-smi || true; python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } \
  > "$OUT_DIR/environment.txt" 2>&1
python run.py --preset cifar10-r18 --epochs 1 --knn-every 1 --probe-epochs 10 --no-progress \
  --out "$OUT_DIR/epoch-timing" "$@" 2>&1 | tee "$OUT_DIR/epoch-timing.log"
EPOCHS=$(python -c "import json; s = json.load(open('$OUT_DIR/epoch-timing/summary.json')); \
print(max(1, int($BUDGET / s['pretrain_seconds'])))")
echo "epochs that fit ${BUDGET}s: $EPOCHS" | tee -a "$OUT_DIR/epoch-timing.log"
python run.py --preset cifar10-r18 --epochs "$EPOCHS" --no-progress --out "$OUT_DIR/cifar10-r18-short" "$@" \
  2>&1 | tee "$OUT_DIR/cifar10-r18-short.log"
# the checkpoint is large and not needed back; the summary, metrics and figures are
rm -f "$OUT_DIR"/*/checkpoint.pt
