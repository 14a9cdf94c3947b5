#!/usr/bin/env bash
# The CUDA half of the tests and benchmarks, in parts that each run well inside 10 minutes on
# one H100/H200-class GPU. Needs torch alone (plus pytest for "tests"): no DeepSpeed, Ray,
# MLflow or WebDataset, so it runs on a bare CUDA machine from a plain checkout.
#
#   benchmarks/gpu_suite.sh PART [OUT_DIR]
#
# PART: tests | train | scaling | module | inference | loss | all
# OUT_DIR (default benchmarks/results): each part writes its JSON (*_cuda.json) and its log
# there. PYTHON (default python3) picks the interpreter.
set -euo pipefail

part=${1:-}
out=${2:-benchmarks/results}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1

case "$part" in
tests | train | scaling | module | inference | loss | all) ;;
*)
    sed -n '2,11p' "$0" >&2
    exit 2
    ;;
esac
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_suite: $py sees no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi

run() {  # run NAME CMD...: the command's output to the screen and to OUT_DIR/NAME.log
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
}

case "$part" in
tests)
    run gpu_tests "$py" -m pytest -q -p no:cacheprovider -m gpu tests/cdgcnet
    ;;
train)
    run train_step_cuda "$py" benchmarks/train_step.py --preset paper --compile \
        --json "$out/train_step_cuda.json"
    ;;
scaling)
    run cdgc_scaling_cuda "$py" benchmarks/cdgc_scaling.py --json "$out/cdgc_scaling_cuda.json"
    ;;
module)
    run cdgc_module_cuda "$py" benchmarks/cdgc_module.py --json "$out/cdgc_module_cuda.json"
    ;;
inference)
    run inference_cuda "$py" benchmarks/inference.py --json "$out/inference_cuda.json"
    ;;
loss)
    run ohem_loss_cuda "$py" benchmarks/ohem_loss.py --json "$out/ohem_loss_cuda.json"
    ;;
all)
    for p in tests train scaling module inference loss; do
        "$0" "$p" "$out"
    done
    ;;
esac
