# Two commands do all the set-up on a machine with only Python >= 3.11:
#   make run    the main job (the digits experiment with its default config)
#   make test   the whole suite: ruff, pyright, pytest, the docs build, and a smoke
#               subset at the dependency floors
# Both build .venv on first use and reuse it afterwards (it is rebuilt only when
# pyproject.toml changes). `make test` builds .venv-min while pyright runs (each
# takes one core); pip skips byte-compiling what it installs (`--no-compile`:
# Python compiles the modules that are imported, on first import).
#   make docs      builds the documentation site into site/ (mkdocs build --strict)
#   make test-min  builds .venv-min with exactly the floor versions of pyproject.toml
#                  and runs the smoke subset there

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed
# The floors, read from pyproject.toml: every `name>=x` dependency becomes `name==x`.
MIN_PINS = $(shell $(PYTHON) -c 'import tomllib; print(" ".join(d.replace(">=", "==") for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
# A smoke subset touching the version-sensitive parts (JAX internals in vmap's key
# check and key_reuse's derivation check, optax's extra arguments, checkpoints,
# typecheck). It runs with XLA's optimisations on (EQX_RNG_TEST_OPTIMIZE=1; the main
# suite compiles with most of them off to save time), so the bitwise claims of
# training and resuming are also checked on optimised programs.
MIN_TESTS := tests/test_keys.py tests/test_contract.py tests/test_typecheck.py \
	tests/test_debug.py tests/test_derive_reuse.py tests/test_checkpoint.py \
	tests/test_train.py tests/test_vmap.py tests/test_optim.py
# Left out there (the main suite runs it): string keys' stability across Python's
# hash seeds (three subprocesses; eqx_rng's own blake2b hash, nothing from JAX).
MIN_DESELECT := \
	--deselect tests/test_keys.py::test_derive_string_stable_across_pythonhashseed

.PHONY: run test lint typecheck pytest docs test-min bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev,experiments,docs]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python experiments/digits.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/pyright

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

$(MIN_STAMP): pyproject.toml Makefile
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --no-compile $(MIN_PINS) "pytest>=8.0" "pytest-xdist>=3.6"
	$(MIN_VENV)/bin/python -m pip install --quiet --no-compile --no-deps -e .
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	EQX_RNG_TEST_OPTIMIZE=1 $(MIN_VENV)/bin/python -m pytest -q -n 2 -m "not slow" $(MIN_DESELECT) $(MIN_TESTS) $(PYTEST_ARGS)

# lint, then pyright and the .venv-min build side by side, then pytest, docs, test-min.
test: lint
	$(MAKE) --no-print-directory -j2 --output-sync=target typecheck $(MIN_STAMP)
	$(MAKE) --no-print-directory pytest docs test-min

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) $(MIN_VENV) site
