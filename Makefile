# genexp — `make run` and `make test` install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision are pinned here (not in pyproject) to the builds this machine serves from disk;
# set TORCH_SPEC= to let pip choose.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install run test test-all lint bench gpu-check compare clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q $(TORCH_SPEC))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/genexp train $(ARGS)

# the report test renders the HTML page in headless Chromium: Debian's package, installed if missing
# (as root, or through sudo); GENEXP_ALLOW_NO_BROWSER=1 skips that test instead
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  command -v google-chrome >/dev/null || [ "$$GENEXP_ALLOW_NO_BROWSER" = 1 ] || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "make test: chromium is missing and installing it (apt) needs root or sudo:" \
	    "install the chromium package, or set GENEXP_ALLOW_NO_BROWSER=1 to skip the browser test" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "make test: chromium is missing and there is no apt-get:" \
	    "install chromium, or set GENEXP_ALLOW_NO_BROWSER=1 to skip the browser test" >&2; exit 1; }; \
	  echo "installing chromium for the report's browser test (apt)" >&2; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

# one OpenMP thread per test process: the tests' tiny networks gain nothing from a second one, and
# two per process oversubscribe 2 cores once a subprocess runs beside pytest (measured on 2 shared
# cores: test_train + test_diffusion_models 49 s with 1 thread, 115 s with 2); override with
# OMP_NUM_THREADS=2 make test
OMP_NUM_THREADS ?= 1
# the suite is split over two worker processes (pytest-xdist), one per core of a 2-core machine;
# TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2
TEST_ENV = WANDB_MODE=disabled OMP_NUM_THREADS=$(OMP_NUM_THREADS)

test: $(STAMP) browser
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check genexp tests scripts
	$(BIN)/ruff format --check genexp tests scripts

# every CPU benchmark, one markdown table each, JSON under $(BENCH_DIR); an estimated 6-8 minutes on 2 cores
# (docs/benchmarks.md). The GPU checks are separate: scripts/bench_gpu.py and make gpu-check on a CUDA machine.
BENCH_DIR ?= outputs/bench
bench: $(STAMP)
	$(BIN)/python scripts/bench_train.py --json $(BENCH_DIR)/train.json
	$(BIN)/python scripts/bench_sampling.py --device cpu --json $(BENCH_DIR)/sampling.json
	$(BIN)/python scripts/bench_overhead.py --repeats 2 --json $(BENCH_DIR)/overhead.json
	$(BIN)/python scripts/bench_data.py --json $(BENCH_DIR)/data.json
	$(BIN)/python scripts/bench_ddp.py --json $(BENCH_DIR)/ddp.json

# on a CUDA machine: every family trains 50 steps (compile, channels_last, device data), is scored
# (FID of 500 samples, samples/s) and resumes, then DDP on all GPUs; one table, at most ~8 minutes.
# GPU_CHECK_ARGS=--smoke runs it on the CPU with tiny nets (about 2-3 minutes on 2 cores)
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --json $(BENCH_DIR)/gpu_check.json $(GPU_CHECK_ARGS)

# the talk's comparison on CPU: every family x 2 seeds x 3 minutes on mnist5k, evaluated (diffusion
# sampled with DDIM-50), report in compare/mnist5k/report/; about an hour on 2 cores
# the autoregressive families sample one pixel at a time (~1 sample/s on a CPU core): add them with
# COMPARE_ARGS="... families=[ae,vae,gan,realnvp,glow,ddpm,pixelcnn,pixel_transformer]" (about +1 h)
COMPARE_ARGS ?= seeds=2 budget_minutes=3 accelerator=cpu sampler=ddim sampler.steps=50 families=[ae,vae,gan,realnvp,glow,ddpm]
compare: $(STAMP)
	$(BIN)/genexp compare dataset=mnist5k $(COMPARE_ARGS) $(ARGS)

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
