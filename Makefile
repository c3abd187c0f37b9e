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
# (no more than two clusters at a time on 2 cores); its effect on the suite's time is within the noise
# (486 tests: 413 s and 448 s with it, 426 s and 447 s without)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope -q

$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,compiled,dask,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) warehouse/*.duckdb* warehouse/models warehouse/reports warehouse/published
