# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Both create .venv/ on first use and install pinned dependencies, each only what it needs:
# `make demo` the demo's extra (.[demo]), `make test` / `make lint` the development extra
# (.[dev]: the demo's packages plus pytest, hypothesis, ruff, mypy).  `make install-all` adds
# every optional extra (TensorBoard, W&B, Triton): what CI runs the tests with.
# `make docs` builds the API reference site into site/ (mkdocs --strict, the docs extra);
# `make package-check` builds the sdist and wheel and tries the wheel in a fresh venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint typecheck bench bench-gpu docs package-check install install-demo install-docs install-all clean

install: $(VENV)/.installed-dev
install-demo: $(VENV)/.installed-demo
install-docs: $(VENV)/.installed-docs
install-all: $(VENV)/.installed-all

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-demo: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[dev]'
	touch $@

$(VENV)/.installed-docs: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[docs]'
	touch $@

$(VENV)/.installed-all: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[dev,cache,train,demo,tensorboard,triton,wandb,docs]'
	touch $(VENV)/.installed-dev $(VENV)/.installed-demo $(VENV)/.installed-docs $@

demo: install-demo
	$(VENV)/bin/kdkit demo

test: install
	$(PY) -m pytest

# ruff (lint + format) and mypy over src/kdkit (config: [tool.mypy] in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

typecheck: install
	$(VENV)/bin/mypy

docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

package-check: install-docs
	PYTHON=$(abspath $(PY)) bash .ci/check_package.sh

bench: install
	$(PY) benchmarks/bench_losses.py

# One CUDA GPU, under 5 minutes on an H100: kernel correctness vs the float64 CPU reference,
# the row kernel, the linear path (vs Liger if installed) and a trainer step (#24).
bench-gpu: install
	$(PY) benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info
