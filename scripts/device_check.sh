#!/usr/bin/env bash
# The one command for a lent GPU machine (Python 3.12, PyTorch, timm; no Flower, Ray, omegaconf,
# datasets, no network), run from the repo root with outputs/device-carry carried along
# (`make device-carry` builds it here; docs/gpu.md, "Running the GPU checks on a lent machine"):
#   bash scripts/device_check.sh OUT [SECONDS] [SEEDS...]
# Unpacks outputs/device-carry/site.tar.xz (Flower, Ray, ...) into a temp folder first on
# PYTHONPATH (then the repo), the Fashion-MNIST idx files gzipped again into another, checks that
# the runs' modules import (exit 3 if not, the traceback in OUT/gpu-check.log), then runs
# scripts/gpu_check.sh OUT DATA SECONDS SEEDS... (SECONDS, default 540, less the time unpacking
# took and what benchmarks/ray_engine.py took before it). Its temp folders go at exit. DEVICE_CARRY names another bundle folder; CLIENT_GPUS,
# NUM_SUPERNODES, EXTRA_RUN_CONFIG reach gpu_check.sh (tests/test_gpu_check.py runs this on a
# CPU with a stand-in bundle and a tiny config). Exit 2: no bundle.
set -uo pipefail
out=${1:?usage: scripts/device_check.sh OUT [SECONDS] [SEEDS...]}
seconds=${2:-540}
shift 2 || shift $#
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
carry=${DEVICE_CARRY:-$repo/outputs/device-carry}
for f in site.tar.xz fashion-mnist.tar.xz; do
  if [ ! -f "$carry/$f" ]; then
    echo "[device-check] $carry/$f missing: build it with \`make device-carry\` on the CPU" \
      "machine and carry outputs/device-carry" >&2
    exit 2
  fi
done
start=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out" "$tmp/site" "$tmp/data"
out=$(cd "$out" && pwd)
log="$out/gpu-check.log"
tar xJf "$carry/site.tar.xz" -C "$tmp/site" || { echo "[device-check] cannot unpack site" >&2; exit 1; }
tar xJf "$carry/fashion-mnist.tar.xz" -C "$tmp/data" || { echo "[device-check] cannot unpack data" >&2; exit 1; }
for f in "$tmp"/data/*-ubyte; do gzip -1 "$f"; done
export PYTHONPATH="$tmp/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
cd "$repo" || exit 1
echo "[device-check] site and data unpacked under $tmp in $(( $(date +%s) - start )) s" | tee -a "$log"
# What the carried tree still lacks here: the requirements of the runs' distributions that are
# not installed (a hint for PACKAGES in scripts/pack_device_carry.py), then the imports that count.
python3 - >>"$log" 2>&1 <<'PY'
import importlib.metadata as md
import re
missing = set()
for dist in ("flwr", "ray", "datasets", "flwr-datasets", "omegaconf", "timm", "torch"):
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        missing.add(dist)
        continue
    for req in reqs:
        name, _, marker = req.partition(";")
        try:
            from packaging.markers import Marker
            if marker.strip() and not Marker(marker).evaluate({"extra": ""}):
                continue
        except ImportError:
            if "extra" in marker:
                continue
        name = re.match(r"\s*([A-Za-z0-9._-]+)", name)[1]
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.add(f"{name} (for {dist})")
print("[device-check] requirements not installed:", ", ".join(sorted(missing)) or "none")
PY
modules="flwr.cli.app flwr.superlink.cli flwr.supernode.cli flwr.supercore.cli flwr.simulation.app
ray omegaconf datasets flwr_datasets timm fedmae_flwr.server_app fedmae_flwr.client_app"
if ! python3 -c "import importlib, sys
for m in sys.argv[1:]: importlib.import_module(m)
print('[device-check] imports ok')" $modules >>"$log" 2>&1; then
  echo "[device-check] an import failed (exit 3):" >&2
  tail -n 20 "$log" >&2
  exit 3
fi
# Flower's Ray engine at scale first (benchmarks/ray_engine.py: 1,000 SuperNodes, 10 / 20 / 50
# clients per round, $RAY_CLIENT_GPUS of the GPU each; RAY_ENGINE_SECONDS, default 150, 0 skips
# it); its page and results go to OUT/ray-engine, its runs and node cache stay in the temp folder.
ray_seconds=${RAY_ENGINE_SECONDS:-150}
if (( ray_seconds > 0 )); then
  mkdir -p "$out/ray-engine"
  timeout $(( ray_seconds + 120 )) python3 -m benchmarks.ray_engine \
    --supernodes "${RAY_SUPERNODES:-1000}" --clients ${RAY_CLIENTS:-10 20 50} \
    --client-gpus ${RAY_CLIENT_GPUS:-0.1} --seconds "$ray_seconds" --data "$tmp/data" \
    --out "$tmp/ray-engine" --docs "$out/ray-engine" >>"$log" 2>&1
  echo "[device-check] ray_engine exit $? after $(( $(date +%s) - start )) s" | tee -a "$log"
  cp "$tmp"/ray-engine/{results.json,command.txt} "$out/ray-engine/" 2>/dev/null
fi
left=$(( seconds - ($(date +%s) - start) ))
bash scripts/gpu_check.sh "$out" "$tmp/data" "$left" "$@"
rc=$?
echo "[device-check] gpu_check.sh exit $rc after $(( $(date +%s) - start )) s in all" | tee -a "$log"
tail -n 30 "$log"
ls -l "$out"
exit $rc
