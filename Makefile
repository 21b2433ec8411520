# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/strfx train examples/lenet5.py --mode structured --data demo --epochs 3 --batch-size 64 \
		--target-sparsity 0.5 --export -o runs/demo --force

test: venv
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# Benchmarks (never part of `make test`); the commands that produced docs/results.md.
bench: venv
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/mnist.py --seeds 3
	$(BIN)/python benchmarks/train_cost.py --models resnet18 resnet50 --batch 32 16 --rounds 15 --profile resnet18
	$(BIN)/python benchmarks/latency.py --rounds 5
	$(BIN)/python benchmarks/lowrank_speed.py --models resnet50 --threads 1 --append
	$(BIN)/python benchmarks/lowrank_speed.py --models vit_b_16 --vit-layers 4 --threads 1 --append
	$(BIN)/python benchmarks/zoo.py
	$(BIN)/python benchmarks/fuzz.py
	$(BIN)/python benchmarks/lm.py --force  # needs transformers (the test or hf extra)

clean:
	rm -rf $(VENV) build *.egg-info runs
