# The two README commands: `make run` and `make test`. Each sets itself up when needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
# Re-install when the pinned dependencies change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DATA_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NUM_SUPERNODES ?= 100
RUN_CONFIG ?=
RUN_NAME ?= fedmae-fmnist

.PHONY: run test lint setup data clean bench-quality bench-quality-finetune bench-budget \
	bench-ablations deploy-local device-carry

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required (python3.11 or python3)"; exit 1; }
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "Python 3.11 is required, found " + sys.version)'
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e ".[server,dev]"
	rm -f $(VENV)/.installed-* && touch $@

# Fashion-MNIST from Debian's archive (offline afterwards); needs root or sudo.
data: $(DATA_DIR)/train-images-idx3-ubyte.gz

$(DATA_DIR)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# The default federated pretraining through `flwr run` on a local SuperLink (simulation engine,
# $(NUM_SUPERNODES) virtual nodes); writes outputs/$(RUN_NAME)/ and prints its summary.
run: setup data
	$(VPY) scripts/run.py --num-supernodes $(NUM_SUPERNODES) --print-summary \
		--run-config "output-dir='$(CURDIR)/outputs' run-name='$(RUN_NAME)'" --run-config "$(RUN_CONFIG)"

# FedMAE against fedavg-mae, centralized, local and random-init on one budget (3 partitions x
# 3 seeds through `flwr run`; then bench-quality-finetune for the fine-tune column); writes docs/results.md and plots, and the runs' result files to docs/data/runs/bench-grid/ (restored from there where outputs/ lacks them). BENCH_ARGS narrows the grid.
bench-quality: setup data
	$(VPY) -m benchmarks.quality $(BENCH_ARGS)

# The grid's fine-tune column: every finished grid run's exported backbone fine-tuned under
# benchmarks.harness.FINETUNE_PROTOCOL (label subsets, lr chosen on validation; cached per run
# in finetune-protocol.json), then the report again with that column. Runs archived in
# docs/data/runs/bench-grid/ are restored first: on a fresh clone it reports their fine-tunes.
bench-quality-finetune: setup data
	$(VPY) -m benchmarks.grid_finetune --out outputs/bench-grid
	$(VPY) -m benchmarks.quality --report-only $(BENCH_ARGS)

# Does pretraining pay? fedmae against random init over budgets R x E, under the grid's
# evaluation and fine-tune protocol (runs and fine-tunes cached in outputs/bench-grid);
# writes docs/budget.md (its runs archived in docs/data/runs/bench-grid/, as bench-quality's).
bench-budget: setup data
	$(VPY) -m benchmarks.budget $(BENCH_ARGS)

# One design choice at a time (mask ratio, next-block init, decoder, depth); docs/ablations.md.
bench-ablations: setup data
	$(VPY) -m benchmarks.ablations $(BENCH_ARGS)

# A secure federation on this machine: TLS, SuperNode authentication and a SuperLink database,
# N SuperNodes reading their own (synthetic) image folders, one short `flwr run`; everything
# generated under .deploy-local/ and every process ended. deploy/README.md: real devices.
N ?= 3
deploy-local: setup
	$(VPY) -m scripts.deploy_local --supernodes $(N)

test: setup
	$(VPY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs .flwr .pytest_cache .ruff_cache .deploy-local .cache

# What a lent GPU machine needs carried (docs/gpu.md, "Running the GPU checks on a lent machine"):
# outputs/device-carry/{site,fashion-mnist}.tar.xz; needs PyPI.
device-carry: setup data
	$(VPY) scripts/pack_device_carry.py --data-dir $(DATA_DIR)
