# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test bench clean deploy worker-cpu mlflow-ui

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the local CPU wheel here; CUDA hosts get the CUDA build.
	# constraints.txt: the versions that matter, each pin justified there (reproducible install).
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fss demo

demo-quick: $(STAMP)
	$(BIN)/fss demo --quick

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/train.py

# Work pools + the deployments of prefect.yaml on the local Prefect server (fss server).
deploy: $(STAMP)
	$(BIN)/fss deploy

worker-cpu: $(STAMP)
	$(BIN)/fss deploy --worker fss-cpu

# The MLflow UI on the demo's runs (127.0.0.1:5000).
mlflow-ui: $(STAMP)
	$(BIN)/fss ui --backend-store-uri sqlite:///$(CURDIR)/demo/mlflow.db

clean:
	rm -rf demo .fss .pytest_cache .ruff_cache
