# The two commands: `make demo` and `make test`. Each builds .venv from nothing but Python.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
# pip's own output without this machine's index-location chatter; pip's exit code survives.
QUIET_PIP := 2>&1 | { grep -v '^WARNING: Location' || true; }
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
BENCH ?=

LEGACY := .venv-legacy
LEGACY_STAMP := $(LEGACY)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck pytest pytest-legacy legacy-venv bench venv clean broker postgres deb deb-tools

venv: $(STAMP)

$(STAMP): pyproject.toml
	@bash scripts/ensure-venv.sh "$(PYTHON)" "$(VENV)"
	$(PY) -m pip install --quiet --upgrade pip $(QUIET_PIP)
	$(PY) -m pip install --quiet -e '.[device,finetune,cloud,train,dev]' $(QUIET_PIP)
	$(PY) -c "import ai_edge_litert, torch, litert_torch, ai_edge_quantizer, pytest"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: venv broker
	$(PY) scripts/demo.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# Spread over workers by test module (tests/support/scheduling.py): most tests wait on
# processes, brokers and databases, so more workers than cores pay.
PYTEST_WORKERS ?= 4
XDIST := -n $(PYTEST_WORKERS) --dist loadscope

pytest: venv broker postgres deb-tools
	$(PY) -m pytest $(XDIST)

postgres:
	@bash scripts/ensure-postgres.sh

# The device packages for this host's architecture (docs/packaging.md).
deb: deb-tools
	packaging/build-deb

# What building, linting and installing the .deb in a throwaway root takes, and strace (the
# outbox's fsyncs are checked at the system calls); installed when missing and we can
# (root + apt-get), else the tests that need them say they skipped and why.
DEB_TOOLS := dpkg-buildpackage:dpkg-dev dh:debhelper lintian:lintian mmdebstrap:mmdebstrap \
  systemd-nspawn:systemd-container strace:strace
deb-tools:
	@missing=""; for pair in $(DEB_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	[ -x /usr/bin/python3.11 ] && /usr/bin/python3.11 -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "package tools missing:$$missing; apt-get install"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
	      || echo "!!! apt-get install$$missing FAILED: the package tests will fail under CI" >&2; \
	  else \
	    echo "!!! WARNING: missing$$missing (needs root and apt-get): the .deb tests will be SKIPPED" >&2; \
	  fi; \
	fi

# The tests (and the demo) start their own Mosquitto on a free loopback port; install the
# package when it is missing and we can (root + apt-get). The system service is not used.
broker:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "mosquitto missing: apt-get install mosquitto"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null \
	      || echo "!!! apt-get install mosquitto FAILED" >&2; \
	  fi; \
	  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2; \
	    echo "!!! WARNING: mosquitto is not installed and could not be installed here" >&2; \
	    echo "!!! (needs root and apt-get). Every broker test will be SKIPPED." >&2; \
	    echo "!!! Install it: sudo apt-get install mosquitto   (or brew install mosquitto)" >&2; \
	    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2; \
	  }; \
	}

RUNTIME_TESTS := $(addprefix tests/integration/edged/,test_engine.py test_cli.py test_no_torch.py)

# The fallback runtime in its own environment: tflite-runtime needs numpy<2 and must work
# without ai-edge-litert installed.
$(LEGACY_STAMP): pyproject.toml
	@bash scripts/ensure-venv.sh "$(PYTHON)" "$(LEGACY)"
	$(LEGACY)/bin/python -m pip install --quiet -e '.[device-legacy,dev]' $(QUIET_PIP)
	$(LEGACY)/bin/python -c "import tflite_runtime.interpreter, pytest"
	@rm -f $(LEGACY)/.installed-*
	@touch $@

# tflite-runtime 2.14 publishes wheels for CPython up to 3.11 only.
LEGACY_PYTHON_OK := $(shell $(PYTHON) -c 'import sys; print(int(sys.version_info[:2] <= (3, 11)))')

ifeq ($(LEGACY_PYTHON_OK),1)
legacy-venv: $(LEGACY_STAMP)
pytest-legacy: $(LEGACY_STAMP) broker
	$(LEGACY)/bin/python -m pytest -p no:cacheprovider -n 2 --dist loadscope tests/unit $(RUNTIME_TESTS) --ignore=tests/unit/control_plane
else
legacy-venv:
pytest-legacy:
	@echo "!!! SKIPPED: the tflite-runtime fallback tests need Python <= 3.11 (tflite-runtime" >&2
	@echo "!!! 2.14 has no wheel for $$($(PYTHON) --version)); run: make test PYTHON=python3.11" >&2
endif

# Both environments and every service first (one apt-get at a time), then the two pytest runs
# side by side, each one's output printed whole when it ends.
test: lint typecheck broker postgres deb-tools legacy-venv
	$(MAKE) --no-print-directory -j2 --output-sync=target pytest pytest-legacy

bench: venv
	$(PY) -m bench.run $(BENCH)

clean:
	rm -rf $(VENV) $(LEGACY) build .pytest_cache .mypy_cache .ruff_cache
