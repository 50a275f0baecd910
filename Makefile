# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned for reproducible installs; an existing torch (e.g. CUDA) is left alone. Where pip
# reads PyPI, Linux's torch wheel is the CUDA build (several GB): TORCH_INDEX=
# https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's index instead.
TORCH_PIN   ?= torch==2.13.0
TORCH_INDEX ?=
# The default study (docs/study.md, docs/protocol.md): the fair protocol, small. Two
# workloads (mnist1d-mlp, digits-cnn: `bknbench workloads`), four normalizers at micro-
# batches 2, 8 and 128 accumulated to SGD steps of 128 (the paper's protocol); every
# (spec, micro-batch) cell tunes its learning rate over the workload's grid (0.0125, 0.05,
# 0.2, 0.8: 64x) on seed 0, selected on the validation split, then seeds 0, 1, 2 run at the
# chosen rate; one report with the aggregate (mean ranks, performance profile) and each
# workload's tables, sensitivity and figures. Any `bknbench run` option in RUN_ARGS goes to
# the study (e.g. RUN_ARGS="--workers 1").
STUDY    ?= results/default
RUN_ARGS ?=
STUDY_ARGS := --workloads mnist1d-mlp,digits-cnn --accumulate-to 128 --seeds 0,1,2
# The longer study (not part of `make run`; hours on 2 cores): four workloads, the rivals,
# five micro-batch sizes.
LONG_ARGS := --workloads mnist1d-mlp,mnist1d-cnn,digits-cnn,digits32-cnn --accumulate-to 128 \
    --seeds 0,1,2 --batch-sizes 2,4,8,32,128 \
    --norms bn,gn,bkn,bkn:propagate=output,brn,mabn,cbn,ws-gn,evonorm-b0
# The fixed-rate study that was the default before the fair protocol (lr 0.2 for every
# normalizer, mnist1d only, with the statistics diagnostics); docs/study.md compares.
FIXED_ARGS := --dataset mnist1d --model mlp --seeds 0,1,2 --diagnose
PAPER := $(FIXED_ARGS) --accumulate-to 128 --epochs 6

.PHONY: run study-long fixed-rate test mutation venv venv-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, and only where none is importable, so pip never swaps a CUDA build out.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_PIN)" \
	    $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# The C++ CPU kernels (bknbench/kernels/native.py), about 40 s; without a compiler it says so in one
# line and the PyTorch path runs. Stamped only when built, so a compiler installed later is
# used by the next make.
$(VENV)/.native: $(VENV)/.installed bknbench/kernels/csrc/fused_cpu.cpp
	$(BIN)/python -m bknbench.kernels.native
	$(BIN)/python -m bknbench.kernels.native --check 2>/dev/null && touch $@ || true

venv: $(VENV)/.installed $(VENV)/.native
venv-test: $(VENV)/.installed-test $(VENV)/.native

run: venv
	$(BIN)/bknbench run $(STUDY_ARGS) --norms bn,gn,bkn,mabn --batch-sizes 2,8,128 \
	    --out $(STUDY) $(RUN_ARGS)
	$(BIN)/bknbench compare $(STUDY) --aggregate
	$(BIN)/bknbench report $(STUDY) --out $(STUDY)/report.html  # and each sweep's plots/

study-long: venv
	$(BIN)/bknbench run $(LONG_ARGS) --out results/long $(RUN_ARGS)
	$(BIN)/bknbench compare results/long --aggregate
	$(BIN)/bknbench report results/long --out results/long/report.html

fixed-rate: venv
	$(BIN)/bknbench run $(PAPER) --batch-sizes 2,4,8,32,128 \
	    --norms bn,gn,bkn,bkn:propagate=output --out results/fixed/paper $(RUN_ARGS)
	$(BIN)/bknbench run $(PAPER) --batch-sizes 2,8,128 \
	    --norms bn,gn,brn,mabn,cbn,frn,evonorm-b0,evonorm-s0,ws-gn --out results/fixed/rivals $(RUN_ARGS)
	$(BIN)/bknbench run $(FIXED_ARGS) --epochs 1 --batch-sizes 2,8,32,128 \
	    --norms bn,gn,bkn,bkn:propagate=output --out results/fixed/per-step $(RUN_ARGS)
	$(BIN)/bknbench report results/fixed --out results/fixed/report.html

test: venv-test
	$(BIN)/python -m pytest -q

$(VENV)/.installed-mutation: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e ".[mutation]"
	touch $@

# Mutation testing (docs/mutation.md): mutmut over norms/, kernels/reference.py,
# report/summary.py, diagnose/ and request.py with the fast tests that cover them; by default
# a seeded sample of 6 mutants per module (about an hour on 2 shared cores), the score table
# at the end. MUTATION_ARGS= (empty) tests every mutant, ~4300 (hours).
MUTATION_ARGS ?= --sample 6
mutation: $(VENV)/.installed-mutation $(VENV)/.native
	nice -n 10 $(BIN)/python tools/mutation.py $(MUTATION_ARGS)

# results/ (every study run here) is left alone; remove it yourself.
clean:
	rm -rf $(VENV) .pytest_cache mutants
