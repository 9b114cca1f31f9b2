# expertd: `make run` serves the default config, `make test` runs the tests.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/expertd.conf
# Root gets the system path; anyone else a socket under ./run/.
ifeq ($(shell id -u),0)
RUN_SOCKET ?= /run/expertd/expertd.sock
else
RUN_SOCKET ?= $(CURDIR)/run/expertd.sock
endif

.PHONY: run test lint install clean docs model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --editable '.[tensorflow]' --config-settings editable_mode=compat
	$(BIN)/python -m compileall -q expertd examples
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --editable '.[tensorflow,test]' --config-settings editable_mode=compat
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	@echo "expertd on $(RUN_SOCKET); in another shell: export EXPERTD_SOCKET=$(RUN_SOCKET); $(BIN)/expertctl call fib n=5"
	$(BIN)/expertd --config $(CONFIG) --socket $(RUN_SOCKET)

test: $(VENV)/.installed-test lint
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check expertd tests examples bench
	$(BIN)/python -m expertd.config | diff -u docs/config.md - || \
		(echo "docs/config.md is stale: run 'make docs'"; exit 1)

docs: $(VENV)/.installed-run
	$(BIN)/python -m expertd.config > docs/config.md

# Retrain the example sentiment model (examples/sentiment/) from its corpus.
model: $(VENV)/.installed-run
	cd examples && ../$(BIN)/python -m sentiment.train

install:
	$(PYTHON) -m pip install .

clean:
	rm -rf $(VENV) build *.egg-info run .pytest_cache .ruff_cache .hypothesis

.PHONY: bench bench-quick bench-model bench-batching bench-pipelines bench-peers
$(VENV)/.installed-bench: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --editable '.[tensorflow,bench]' --config-settings editable_mode=compat
	touch $@ $(VENV)/.installed-run

# Full comparison (about 22 minutes): writes BENCHMARKS.md and bench/plots/, then BENCHMARKS-models.md
# (model experts against Keras, bench/models.py, on the MLP that bench-model builds), then
# BENCHMARKS-batching.md (dynamic batching on against off, bench/batching.py), then
# BENCHMARKS-pipelines.md (bench/pipelines.py), then the model servers (bench-peers, below): about 40 minutes.
bench: $(VENV)/.installed-bench bench-model
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/weight_sharing.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/pipelines.py
	$(BIN)/python bench/peers.py

# expertd against the model servers users would pick instead, gunicorn's dirty arbiters and Ray Serve, on the
# 192 MiB MLP (about 21 minutes from a fresh clone; not part of make test): each peer in its own venv
# (bench/.venv-peer-NAME, git-ignored, pinned in bench/peers/NAME/requirements.txt), then the peers section of
# BENCHMARKS.md and bench/plots/peers_*.png (bench/peers.py; --quick for a smoke run).
bench-peers: $(VENV)/.installed-bench bench-model
	$(BIN)/python bench/peers.py

# Dynamic batching alone (about 5 minutes): BENCHMARKS-batching.md, bench/plots/batching-results.json.
bench-batching: $(VENV)/.installed-bench bench-model
	$(BIN)/python bench/batching.py

# Pipelines (about 2 minutes): one request for many experts against one call each; writes BENCHMARKS-pipelines.md.
bench-pipelines: $(VENV)/.installed-bench
	$(BIN)/python bench/pipelines.py

# The model benchmark's 192 MiB Keras MLP (bench/models/, git-ignored); skipped when up to date.
bench-model: $(VENV)/.installed-bench
	$(BIN)/python bench/make_mlp.py

# The same harness with fewer rounds and sizes, under 2 minutes.
bench-quick: $(VENV)/.installed-bench
	$(BIN)/python bench/compare.py --quick --output BENCHMARKS-quick.md

# A=REF B=REF make bench-ab: two commits' call path, interleaved A B A B in one run (bench/ab.py).
A ?= HEAD~1
B ?= HEAD
.PHONY: bench-ab
bench-ab: $(VENV)/.installed-bench
	$(BIN)/python bench/ab.py $(A) $(B)

# REF=c439e1b make bench-instructions: instructions per request in a worker, counted by callgrind (noise-free;
# needs valgrind), for this tree and REF if given (bench/instructions.py).
REF ?=
.PHONY: bench-instructions
bench-instructions: $(VENV)/.installed-bench
	$(BIN)/python bench/instructions.py $(if $(REF),--ref $(REF))

# SOAK_SECONDS=300 make soak: load with chaos (workers SIGKILLed at random), every answer checked.
SOAK_SECONDS ?= 300
.PHONY: soak
soak: $(VENV)/.installed-run
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS) --clients 16 --workers 2 --chaos
