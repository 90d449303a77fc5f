# Two commands for a fresh machine: `make demo` and `make test`. Each builds .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-thorough test-gpu bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (or run: make PY=python3.12 ...)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: otherwise pip resolves torch to a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q triton==3.7.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hhfft demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -n 2 -q tests

# On a machine with a CUDA GPU (the checkout on PYTHONPATH, see benchmarks/README.md).
test-gpu:
	python3 -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
