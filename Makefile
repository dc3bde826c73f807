# dialora: the whole job (`make pipeline`) and the test suite (`make test`).
SHELL := /bin/bash
# where cargo puts the release binaries (CARGO_TARGET_DIR moves them, as cargo does)
BIN   ?= $(if $(CARGO_TARGET_DIR),$(CARGO_TARGET_DIR),target)/release
MODEL ?= models/smollm2-135m-instruct
CARGO ?= cargo

.PHONY: all build cuda mpi model test mpi-test pipeline study bench lint fmt clean slurm-test

all: build

build:
	$(CARGO) build --release --workspace

# The release binaries with CUDA support, in target/cuda/release (the CPU build stays where it
# is). Needs the CUDA toolkit (nvcc, cuBLAS, cuRAND) on PATH or in CUDA_HOME; no GPU is needed to
# compile. CUDA_COMPUTE_CAP picks the GPU generation (e.g. 80 for A100, 90 for H100/H200).
cuda:
	$(CARGO) build --release --workspace --features cuda --target-dir target/cuda

# The release binaries with the MPI trainer (data-parallel training, launched by mpirun or
# srun --mpi=pmix), in target/mpi/release (the default build stays pure Rust). Needs an MPI and
# libclang: on Debian, apt-get install libopenmpi-dev openmpi-bin libclang-dev (and libpmix-dev
# for srun --mpi=pmix).
mpi:
	$(CARGO) build --release --workspace --features trainer/mpi --target-dir target/mpi

model: build
	DIALORA_BIN=$(BIN) scripts/fetch-model.sh $(MODEL)

test: model
	scripts/test.sh

# The data-parallel tests: two ranks against one process, signals, a killed rank, refusals
# (real Open MPI, mpirun).
mpi-test: model mpi
	DIALORA_MPI_BIN=$(CURDIR)/target/mpi/release $(CARGO) test --release -p trainer --test mpi -- --ignored --test-threads 1

pipeline: model
	scripts/pipeline.sh

# The article's study (studies/article.toml) on the demo model: every point trained, the
# held-out questions answered, runs/article/report.html. Run again to resume.
study: model
	DIALORA_BIN=$(BIN) scripts/study.sh studies/article.toml

bench: model
	scripts/bench.sh

# The sweep scripts on a real one-node Slurm cluster started on localhost (needs root; installs
# Debian's slurm-wlm and munge when missing), stopped again at the end: a sweep's array through
# requeue, preemption and time limits, and a 2-task (2-rank MPI) point through a requeue.
SLURM_TEST_DIR ?= /tmp/dialora-slurm
slurm-test: model mpi
	SLURM_TEST_DIR=$(SLURM_TEST_DIR) scripts/slurm-cluster.sh start
	SLURM_CONF=$(SLURM_TEST_DIR)/slurm.conf DIALORA_MPI_BIN=$(CURDIR)/target/mpi/release $(CARGO) test --release -p trainer --test slurm -- --ignored --nocapture --test-threads 1; \
	  status=$$?; SLURM_TEST_DIR=$(SLURM_TEST_DIR) scripts/slurm-cluster.sh stop; exit $$status

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	rm -rf runs target
