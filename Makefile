# rpra: `make run` chats with the default models, `make test` runs the test suite.
# Both install everything they need on a fresh machine (`make setup`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RPRA := $(VENV)/bin/rpra

LLAMA_VERSION := 0.3.36
# llama.cpp's native build segfaults on AVX-512/AMX VMs (../shared/FIELD-NOTES.md); these flags
# run everywhere x86-64 with AVX2. Override for other hardware, e.g.
#   make setup LLAMA_CMAKE_ARGS="-DGGML_METAL=on"      (Apple silicon)
#   make setup LLAMA_CMAKE_ARGS="-DGGML_CUDA=on"       (NVIDIA)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF
# pip's wheel cache ignores CMAKE_ARGS, so the built wheel is kept under a name made of the flags.
FLAGS_ID := $(shell echo '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)' | sha1sum | cut -c1-10)
WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/rpra-build/llama-$(FLAGS_ID)
# The sdist is kept too: the wheel is built from it, and `rpra train` takes llama.cpp's LoRA and
# model converters out of it (they must match the llama.cpp the runtime runs).
SDIST_DIR := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/rpra-build/sdist
SDIST := $(SDIST_DIR)/llama_cpp_python-$(LLAMA_VERSION).tar.gz
SDIST_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
INSTALLED := $(VENV)/.installed-$(FLAGS_ID)

# The default device model (rpra/config.py): the one with the best quality per remote call at an
# acceptable speed (benchmarks/README.md, "Which device model"). The tests run the smallest one.
DEVICE_MODEL ?= qwen2.5-coder-0.5b-instruct
TEST_MODEL ?= smollm2-135m-instruct
REMOTE_MODEL ?= qwen2.5-coder-1.5b-instruct
# make run reads the demo prompts when standard input is not a terminal (e.g. in CI).
PROMPTS ?= examples/demo-prompts.txt
PYTEST_ARGS ?=

.PHONY: setup models run serve test test-fast bench bench-deferral train clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@test -f $(SDIST) || { mkdir -p $(SDIST_DIR) && \
	  $(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(SDIST_DIR) llama-cpp-python==$(LLAMA_VERSION); }
	@echo "$(SDIST_SHA256)  $(SDIST)" | sha256sum --check --quiet || { echo "$(SDIST) does not match its pinned sha256: delete it and re-run"; exit 1; }
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "Building llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' (about 5 minutes on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --quiet --no-deps --no-cache-dir -w $(WHEELS) $(SDIST); \
	fi
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

models: setup
	$(RPRA) models pull $(DEVICE_MODEL)
	$(RPRA) models pull $(REMOTE_MODEL)

# Shell code that wraps the command in $$cmd so that it defers to RPRA_REMOTE_URL if set, else to
# the larger model served on 127.0.0.1 for as long as the command runs.
WITH_REMOTE = if [ -z "$$RPRA_REMOTE_URL" ]; then \
	  $(RPRA) models pull $(REMOTE_MODEL) || exit 1; \
	  cmd="$(RPRA) serve-remote --model $(REMOTE_MODEL) --port 0 -- $$cmd"; \
	fi

# Chat with the device model (deferred turns: see WITH_REMOTE).
run: setup
	$(RPRA) models pull $(DEVICE_MODEL)
	@cmd="$(RPRA) chat $(CHAT_ARGS)"; $(WITH_REMOTE); \
	if [ -t 0 ]; then $$cmd; else $$cmd < $(PROMPTS); fi

# The OpenAI-compatible server on 127.0.0.1:8080 (deferred requests: see WITH_REMOTE).
# SERVE_ARGS="--profile laptop" etc.
serve: setup
	$(RPRA) models pull $(DEVICE_MODEL)
	@cmd="$(RPRA) serve $(SERVE_ARGS)"; $(WITH_REMOTE); $$cmd

test: setup
	$(RPRA) models pull $(TEST_MODEL)
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only (no model runs): under a minute.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(RPRA) models pull $(DEVICE_MODEL)
	$(PY) benchmarks/latency.py

# The deferral benchmark on the default models: a report card from calibration items, then
# every predictor on the rpra-mix test split (resumable: re-run to continue). Hours on 2 cores.
BENCH_LIMIT ?= 150
bench-deferral: models
	$(RPRA) report-card build --limit 32
	$(RPRA) bench run --limit $(BENCH_LIMIT)

# The fine-tuned predictors: judged train records (device side only), a LoRA adapter, the probe.
# Resumable like the benchmark; the adapter lands in $$RPRA_HOME/adapters/sft.
TRAIN_LIMIT ?= 200
train: models
	$(RPRA) collect --split train --limit $(TRAIN_LIMIT) --no-remote
	$(RPRA) train sft
	$(RPRA) train probe

clean:
	rm -rf $(VENV) .pytest_cache
