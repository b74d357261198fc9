# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints-cpu.txt | cksum | cut -d' ' -f1)
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast test-gpu lint bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt torch
	$(PIP) install -q -c constraints-cpu.txt -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raysrec demo --output $(DEMO_DIR)

test: install
	$(PY) -m pytest -q

# The pure tests (no Ray, Serve or subprocess cluster): under 3 minutes.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The CUDA tests (tests/gpu, marker gpu): on a GPU machine; elsewhere they are skipped.
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu

lint: install
	$(VENV)/bin/ruff check raysrec jobs serve tests bench

bench: install
	$(PY) bench/prepare.py

clean:
	rm -rf $(VENV) runs .pytest_cache
