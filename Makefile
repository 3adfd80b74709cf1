# Two commands: `make run` (the quick SimCLR job) and `make test` (the test suite). Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The offline CIFAR-10 archive of this project's build machines; copied into data/ when data/ has no CIFAR-10.
STAGED_CIFAR ?= ../shared/data/cifar10-jpeg.tar.gz

.PHONY: run test lint data figures notebooks clean-venv

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
	$(VENV)/bin/ruff check simclr_lib tests scripts run.py

# Execute every notebook (SMOKE = True; `make notebooks ARGS=--full` for the full-size path) and check it.
notebooks: $(VENV)/.installed data
	$(PY) scripts/run_notebooks.py $(ARGS)

# Regenerate docs/figures/ (the README's figures) from the package; RUN=runs/NAME picks the run for the t-SNE.
figures: $(VENV)/.installed data
	$(PY) scripts/make_figures.py $(RUN)

clean-venv:
	rm -rf $(VENV)
