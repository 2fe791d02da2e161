# Two commands do everything on a fresh clone: `make run` (main job) and `make test`.
# Every target depends on the virtual environment, so nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install run demo test test-fast evaluate tensorboard clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

## main job: the two-phase recipe with offline ImageNet weights; synthetic cells unless ARGS="data.root=DIR"
run: install
	$(PY) -m leukonet.train +experiment=two_phase_lite0 $(ARGS)

## the whole two-phase flow on synthetic cells with a tiny backbone, in about a minute
demo: install
	$(PY) -m leukonet.train +experiment=demo $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

evaluate: install
	$(PY) -m leukonet.evaluate $(ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs --host 127.0.0.1

clean:
	rm -rf $(VENV) .pytest_cache
