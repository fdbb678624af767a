# Everything a fresh machine needs: `make demo` and `make test` set up .venv first.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint browser bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch pinned and installed alone: pip takes this exact release (CPU use; CUDA when present)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,lite12]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/anomalens demo -o demo-output

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Debian's chromium for the review page's browser test: installed when missing (as root), else explained
browser:
	bash .ci/browser.sh

test: lint browser
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_foundation.py
