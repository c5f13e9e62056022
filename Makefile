# Set-up and the few commands a user needs. `make install` is incremental: a second run with
# nothing changed only checks a stamp file.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install test test-fast test-floor demo lint format clean

install: $(STAMP)

# pip --no-compile: byte-compiling every installed file (the CUDA wheels' too) takes as long as
# the install itself; the import after it compiles the modules the package uses, once.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[dev,demo]'
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c 'import csae_plugin.cli, csae_plugin.demo, csae_plugin.evals.api, csae_plugin.evals.core, csae_plugin.evals.nces.main, csae_plugin.evals.probing, csae_plugin.training, pytest'
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The fast tests on the oldest dependencies pyproject.toml allows (.ci/floor-constraints.txt),
# in their own venv. By default torch comes from the package index pip is set up with (PyPI's
# Linux wheels are CUDA builds: about 3 GB with their nvidia packages, which run on the CPU as
# well); TORCH_INDEX adds an index to take it from, e.g. the CPU-only builds:
#   make test-floor TORCH_INDEX=https://download.pytorch.org/whl/cpu
FLOOR_VENV ?= .venv-floor
TORCH_INDEX ?=
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet --no-compile \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -c .ci/floor-constraints.txt -e '.[dev,demo]'
	$(FLOOR_VENV)/bin/python -m pip list | grep -E '^(sae-lens|sae-bench|transformer-lens|transformers|torch) '
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/sae_bench demo

lint: install
	$(VENV)/bin/ruff check csae_plugin evals tests examples
	$(VENV)/bin/ruff format --check csae_plugin evals tests examples

format: install
	$(VENV)/bin/ruff format csae_plugin evals tests examples
	$(VENV)/bin/ruff check --fix csae_plugin evals tests examples

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info .pytest_cache
