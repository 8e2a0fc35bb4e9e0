# Set-up and main commands. `make demo` and `make test` each do the whole set-up on a fresh
# machine (a virtual environment in .venv with torch and the test/benchmark dependencies, then
# the extension build), so either one is enough to start from a clean clone.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.14.1
PY := $(VENV)/bin/python
MAX_JOBS ?= 2

.PHONY: venv build demo test bench report cpu-smoke clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH)" numpy ninja pytest tqdm matplotlib "torchbnn==1.2"
	# The other anchors of the benchmarks; without --no-deps pip would replace torch.
	$(PY) -m pip install -q --no-deps bayesian-torch blitz-bayesian-pytorch
	touch $@

# Builds bnn_fast._C in place (C++ always; CUDA too when torch has CUDA and nvcc is found).
# ninja recompiles only what changed.
build: venv
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace

# The main job: the regression example (train, 10,000 posterior samples, regression.png).
demo: build
	$(PY) -m bnn_fast.examples.regression

test: build
	$(PY) -m pytest -q

bench: build
	$(PY) -m benchmarks.run_all --device cpu

# benchmarks/results/REPORT.md and README.md's performance table, from benchmarks/results/*.json.
report: venv
	$(PY) -m benchmarks.report

# Builds and installs the package against the CPU-only torch 2.13.0 in a second environment
# (C++ part only) and runs the smoke test from outside the source tree.
cpu-smoke:
	$(PYTHON) -m venv .venv-cpu
	.venv-cpu/bin/python -m pip install -q --upgrade pip
	.venv-cpu/bin/python -m pip install -q "torch==2.13.0" numpy ninja tqdm setuptools wheel
	# Built from a copy, so this build shares no build/ folder or _C*.so with the main one.
	rm -rf build-cpu && mkdir build-cpu && cp -r setup.py pyproject.toml README.md csrc bnn_fast build-cpu/
	rm -f build-cpu/bnn_fast/_C*.so
	MAX_JOBS=$(MAX_JOBS) .venv-cpu/bin/python -m pip install -q --no-build-isolation --no-deps ./build-cpu
	cd /tmp && $(CURDIR)/.venv-cpu/bin/python $(CURDIR)/.ci/smoke.py --expect-backend cpp

clean:
	rm -rf build build-cpu bnn_fast/_C*.so *.egg-info
