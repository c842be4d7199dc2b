# The two commands: `make demo` and `make test`. Each builds .venv from nothing but Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
BENCH ?=

LEGACY := .venv-legacy
LEGACY_STAMP := $(LEGACY)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck pytest pytest-legacy bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@bash scripts/ensure-venv.sh "$(PYTHON)" "$(VENV)"
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install --quiet -e '.[device,train,dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import ai_edge_litert, torch, litert_torch, ai_edge_quantizer, pytest"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: venv
	$(PY) scripts/demo.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv
	$(PY) -m pytest

# The fallback runtime in its own environment: tflite-runtime needs numpy<2 and must work
# without ai-edge-litert installed.
$(LEGACY_STAMP): pyproject.toml
	@bash scripts/ensure-venv.sh "$(PYTHON)" "$(LEGACY)"
	$(LEGACY)/bin/python -m pip install --quiet -e '.[device-legacy,dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(LEGACY)/bin/python -c "import tflite_runtime.interpreter, pytest"
	@rm -f $(LEGACY)/.installed-*
	@touch $@

pytest-legacy: $(LEGACY_STAMP)
	$(LEGACY)/bin/python -m pytest -p no:cacheprovider tests/unit tests/integration/edged

test: lint typecheck pytest pytest-legacy

bench: venv
	$(PY) -m bench.run $(BENCH)

clean:
	rm -rf $(VENV) $(LEGACY) build .pytest_cache .mypy_cache .ruff_cache
