# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build, pinned for reproducible installs; an existing torch (e.g. CUDA) is left alone.
TORCH_PIN ?= torch==2.13.0
# The default benchmark: bknbench's defaults with three seeds, the fewest that give a
# usable 95% interval (about 2 minutes on 2 CPU cores), and the statistics diagnostics
# (stats.csv, final_val_acc_population; training unchanged, see README).
RUN_ARGS ?= --seeds 0,1,2 --diagnose

.PHONY: run test venv venv-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, and only where none is importable, so pip never swaps a CUDA build out.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_PIN)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# The C++ CPU kernels (bknbench/kernels/native.py), about 30 s; without a compiler it says so in one
# line and the PyTorch path runs.
$(VENV)/.native: $(VENV)/.installed bknbench/kernels/csrc/fused_cpu.cpp
	$(BIN)/python -m bknbench.kernels.native
	touch $@

venv: $(VENV)/.installed $(VENV)/.native
venv-test: $(VENV)/.installed-test $(VENV)/.native

run: venv
	$(BIN)/bknbench run --out results/default $(RUN_ARGS)
	$(BIN)/bknbench plot results/default --out results/default/plots
	$(BIN)/bknbench report results/default --out results/report.html

test: venv-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache
