# Two commands on a fresh machine (Python 3.11; no GPU needed):
#   make run    set up, then run the main job on the bundled model
#   make test   set up, then run the test suite (what CI runs)
# The first use builds .venv from the pinned requirements; later uses reuse it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Shared cores: one BLAS thread per process (LAPACK-heavy phases run 10x+
# faster than with OpenBLAS's default threads on a loaded 2-core machine).
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: run test format setup

setup: $(VENV)/.installed

# Third-party Linen models for two tests, transformers' Flax Llama and
# gemma's Transformer: their pins conflict with requirements.txt (or their
# declared dependencies are far more than they import), so they live in a
# folder of their own (requirements-dev.txt says what and why). Each test has
# a process of its own: importing gemma patches nn.Module.param for every
# Linen module (transformers' RMSNorm init then fails).
DEV_SITE := .venv-dev-site
$(DEV_SITE)/.installed: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --no-deps --target $(DEV_SITE) -r requirements-dev.txt
	touch $@

# The package is installed editable, without build isolation: setup.py
# compiles its LAPACK fold extension (C++, g++) against the jaxlib just
# installed.
$(VENV)/.installed: requirements.txt requirements-assets.txt pyproject.toml \
		setup.py ctxlr/linalg/_lapack_fold.cc
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-assets.txt
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $@

run: setup
	$(BIN)/python launch.py --config=experiments/configs/compress.py

# Formatting (pyink, the Flax/optax formatter), the docstring examples, tests.
test: setup $(DEV_SITE)/.installed
	$(BIN)/pyink --check --diff ctxlr experiments tests launch.py conftest.py setup.py
	$(BIN)/python -m pytest -q --doctest-modules ctxlr
	PYTHONPATH=$(DEV_SITE) $(BIN)/python -m pytest -q tests/test_third_party_hf.py
	PYTHONPATH=$(DEV_SITE) $(BIN)/python -m pytest -q tests/test_third_party_gemma.py
	$(BIN)/python -m pytest -q tests

format: setup
	$(BIN)/pyink ctxlr experiments tests launch.py conftest.py setup.py
