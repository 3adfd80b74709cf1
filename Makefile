# `make run` (the quick SimCLR job), `make test` (the test suite), `make lab` (JupyterLab on the notebooks).
# Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The offline CIFAR-10 archive of this project's build machines; copied into data/ when data/ has no CIFAR-10.
STAGED_CIFAR ?= ../shared/data/cifar10-jpeg.tar.gz

.PHONY: run test lint data figures notebooks executed-notebooks lab browser-check clean-venv

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

# JupyterLab and ipywidgets in the same environment, then open run.ipynb (the numbered notebooks are in notebooks/).
$(VENV)/.lab-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,lab]"
	touch $@

lab: $(VENV)/.lab-installed data
	$(VENV)/bin/jupyter lab run.ipynb $(ARGS)

# Notebook 01 in a real browser: JupyterLab + headless Chromium (apt install chromium), run it, move a slider.
browser-check: $(VENV)/.lab-installed data
	$(PY) -m pip install --quiet playwright
	$(PY) scripts/browser_check.py

# Execute every notebook (SMOKE = True; `make notebooks ARGS=--full` for the full-size path) and check it.
notebooks: $(VENV)/.installed data
	$(PY) scripts/run_notebooks.py $(ARGS)

# The notebooks run on their full path, kept with their outputs in docs/executed/ (readable without running anything).
executed-notebooks: $(VENV)/.installed data
	$(PY) scripts/run_notebooks.py --full --out docs/executed

# Regenerate docs/figures/ (the README's figures) from the package; RUN=runs/NAME picks the run for the t-SNE.
figures: $(VENV)/.installed data
	$(PY) scripts/make_figures.py $(RUN)

clean-venv:
	rm -rf $(VENV)
