# sevsim: `make test` and `make demo` work on a machine with only Python and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A third-party plugin package, installed and tested with sevsim on every run.
EXAMPLE := examples/sevsim-hv-counter

.PHONY: test test-slow demo bench fuzz lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project's (or the example plugin's) metadata changes.
$(STAMP): $(BIN)/python pyproject.toml $(EXAMPLE)/pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]' -e $(EXAMPLE)
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check core plugins tests examples benchmarks fuzz

# mypy over core/ and plugins/ laid out as the package they are installed as (sevsim,
# sevsim.plugins, which mypy cannot read from pyproject's package-dir mapping): a tree
# of symlinks made afresh under build/ on every run. Part of `test`.
MYPY_TREE := build/mypy
typecheck: $(STAMP)
	rm -rf $(MYPY_TREE)
	mkdir -p $(MYPY_TREE)/sevsim
	ln -s $(CURDIR)/core/* $(MYPY_TREE)/sevsim/
	ln -s $(CURDIR)/plugins $(MYPY_TREE)/sevsim/plugins
	cd $(MYPY_TREE) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p sevsim

test: $(STAMP) lint typecheck
	$(BIN)/pytest -q

# The slow tests: Debian's OVMF booted to the UEFI Shell with 1 and 4 vCPUs (minutes each).
test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

demo: $(STAMP)
	$(BIN)/sevsim run

clean:
	rm -rf $(VENV) build *.egg-info core/*.egg-info .pytest_cache .ruff_cache \
		$(EXAMPLE)/build $(EXAMPLE)/src/*.egg-info

# The benchmark table (docs/benchmarks.md); BENCH_QUICK=1 for a run of a few minutes.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench

# A fuzzing campaign against the reference's rules; findings go to fuzz-findings/.
# FUZZ_SECONDS and FUZZ_SEED choose its length and its start.
FUZZ_SECONDS ?= 60
FUZZ_SEED    ?= 1
fuzz: $(STAMP)
	$(BIN)/python -m fuzz.campaign --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED) --out fuzz-findings
