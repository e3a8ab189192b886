# Two commands do all the set-up (README):
#   make lab    create .venv, install vitlab with everything, open the notebooks in JupyterLab
#   make test   create .venv if needed, then run every test: unit tests, notebooks (nbval), browser
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: lab test setup benchmarks

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $(STAMP)

# On 127.0.0.1 only; as root (as in most containers) JupyterLab refuses to start without --allow-root.
lab: setup
	$(BIN)/python -m jupyterlab --ServerApp.ip=127.0.0.1 $$([ "$$(id -u)" -eq 0 ] && echo --allow-root) notebooks/

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg tests notebooks

benchmarks: setup
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/time_to_accuracy.py --test-dir ../shared/data/mnist
