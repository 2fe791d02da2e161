# Two commands do everything on a fresh clone: `make run` (main job) and `make test`.
# Every target depends on the virtual environment, so nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install browser run demo test evaluate tensorboard clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

## main job: the two-phase recipe with offline ImageNet weights, on the embedded sample of real PBC cells with
## epoch limits for about 10 minutes on 2 cores (+experiment=sample); with ARGS="data.root=DIR" (or data.manifest=CSV)
## the full recipe on your cells (+experiment=two_phase_lite0); an +experiment=NAME in ARGS is used as it is
RUN_EXPERIMENT = $(if $(filter data.root=% data.manifest=%,$(ARGS)),two_phase_lite0,sample)
run: install
	$(PY) -m leukonet.train $(if $(filter +experiment=%,$(ARGS)),,+experiment=$(RUN_EXPERIMENT)) $(ARGS)

## the whole two-phase flow on synthetic cells with a tiny backbone, in about a minute
demo: install
	$(PY) -m leukonet.train +experiment=demo $(ARGS)

## the web page's browser test drives Debian's chromium (Playwright downloads no browser): installed when
## missing and apt-get can (root, or password-less sudo); otherwise that one test is skipped, never the build
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then AS=""; elif sudo -n true 2>/dev/null; then AS="sudo -n"; else AS=no; fi; \
	  if [ "$$AS" = no ]; then echo "chromium not installed and not root: tests/test_serve.py's browser test will be skipped"; \
	  else echo "installing chromium (apt-get) for the browser test"; \
	    { $$AS apt-get update -qq && $$AS env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	      || echo "could not install chromium: the browser test will be skipped"; fi; \
	fi

## the tests in parallel, a worker a core (pytest-xdist; tests/conftest.py gives each its share of torch threads),
## idle workers taking queued tests from busy ones; ARGS="-n 0" runs them in one process
test: install browser
	$(PY) -m pytest -n auto --dist worksteal $(ARGS)

evaluate: install
	$(PY) -m leukonet.evaluate $(ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs --host 127.0.0.1

clean:
	rm -rf $(VENV) .pytest_cache
