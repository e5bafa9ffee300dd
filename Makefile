# mvlm — the two commands a new machine needs are `make demo` and `make test` (both set themselves up).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MVLM := $(BIN)/mvlm
OUT ?= out/demo
STAMP := $(VENV)/.mvlm-setup-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup system venv runtime demo test test-fast bench bench-gate lint clean

setup: system venv runtime

system:
	@bash scripts/install-system-deps.sh

# torch first, pinned: on these machines `pip install torch==2.13.0` takes the CPU wheel on disk.
# llama-cpp-python is installed as bindings only; its libraries come from our patched runtime build.
venv: $(STAMP)
$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.mvlm-setup-* && touch $@

runtime: venv
	$(MVLM) runtime build --target host

# The main job on a built-in default: a tiny MobileVLM V2-architecture checkpoint (random weights, trained
# SentencePiece tokenizer) -> GGUF + mmproj -> verify against PyTorch -> q4_0/q8_0 -> bench on this machine.
demo: setup
	@mkdir -p $(OUT)
	$(BIN)/python -m mvlm_convert.tiny $(OUT)/checkpoint --variant v2
	$(MVLM) convert $(OUT)/checkpoint --outdir $(OUT) --outtype f32 --name MobileVLM_V2-tiny
	$(MVLM) verify $(OUT)/checkpoint --gguf $(OUT)/MobileVLM_V2-tiny-F32.gguf --mmproj $(OUT)/mmproj-MobileVLM_V2-tiny-F32.gguf
	$(MVLM) quantize $(OUT)/MobileVLM_V2-tiny-F32.gguf --type q4_0,q8_0
	$(MVLM) bench --device local --protocol lm --model $(OUT)/MobileVLM_V2-tiny-Q4_0.gguf --repeat 3 \
	    --json-file $(OUT)/bench-lm.json --markdown $(OUT)/bench-lm.md
	$(MVLM) bench --device local --protocol vlm --model $(OUT)/MobileVLM_V2-tiny-Q4_0.gguf \
	    --mmproj $(OUT)/mmproj-MobileVLM_V2-tiny-F32.gguf --repeat 3 --json-file $(OUT)/bench-vlm.json --markdown $(OUT)/bench-vlm.md
	@echo; echo "== report ($(OUT)/bench-vlm.md) =="; cat $(OUT)/bench-vlm.md

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1800 $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/quantize.py
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/parse_scaling.py
	$(BIN)/python benchmarks/gguf_header.py
	$(BIN)/python benchmarks/cpu_variants.py
	$(BIN)/python benchmarks/tune.py

# The regression gate's false-alarm and detection rates on this machine (about 20 min; docs/ci.md).
bench-gate: setup
	$(BIN)/python benchmarks/gate_rates.py

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf out build .pytest_cache
