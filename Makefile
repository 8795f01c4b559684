# The two commands of the README. Both create .venv on first use and install everything the
# project needs on a CPU machine (torch first, pinned, so pip takes the local CPU build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[train,gpu,test]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) tools/demo.py --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out
