# netplugin — `make run` and `make test` set everything up on a fresh Debian
# machine (as root).  Variables: CONFIG (plugin config for `make run`),
# PYTEST_ARGS (extra pytest arguments), PYTHON (interpreter for the venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= plugin.cfg
PYTEST_ARGS ?=

.PHONY: install run test unit integration bench system-deps managed-plugin clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || scripts/system-deps.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: install
	./plugin -f $(CONFIG)

system-deps:
	scripts/system-deps.sh

test: system-deps install
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests

unit: install
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests/unit

integration: system-deps install
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests/integration

# build/managed-plugin/ (config.json + rootfs/) for `docker plugin create`;
# no registry needed: the Debian base is debootstrapped and cached in build/.
managed-plugin: install
	scripts/managed-plugin.sh $(PY)

bench: system-deps install
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
