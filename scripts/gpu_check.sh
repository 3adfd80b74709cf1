#!/usr/bin/env bash
# The one prepared GPU job (one H100/H200, about TOTAL = 540 s in all; the run is stopped at TOTAL + 30 s):
# `run.py bench --compile` of the PRESET's (cifar10-r18-10min) step at its batch size (bf16, eager, then compiled),
# then the PRESET with --time-budget filling what is left, compiled if the bench says that trains more views in that
# time (the compile time, with the cache the bench left, taken off), and evaluated as usual (full-test-set kNN +
# linear probe), then the shipped encoder's folder made from it (scripts/ship_encoder.py). Measuring the compiled
# step costs the run its first, cold compilation (about a minute or two), whatever the decision.
# Usage: bash scripts/gpu_check.sh [OUT_DIR [EXTRA RUN.PY FLAGS]]   (OUT_DIR default: $OUT, else gpu_check/)
# Settings (environment): TOTAL (540), RESERVE (seconds kept for loading, evaluation and packing: 120),
#   PRESET (cifar10-r18-10min), PYTHON (python3), SHIP (make the shipped folder: 1 for cifar10-r18*, else 0), FINETUNE
#   (0; 1: add label-fraction fine-tuning to the shipped eval.json, about a minute or two more; EVAL_FLAGS for it),
#   BENCH_FLAGS (default "--batch-sizes <the preset's>"; e.g. "--batch-sizes 256,512,1024"), RUN (1; 0: the bench
#   alone), COMPILE (auto: the run is compiled when the bench says that pays; 1: compiled whatever the bench says;
#   0: neither compiles), BENCH_LIMIT (the bench is stopped after 240 s). The decision is for the preset's own
#   config: EXTRA RUN.PY FLAGS that change the step (--width, --batch-size) leave the run eager under auto.
#   A compiled run that fails before its first checkpoint is run once more, eager, in the time left.
# Needs CIFAR-10 under data/ (e.g. the staged data/cifar10-jpeg.tar.gz); runs from source, nothing installed.
# Writes at most 8 files to OUT_DIR (the device tool brings back 8, each under 16 MiB): environment.txt, bench.json,
# bench.log, run.log and results.tar.part-NN (the run folder without its checkpoint, and the shipped folder).
# Back here: python scripts/land_gpu_results.py OUT_DIR  puts the files into docs/results/ and runs/ (or by hand:
# cat OUT_DIR/results.tar.part-* | tar -x -C DIR  gives DIR/PRESET/ and DIR/pretrained-cifar10-r18/).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then OUT_DIR=$1; shift; else OUT_DIR=${OUT:-gpu_check}; fi
TOTAL=${TOTAL:-540}
RESERVE=${RESERVE:-120}
FINETUNE=${FINETUNE:-0}
COMPILE=${COMPILE:-auto}
case $COMPILE in auto | 0 | 1) ;; *) echo "COMPILE is auto, 1 or 0, not '$COMPILE'" >&2; exit 2 ;; esac
BENCH_LIMIT=${BENCH_LIMIT:-240}
PRESET=${PRESET:-cifar10-r18-10min}
case $PRESET in cifar10-r18*) SHIP=${SHIP:-1} ;; *) SHIP=${SHIP:-0} ;; esac  # the shipped encoder is a ResNet-18
PYTHON=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$OUT_DIR"
work=$(mktemp -d)
export PYTHONPATH=. PYTHONUNBUFFERED=1
# Whatever happens (a failed step, a NaN, the time cap), what exists is packed on the way out: the run folder
# without its checkpoints (their fp16 weights when nothing was shipped), and the shipped folder, in parts < 16 MiB.
pack() {
  if [ -f "$work/$PRESET/checkpoint.pt" ] && [ ! -e "$work/pretrained-cifar10-r18" ]; then  # keep its weights
    "$PYTHON" scripts/ship_encoder.py "$work/$PRESET" --weights-only "$work/$PRESET/weights-fp16.pt" || true
  fi
  rm -f "$work/$PRESET"/checkpoint*.pt
  names=(); for name in "$PRESET" pretrained-cifar10-r18; do [ -e "$work/$name" ] && names+=("$name"); done
  if [ ${#names[@]} -gt 0 ]; then tar -C "$work" -cf - "${names[@]}" | split -b 15M -d - "$OUT_DIR/results.tar.part-"; fi
  echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/run.log"
  rm -rf "$work"
}
trap pack EXIT
{ nvidia-smi || true; nproc; "$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" || true; } \
  > "$OUT_DIR/environment.txt" 2>&1
# 1. Benchmarks (a minute or two): augmentation, loss, the PRESET's training step (eager, then compiled with its
#    compile time, cold and cached) vs the PIL DataLoader path; TFLOPS, % of peak. The same step as the run's, so
#    the run's compilation finds the bench's in the compiler's on-disk cache.
bench_flags=(); if [ "$COMPILE" != 0 ]; then bench_flags=(--compile); fi
# the preset's batch size, the one the decision needs (this also checks PRESET before any work)
batch=$("$PYTHON" -c 'import sys; from simclr_lib.config import make_config
print(make_config(sys.argv[1]).batch_size)' "$PRESET")
bench_failed=0
# It is stopped after BENCH_LIMIT seconds (a compiler that takes too long costs the run no more than that); what it
# measured by then is in bench.json, which it writes after every part.
# shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
timeout -k 10 "$BENCH_LIMIT" \
  "$PYTHON" run.py bench --preset "$PRESET" --out "$OUT_DIR/bench.json" "${bench_flags[@]}" \
  ${BENCH_FLAGS:---batch-sizes $batch} 2>&1 \
  | tee "$OUT_DIR/bench.log" \
  || { bench_failed=1; echo "the bench failed or was stopped at BENCH_LIMIT (above); the run goes on" \
  | tee -a "$OUT_DIR/bench.log"; }
echo "bench: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/bench.log"
# RUN=0 stops here: the bench alone fits the minutes left after a run, e.g. issue 14's ResNet-50 memory table.
if [ "${RUN:-1}" = 0 ]; then exit "$bench_failed"; fi
# 2. The time-boxed run: pretraining fitted to what is left, then its evaluation. A smaller t-SNE keeps the figures
#    quick; the accuracies use the full train and test sets as always.
budget=$(( TOTAL - RESERVE - ($(date +%s) - start) ))
budget=$(( budget < 30 ? 30 : budget ))  # a slow bench leaves at least half a minute of pretraining
echo "pretraining budget: $budget s" | tee "$OUT_DIR/run.log"
# Compiled or eager: the bench's compiled and eager speeds of the preset's step (simclr_lib.bench.compile_decision;
# it reads the preset's own config: extra run.py flags such as --width are not part of the decision).
run_flags=()
decided=$(date +%s)
if [ "$COMPILE" = 1 ]; then run_flags=(--compile); echo "compile: yes (COMPILE=1)" | tee -a "$OUT_DIR/run.log"
elif [ "$COMPILE" = 0 ]; then echo "compile: no (COMPILE=0)" | tee -a "$OUT_DIR/run.log"
elif "$PYTHON" -m simclr_lib.bench "$OUT_DIR/bench.json" "$PRESET" "$budget" 2>&1 | tee -a "$OUT_DIR/run.log"; then
  run_flags=(--compile)
fi
budget=$(( budget - ($(date +%s) - decided) ))  # the decision's seconds (importing torch) come off the budget
train() {  # the run with flags "$@", stopped (SIGTERM: it checkpoints and exits; SIGKILL 15 s later) 30 s after
  # TOTAL, before the device tool's 600 s cap (timeout 0 would mean no limit: at least 1 s)
  local limit=$(( TOTAL + 30 - ($(date +%s) - start) ))
  timeout -k 15 "$(( limit < 1 ? 1 : limit ))" \
    "$PYTHON" run.py --preset "$PRESET" --time-budget "$budget" --tsne-points 500 --no-progress --out "$work/$PRESET" \
    "$@" 2>&1 | tee -a "$OUT_DIR/run.log"
}
status=0
train "${run_flags[@]}" "$@" || status=$?
if [ "$status" != 0 ]; then
  # A compiler that fails in the run (it did not in the bench) leaves no checkpoint: the run once more, eager, in
  # the time left. Any other failure ends the job here (pack keeps what the run wrote).
  budget=$(( TOTAL - RESERVE - ($(date +%s) - start) ))
  if [ ${#run_flags[@]} -gt 0 ] && [ ! -f "$work/$PRESET/checkpoint.pt" ] && [ "$budget" -ge 60 ]; then
    echo "the compiled run failed before its first checkpoint (above): once more, eager, $budget s" \
      | tee -a "$OUT_DIR/run.log"
    rm -rf "${work:?}/$PRESET"
    train "$@"
  else
    exit "$status"
  fi
fi
# 3. The shipped encoder's folder (fp16 weights, results, sha256; SHIP=0 skips it, e.g. for ResNet-50, whose weights
#    are over the folder's 25 MB). Over 25 MB it is still made, up to 64 MB, so the weights come back to be trimmed.
# FINETUNE=1 first adds label-fraction fine-tuning (1 % and 10 %, vs supervised) with `run.py evaluate`, whose
# eval-2.json is then shipped as eval.json (notebook 05 shows it on CPUs, where fine-tuning would take hours). It is
# stopped 45 s after TOTAL, leaving time to ship and pack; if it does not finish, the run's own eval.json is shipped.
ship_flags=()
if [ "$FINETUNE" = 1 ] && [ -f "$work/$PRESET/eval.json" ]; then
  limit=$(( TOTAL + 45 - ($(date +%s) - start) ))
  # shellcheck disable=SC2086  # EVAL_FLAGS is a list of flags
  timeout -k 5 "$(( limit < 1 ? 1 : limit ))" \
    "$PYTHON" run.py evaluate "$work/$PRESET" --label-fractions 1,10 --no-progress ${EVAL_FLAGS:-} 2>&1 \
    | tee -a "$OUT_DIR/run.log" || echo "fine-tuning did not finish: the run's eval.json is shipped" \
    | tee -a "$OUT_DIR/run.log"
  if [ -f "$work/$PRESET/eval-2.json" ]; then ship_flags=(--eval "$work/$PRESET/eval-2.json"); fi
fi
if [ "$SHIP" = 1 ] && [ -f "$work/$PRESET/eval.json" ]; then
  "$PYTHON" scripts/ship_encoder.py "$work/$PRESET" --out "$work/pretrained-cifar10-r18" "${ship_flags[@]}" 2>&1 \
    | tee -a "$OUT_DIR/run.log" \
    || "$PYTHON" scripts/ship_encoder.py "$work/$PRESET" --out "$work/pretrained-cifar10-r18" --max-mb 64 \
    "${ship_flags[@]}" 2>&1 | tee -a "$OUT_DIR/run.log"
fi
