# Two commands for a newcomer: `make demo` and `make test`. Each bootstraps .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Optional extras installed on top of dev, comma-separated (CI: EXTRAS=ray). Without them the
# tests that need one skip, naming it.
EXTRAS ?=
comma := ,
EXTRA_STAMPS := $(foreach e,$(subst $(comma), ,$(EXTRAS)),$(VENV)/.stamp-$(e))

.PHONY: venv demo test lint typecheck unit proto bench engines-deps engines-start engines-stop slurm-start slurm-stop ray-start ray-stop clean

$(VENV)/.stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV)/.stamp-%: $(VENV)/.stamp
	$(BIN)/pip install -q -e '.[$*]'
	touch $@

venv: $(VENV)/.stamp $(EXTRA_STAMPS)

demo: venv
	$(BIN)/dspy-infra demo

lint: venv
	$(BIN)/ruff check dspy_infra tests benchmarks examples
	$(BIN)/ruff format --check dspy_infra tests benchmarks examples
	$(BIN)/lint-imports

# The tests import their helpers as top-level modules (engines, strategies): checked from tests/.
typecheck: venv
	$(BIN)/mypy
	$(BIN)/mypy benchmarks examples
	cd tests && $(abspath $(BIN))/mypy --config-file ../pyproject.toml --explicit-package-bases .

unit: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

proto: venv
	$(BIN)/python scripts/gen_proto.py

# Every row of issue 11's table, each with its ratio to its floor or peer (Ray and Celery run
# where installed: pip install -e '.[bench]'); each script's last line is JSON, its output is
# kept in $(BENCH_OUT), and the last step prints the whole table from them. The 10-minute
# soak is separate: $(BIN)/python benchmarks/memory.py --soak 600.
BENCH_OUT ?= .bench
bench: SHELL := /bin/bash
bench: .SHELLFLAGS := -o pipefail -c
bench: venv
	mkdir -p $(BENCH_OUT) && rm -f $(BENCH_OUT)/*.out
	$(BIN)/python -u benchmarks/scheduler.py | tee $(BENCH_OUT)/scheduler.out
	$(BIN)/python -u benchmarks/exec_handler.py | tee $(BENCH_OUT)/exec_handler.out
	$(BIN)/python -u benchmarks/rpc.py | tee $(BENCH_OUT)/rpc.out
	$(BIN)/python -u benchmarks/startup.py | tee $(BENCH_OUT)/startup.out
	$(BIN)/python -u benchmarks/memory.py | tee $(BENCH_OUT)/memory.out
	$(BIN)/python -u benchmarks/services.py | tee $(BENCH_OUT)/services.out
	$(BIN)/python -u benchmarks/workflows.py | tee $(BENCH_OUT)/workflows.out
	# The ray executor against bare Ray on the two-node cluster (make ray-start; needs EXTRAS=ray).
	if $(BIN)/python -c 'import ray' 2>/dev/null; then RAY_AUTH_MODE=token $(BIN)/python -u benchmarks/executors.py | tee $(BENCH_OUT)/executors.out; else echo 'benchmarks/executors.py: skipped (no ray: make venv EXTRAS=ray)'; fi
	$(BIN)/python benchmarks/summary.py $(BENCH_OUT)

# As root on Debian: the engines and servers the engine tests use (what CI installs).
engines-deps:
	apt-get update && apt-get install -y $$(cat scripts/apt-packages.txt)

engines-start:
	bash scripts/engines.sh start

engines-stop:
	bash scripts/engines.sh stop

slurm-start:
	bash scripts/slurm.sh start

slurm-stop:
	bash scripts/slurm.sh stop

# A two-node Ray cluster on this machine (head on 127.0.0.1:26379); needs EXTRAS=ray.
ray-start: venv
	bash scripts/ray.sh start

ray-stop:
	bash scripts/ray.sh stop

clean:
	rm -rf $(VENV) build *.egg-info
