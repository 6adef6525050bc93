# sevsim: `make test` and `make demo` work on a machine with only Python and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A third-party plugin package, installed and tested with sevsim on every run.
EXAMPLE := examples/sevsim-hv-counter

.PHONY: test demo bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project's (or the example plugin's) metadata changes.
$(STAMP): $(BIN)/python pyproject.toml $(EXAMPLE)/pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]' -e $(EXAMPLE)
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check core plugins tests examples benchmarks

test: $(STAMP) lint
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/sevsim run

clean:
	rm -rf $(VENV) build *.egg-info core/*.egg-info .pytest_cache .ruff_cache \
		$(EXAMPLE)/build $(EXAMPLE)/src/*.egg-info

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
