# `make test` and `make train` are all the set-up a user needs: each creates .venv and
# installs the package (editable, with every extra: all,dev) when .venv is missing or
# pyproject.toml changed. A project that only reuses the ops needs `pip install
# unit-scaling-jax` (jax, numpy, ml_dtypes, optax): see the README.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train test bench docs install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $@

install: $(VENV)/.installed

# A small u-μP BERT (2 layers x 128) pretrained on the embedded King James Bible;
# under 10 minutes on a 2-core CPU. Rerunning resumes from the last checkpoint.
train: $(VENV)/.installed
	$(PY) train.py --config configs/bert.py:tiny --workdir runs/bert-tiny

test: $(VENV)/.installed
	$(PY) -m pytest -n auto -q --durations=10 tests

# Step time, tokens/s, compile time and memory of tiny BERT and causal LM under sp, unit
# and umup in fp32, bf16 and fp8 (benchmarks/results/speed.md); `--gpu_suite` on a GPU.
bench: $(VENV)/.installed
	$(PY) benchmarks/speed.py --real_fp8

# The API reference: static HTML from the docstrings (pdoc), one page per public module,
# with the op table of unit_scaling.functional generated from the code, in build/docs/api.
docs: $(VENV)/.installed
	$(PY) docs/api.py build/docs/api

clean:
	rm -rf $(VENV) runs *.egg-info
