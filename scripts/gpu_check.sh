#!/usr/bin/env bash
# The GPU checks, as one script for a machine lent for a few minutes (PyTorch, timm, a CUDA GPU;
# Flower, Ray and the other dependencies importable, on PYTHONPATH is enough):
#   1. the device tests (tests/test_devices.py, its CUDA-only test included);
#   2. the fmnist-gpu preset (10 x 4, past the CPU budget study's 5 x 4; docs/gpu.md) for each seed,
#      the way a user runs it: scripts/run.py (`flwr run` on a local SuperLink), Ray packing
#      clients on the GPU ($CLIENT_GPUS of it each, default 0.1), the server evaluating there.
# Usage: scripts/gpu_check.sh OUT_DIR FASHION_MNIST_DIR [SECONDS_FOR_ALL_RUNS] [SEEDS...]
# (a run that the time limit stops still leaves its metrics.jsonl).
# Writes OUT_DIR/gpu-check.log and OUT_DIR/fmnist-gpu-s<seed>-{summary.json,metrics.jsonl,config.yaml}
# (benchmarks/gpu_report.py reads them).
# NUM_SUPERNODES (100), CLIENT_GPUS (0.1) and EXTRA_RUN_CONFIG (appended) change the runs; the
# same path on a CPU with a tiny config is tests/test_gpu_check.py:
#   PATH=$PWD/.venv/bin:$PATH CLIENT_GPUS=0 NUM_SUPERNODES=6 EXTRA_RUN_CONFIG="depth=2 \
#     rounds-per-stage=1 local-epochs=1 ..." scripts/gpu_check.sh OUT FASHION_MNIST_DIR 300 0
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
  python3 -c "import torch, timm, flwr, ray; print('torch', torch.__version__, 'timm',
timm.__version__, 'flwr', flwr.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
  python3 -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -5
} >>"$log" 2>&1
# Flower only on PYTHONPATH (no console scripts): write those pip would have, since SuperLink and
# SuperExec start flower-superexec, flwr-simulation, ... by name from PATH.
if ! command -v flower-superlink >/dev/null; then
  mkdir -p "$runs/bin"
  python3 - "$runs/bin" <<'PY'
import importlib.metadata, pathlib, sys
for ep in importlib.metadata.entry_points(group="console_scripts"):
    if ep.value.startswith("flwr."):
        shim = pathlib.Path(sys.argv[1]) / ep.name
        call = ep.value.replace(":", ".") + "()"
        shim.write_text(f"#!{sys.executable}\nimport sys, {ep.module}\nsys.exit({call})\n")
        shim.chmod(0o755)
PY
  export PATH="$runs/bin:$PATH"
fi
deadline=$(( $(date +%s) + seconds ))
for seed in ${seeds[@]}; do
  name="fmnist-gpu-s$seed"
  start=$(date +%s)
  (( deadline - start < 60 )) && { echo "[gpu-check] $name: no time left" >>"$log"; continue; }
  python3 scripts/run.py --num-supernodes "${NUM_SUPERNODES:-100}" \
    --client-gpus "${CLIENT_GPUS:-0.1}" --timeout $(( deadline - start )) \
    --flwr-home "$runs/flwr-home" --run-config "preset='fmnist-gpu' seed=$seed \
data-path='$data' output-dir='$runs' run-name='$name' ${EXTRA_RUN_CONFIG:-}" >>"$log" 2>&1
  echo "[gpu-check] $name: exit $? after $(( $(date +%s) - start )) s" >>"$log"
  for f in summary.json metrics.jsonl config.yaml; do
    [ -f "$runs/$name/$f" ] && cp "$runs/$name/$f" "$out/$name-$f"
  done
done
rm -rf "$runs"
