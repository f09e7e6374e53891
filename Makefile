# Two commands on a fresh machine:  `make demo` (runs the shipped example) and `make test`.
# Each creates the virtual environment .venv on first use (Python >= 3.11).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
export OPENBLAS_NUM_THREADS := 1
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: demo test test-slow test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "qcbed needs Python >= 3.11 (set PYTHON=python3.x)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qcbed demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m ''

bench: $(STAMP)
	$(VENV)/bin/python bench/bloch.py

clean:
	rm -rf $(VENV) results/demo
