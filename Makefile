# Two commands: `make run` (the quick SimCLR job) and `make test` (the test suite). Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The offline CIFAR-10 archive of this project's build machines; copied into data/ when data/ has no CIFAR-10.
STAGED_CIFAR ?= ../shared/data/cifar10-jpeg.tar.gz

.PHONY: run test lint data clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

data:
	@mkdir -p data
	@if [ -f "$(STAGED_CIFAR)" ] && [ ! -e data/cifar-10-batches-py ] && [ -z "$$(ls data/*.tar.gz 2>/dev/null)" ]; then \
		cp "$(STAGED_CIFAR)" data/ && echo "staged $(STAGED_CIFAR) into data/"; fi

run: $(VENV)/.installed data
	$(PY) run.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check simclr_lib tests run.py

clean-venv:
	rm -rf $(VENV)
