PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet -e '.[dev,compiled,dask]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/batchml demo

# --dist loadscope: a module's tests stay on one xdist worker, so a module-scoped Dask cluster starts once
# (measured idle: 413 s against 447 s with the default scheduling, 486 tests)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope -q

$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,compiled,dask,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) warehouse/*.duckdb* warehouse/models warehouse/reports warehouse/published
