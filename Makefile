# Two commands a new user needs: `make demo` and `make test` (both install first).
# Sizes and times of each target: README.md (first screen).
PY ?= .venv/bin/python
VENV := .venv
STAMP := $(VENV)/.installed
# The 6 GB timm/torchvision venv only tests/interop needs: built by `test`/`test-interop`, not by
# `install` or `demo`.
INTEROP_STAMP := .venv-interop/.installed

.PHONY: install demo test test-scale test-fast test-interop test-slurm bench soak clean slurm-start slurm-stop gpu-bundle

install: $(STAMP)
	@echo "[install] done: the seer-* commands are in $(VENV)/bin; in each new shell run:  source $(VENV)/bin/activate"

$(STAMP): pyproject.toml scripts/install.sh scripts/install_system.sh scripts/install_pillow_simd.sh
	SEER_SKIP_INTEROP=1 bash scripts/install.sh
	touch $(STAMP)

$(INTEROP_STAMP): scripts/install_interop.sh
	bash scripts/install_interop.sh
	touch $(INTEROP_STAMP)

demo: install
	$(PY) -m seer_pipeline.demo

# The suite but its long scale runs. Starts the local SLURM for the launcher tests when it can.
test: install $(INTEROP_STAMP)
	PY=$(PY) bash scripts/run_tests.sh -q -m "not scale" tests

# The long scale runs (~13 min: the 3-minute chaos soak, the 512-rank SwAV and DINO
# simulations). CI runs `make test` and then this.
test-scale: install slurm-start
	$(PY) -m pytest -q -m scale --ignore=tests/interop tests

# Inner loop: no multi-process / end-to-end tests.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not slurm and not scale" --ignore=tests/interop tests

# Weight import/export against timm and torchvision, in their own venv (see docs/weights.md).
test-interop: install $(INTEROP_STAMP)
	.venv-interop/bin/python -m pytest -q -m interop tests/interop

# Benchmark inputs: PHOTOS, a folder of images (default: the 12 test photos; the figures in
# docs/benchmarks.md used a 303-photo set: `make bench PHOTOS=/path/to/photos`); REFERENCE, an
# optional external SwAV reference harness for bench_loader (default: tests/reference_multicrop.py).
PHOTOS ?= tests/data/photos
REFERENCE ?=

# Each benchmark runs even when one before it failed; the target fails at the end if any did.
bench: install
	@rc=0; \
	$(PY) benchmarks/bench_shards.py $(PHOTOS) || { echo "[bench] bench_shards failed"; rc=1; }; \
	$(PY) benchmarks/bench_loader.py --photos $(PHOTOS) $(if $(REFERENCE),--reference $(REFERENCE)) \
		|| { echo "[bench] bench_loader failed"; rc=1; }; \
	$(PY) benchmarks/bench_codecs.py $(PHOTOS) || { echo "[bench] bench_codecs failed"; rc=1; }; \
	$(PY) benchmarks/bench_trainer.py || { echo "[bench] bench_trainer failed"; rc=1; }; \
	exit $$rc

# Chaos soak (docs/benchmarks.md): MINUTES of faults against a run under the local SLURM, then
# bitwise against an uninterrupted run; needs root for its tmpfs. The last line is JSON.
MINUTES ?= 3
SEED ?= 1
soak: install slurm-start
	$(PY) benchmarks/soak.py --minutes $(MINUTES) --seed $(SEED)

# Launcher tests against the local SLURM (starts it first; idempotent).
test-slurm: install slurm-start
	$(PY) -m pytest -q -m slurm tests

# Wheels for benchmarks/gpu_run.sh on a GPU machine without network (docs/gpu.md); needs PyPI
# here, not the venv. GPU_BUNDLE_PYTHONS=3.12 makes a smaller one for a known Python.
GPU_BUNDLE_PYTHONS ?= 3.10,3.11,3.12,3.13
gpu-bundle:
	python3 scripts/gpu_bundle.py --out gpu-bundle --pythons $(GPU_BUNDLE_PYTHONS)

slurm-start:
	bash slurm/local-cluster/start.sh

slurm-stop:
	bash slurm/local-cluster/stop.sh

clean:
	rm -rf $(VENV) .venv-interop runs .pytest_cache build *.egg-info gpu-bundle
