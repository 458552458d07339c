# Two entry points for a fresh machine (README "Quick start"):
#   make default   install into .venv (first use only) and run the embedded toy default
#   make test      install into .venv (first use only) and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install default test test-fast smoke clean-venv
install: $(STAMP)

# torch goes first with its exact pin so pip takes the CPU wheel (a bare `torch` pulls a 5 GB CUDA build);
# streaming goes last with --no-deps (see requirements-nodeps.txt for why).
$(STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip==25.2
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -c "import torch, diffusers, deepspeed, sklearn; print('installed torch', torch.__version__)"
	touch $(STAMP)

default: $(STAMP)
	$(PY) -m trainer.main recipes/toy/default.yaml

smoke: $(STAMP)
	$(PY) -m trainer.main recipes/tiny/toy_smoke.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=8 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not full_default" tests

clean-venv:
	rm -rf $(VENV)
