#!/usr/bin/env bash
# The GPU checks, as one script for a machine lent for a few minutes (PyTorch, timm, a CUDA GPU;
# Flower and the other pure-Python dependencies installed beside it, no Ray):
#   1. the device tests (tests/test_devices.py, its CUDA-only test included);
#   2. the fmnist-gpu preset (the budget where pretraining paid, docs/budget.md) for each seed,
#      clients and server evaluation on the GPU, through fedmae_flwr.inprocess (the real
#      ServerApp run and ClientApp handlers; nodes one after the other, no Ray).
# Usage: scripts/gpu_check.sh OUT_DIR FASHION_MNIST_DIR [SECONDS_FOR_ALL_RUNS] [SEEDS...]
# (a run that the time limit cuts still leaves its metrics.jsonl).
# Writes OUT_DIR/gpu-check.log and OUT_DIR/fmnist-gpu-s<seed>-{summary.json,metrics.jsonl}.
set -uo pipefail
out=${1:?output folder}
data=${2:?folder with the Fashion-MNIST idx files}
seconds=${3:-500}
shift 3 || shift $#
seeds=("${@:-1 0}")
runs=$(mktemp -d)
log="$out/gpu-check.log"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, timm, flwr; print('torch', torch.__version__, 'timm', timm.__version__,
'flwr', flwr.__version__, 'cuda', torch.cuda.is_available())"
  python3 -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -5
} >>"$log" 2>&1
deadline=$(( $(date +%s) + seconds ))
for seed in ${seeds[@]}; do
  name="fmnist-gpu-s$seed"
  start=$(date +%s)
  (( deadline - start < 60 )) && { echo "[gpu-check] $name: no time left" >>"$log"; continue; }
  timeout $(( deadline - start )) python3 -m fedmae_flwr.inprocess --num-nodes 100 --run-config \
    "preset='fmnist-gpu' seed=$seed data-path='$data' output-dir='$runs' run-name='$name'" \
    >>"$log" 2>&1
  echo "[gpu-check] $name: exit $? after $(( $(date +%s) - start )) s" >>"$log"
  for f in summary.json metrics.jsonl; do
    [ -f "$runs/$name/$f" ] && cp "$runs/$name/$f" "$out/$name-$f"
  done
done
rm -rf "$runs"
