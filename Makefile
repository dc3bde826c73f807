# dialora: the whole job (`make pipeline`) and the test suite (`make test`).
SHELL := /bin/bash
BIN   ?= target/release
MODEL ?= models/smollm2-135m-instruct
CARGO ?= cargo

.PHONY: all build model test pipeline bench lint fmt clean

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

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	rm -rf runs target
