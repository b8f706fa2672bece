# prumerge: set up, test, demo, benchmark. Everything installs into .venv from the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test lint demo bench zoo clean

setup: $(STAMP)

# torch is pinned to 2.13.0: on these machines that is the CPU build on disk; GPU users get the normal wheel.
# constraints.txt pins the rest to the versions the tests last passed with.
$(STAMP): pyproject.toml constraints.txt tests/tensorrt_versions.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[onnx,dev,eval-runtime]"
	$(BIN)/pip install -q -c constraints.txt -e ".[rtx]" || echo "tensorrt-rtx-cu12 is unavailable: the TensorRT-RTX build test will skip"
	@# lmms-eval without its declared dependencies (torchvision, a CUDA torch, wandb, opencv...): its evaluator
	@# imports none of them; eval-runtime holds what it does import. Last, so that no later install lists them.
	$(BIN)/pip install -q --no-deps -c constraints.txt lmms-eval
	@# TensorRT's pure-Python plugin package, one wheel per supported minor version, for the plugin tests
	grep -v '^#' tests/tensorrt_versions.txt | while read -r v; do \
		$(BIN)/pip download -q --no-deps --only-binary=:all: -d $(VENV)/tensorrt-wheels "tensorrt-cu12-bindings==$$v" || exit 1; \
	done
	touch $(STAMP)

# One pytest worker per core (at most 4): most of the suite is single-threaded Python around tiny models.
test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist worksteal --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: setup
	$(BIN)/prumerge demo --force

# Reducer vs the official loop, tower + reducer vs the plain tower, the plugin kernels' PTX and bytes read, then the
# reference `prumerge bench`.
bench: setup
	$(BIN)/python -m benchmarks.reducer_speed
	$(BIN)/python -m benchmarks.kernel_report
	$(BIN)/python -m benchmarks.reference

# Retrain the embedded models in stages: CLIP, LLaVA (about an hour on 2 cores with native bf16), then the LLaVA
# fine-tuned with each reducer active. Stages checkpoint to ~/.cache/prumerge/zoo and resume when rerun; a stage
# that is up to date is kept. Without native bf16 it refuses unless FORCE=1. MINUTES=M checkpoints and stops after
# M minutes of training, for a build that spans sessions (rerun to resume).
zoo: setup
	$(BIN)/python -m prumerge_cli.zoo.build $(if $(FORCE),--force) $(if $(MINUTES),--minutes $(MINUTES))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
