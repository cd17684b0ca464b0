# gqmm - the two commands a fresh machine needs:
#   make run    build, then run the main job (the seed workload benchmark on the best backend)
#   make test   build, set up the Python test venv, run every C and Python test
# Other targets: build, asan (sanitizer build + C tests), cuda-check (nvcc compile),
# plots, tune-report, clean.

BUILD      ?= build
ASAN_BUILD ?= build-asan
CUDA_BUILD ?= build-cuda
VENV       ?= .venv
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=
PY_PINS    := numpy==2.4.6 pytest==9.2.0 mlx==0.32.4 mlx-cpu==0.32.4 ml_dtypes==0.6.0 matplotlib==3.11.2

.PHONY: all build run test test-c test-python asan cuda-check venv plots clean tune-report

all: build

build:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

run: build
	./$(BUILD)/gqmm bench

# Rebuilt when the pins change (the stamp records them).
$(VENV)/.stamp: Makefile
	@if [ -f $@ ] && [ "$$(cat $@)" = "$(PY_PINS)" ]; then touch $@; exit 0; fi; \
	test -x $(VENV)/bin/python || python3 -m venv $(VENV); \
	$(VENV)/bin/pip install -q --disable-pip-version-check $(PY_PINS) && echo "$(PY_PINS)" > $@

venv: $(VENV)/.stamp

test-c: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# pytest exits 5 when it collects nothing: that fails the target, as it should.
test-python: build venv
	GQMM_LIB=$(abspath $(BUILD))/libgqmm.so GQMM_BUILD=$(abspath $(BUILD)) \
	  $(VENV)/bin/python -m pytest -q tests/python

test: test-c test-python

# Host code only: ASan's shadow memory and the CUDA runtime do not mix (GPU
# kernels get compute-sanitizer instead).
asan:
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DGQMM_SANITIZE=ON -DGQMM_CUDA=OFF $(CMAKE_ARGS) >/dev/null
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS)

# Every CUDA source through nvcc (sm_90a; no GPU needed). Fails where ptxas
# serialized a kernel's wgmma pipeline (its message C7515): it builds, but
# each such kernel runs 5-45% slower (docs/perf-notes.md, session 17). The
# full log, ptxas's register counts included, is $(CUDA_BUILD)/build.log.
cuda-check:
	cmake -S . -B $(CUDA_BUILD) -DCMAKE_BUILD_TYPE=Release -DGQMM_CUDA=ON $(CMAKE_ARGS) >/dev/null
	@cmake --build $(CUDA_BUILD) -j $(JOBS) > $(CUDA_BUILD)/build.log 2>&1; st=$$?; \
	  grep -Ev '^ptxas info|bytes stack frame' $(CUDA_BUILD)/build.log; \
	  if [ $$st -ne 0 ]; then exit $$st; fi; \
	  if grep -q C7515 $(CUDA_BUILD)/build.log; then \
	    grep C7515 $(CUDA_BUILD)/build.log | grep -o "function '[^']*'" | sort -u; \
	    echo "cuda-check: ptxas serialized the wgmma pipeline (C7515) of the kernels above"; \
	    exit 1; \
	  fi

# The levers (canvases per step x expert bits) of the seed model's step on the
# best backend, as JSON records and a PNG of time per canvas against B.
plots: build venv
	mkdir -p out
	./$(BUILD)/gqmm bench --levers --breakdown --json out/moe_levers.json
	$(VENV)/bin/python bench/plot_moe.py out/moe_levers.json out/moe_levers.png

# docs/tile-tuning.md + docs/img/tune-*.png from `gqmm tune --json` outputs.
TUNE_JSON ?= $(wildcard bench/data/tune-*.json)
tune-report: venv
	$(VENV)/bin/python bench/tune_report.py --out docs/tile-tuning.md --img docs/img $(TUNE_JSON)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
