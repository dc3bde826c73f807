# dialora: the whole job (`make pipeline`) and the test suite (`make test`).
SHELL := /bin/bash
BIN   ?= target/release
MODEL ?= models/smollm2-135m-instruct
CARGO ?= cargo

.PHONY: all build model test pipeline bench lint fmt clean slurm-test

all: build

build:
	$(CARGO) build --release --workspace

model: build
	DIALORA_BIN=$(BIN) scripts/fetch-model.sh $(MODEL)

test: model
	scripts/test.sh

pipeline: model
	scripts/pipeline.sh

bench: model
	scripts/bench.sh

# The sweep scripts on a real one-node Slurm cluster started on localhost (needs root; installs
# Debian's slurm-wlm and munge when missing), stopped again at the end.
SLURM_TEST_DIR ?= /tmp/dialora-slurm
slurm-test: model
	SLURM_TEST_DIR=$(SLURM_TEST_DIR) scripts/slurm-cluster.sh start
	SLURM_CONF=$(SLURM_TEST_DIR)/slurm.conf $(CARGO) test --release -p trainer --test slurm -- --ignored --nocapture; \
	  status=$$?; SLURM_TEST_DIR=$(SLURM_TEST_DIR) scripts/slurm-cluster.sh stop; exit $$status

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	rm -rf runs target
