# pykata: two commands on a fresh machine.
#   make demo   set everything up, run a container in its own VM through containerd
#   make test   set everything up, run the whole test suite
#   make bench  run the benchmark suite, rewrite docs/benchmarks.md (+ .png); BENCH_ARGS=--quick
#   make fuzz   the fuzz tests (tests/fuzz) with FUZZ_EXAMPLES examples per target
#               (default 20000; `make test` runs them with a small budget)
PYTHON ?= python3
VENV   := .venv

.PHONY: setup test unit integration lint demo protos image clean bench fuzz

setup:
	PYTHON=$(PYTHON) scripts/setup.sh

test: setup
	scripts/test.sh

unit: setup
	$(VENV)/bin/pytest tests/unit

integration: setup
	$(VENV)/bin/pytest tests/integration

FUZZ_EXAMPLES ?= 20000
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -p no:cacheprovider \
	  --timeout=0 tests/fuzz $(FUZZ_ARGS)

lint:
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict bench/*.py
	$(VENV)/bin/python scripts/check_imports.py

demo: setup
	scripts/demo.sh

bench: setup
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

image:
	$(VENV)/bin/pykata image build

protos:
	PYTHON=$(CURDIR)/$(VENV)/bin/python scripts/gen-protos.sh

clean:
	-$(VENV)/bin/pykata cleanup
	rm -rf $(VENV) build *.egg-info
