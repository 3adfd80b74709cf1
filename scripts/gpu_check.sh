#!/usr/bin/env bash
# The one prepared GPU check (about 8.5 minutes on one H100/H200): `simclr bench`, then the cifar10-r18 recipe
# trained for as many epochs as fit 420 s (--time-budget) and evaluated as usual (full-test-set kNN + linear probe).
# Usage: bash scripts/gpu_check.sh [OUT_DIR [EXTRA RUN.PY FLAGS]]   (OUT_DIR default: $OUT, else gpu_check/)
# Needs CIFAR-10 under data/ (e.g. the staged data/cifar10-jpeg.tar.gz); runs from source, nothing installed.
# Writes OUT_DIR/environment.txt, bench.json + bench.log, cifar10-r18-420s/ (summary.json, eval.json, metrics.jsonl,
# figures, report.md; the checkpoint is deleted) + cifar10-r18-420s.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then OUT_DIR=$1; shift; else OUT_DIR=${OUT:-gpu_check}; fi
BUDGET=${BUDGET:-420}
mkdir -p "$OUT_DIR"
export PYTHONPATH=.
{ nvidia-smi || true; nproc; python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" || true; } \
  > "$OUT_DIR/environment.txt" 2>&1
start=$(date +%s)
# 1. Benchmarks (about 1 minute): augmentation, loss, training step at batch 256 and 512 vs the PIL DataLoader path.
python run.py bench --steps 20 --out "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.log"
echo "bench: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/bench.log"
# 2. The time-boxed run: pretraining fitted to BUDGET seconds, then its evaluation (about 1 minute more).
#    A smaller t-SNE keeps the figures quick; the accuracies use the full train and test sets as always.
python run.py --preset cifar10-r18 --time-budget "$BUDGET" --tsne-points 500 --no-progress \
  --out "$OUT_DIR/cifar10-r18-${BUDGET}s" "$@" 2>&1 | tee "$OUT_DIR/cifar10-r18-${BUDGET}s.log"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/cifar10-r18-${BUDGET}s.log"
# the checkpoint is large and not needed back; the summary, metrics and figures are
rm -f "$OUT_DIR"/*/checkpoint.pt
