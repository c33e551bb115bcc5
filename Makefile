# pykata: two commands on a fresh machine.
#   make demo   set everything up, run a container in its own VM through containerd
#   make test   set everything up, run the whole test suite
#   make bench  run the benchmark suite, rewrite docs/benchmarks.md (+ .png); BENCH_ARGS=--quick
#   make fuzz   the fuzz tests (tests/fuzz) with FUZZ_EXAMPLES examples per target
#               (default 20000; `make test` runs them with a small budget)
#   make soak   the soak and concurrency tests at full counts (500 ctr cycles, 200 CRI pod
#               cycles, 10 rounds of 10 parallel pods; `make test` runs a short slice)
#   make soak-faults  the fault tests (kill -9 of QEMU, virtiofsd, shim, agent; guest
#               panic; containerd restarts) at FAULT_TRIALS=20 trials each (`make soak`
#               runs them too; `make test` runs 1)
PYTHON ?= python3
VENV   := .venv

.PHONY: setup test unit integration lint demo protos image clean bench fuzz soak soak-faults

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

SOAK_CTR_CYCLES ?= 500
SOAK_CRI_CYCLES ?= 200
SOAK_ROUNDS ?= 10
SOAK_PODS ?= 10
soak: setup soak-faults
	PYKATA_SOAK_CTR_CYCLES=$(SOAK_CTR_CYCLES) PYKATA_SOAK_CRI_CYCLES=$(SOAK_CRI_CYCLES) \
	  PYKATA_SOAK_ROUNDS=$(SOAK_ROUNDS) PYKATA_SOAK_BURST_ROUNDS=$(SOAK_ROUNDS) \
	  PYKATA_SOAK_PODS=$(SOAK_PODS) \
	  $(VENV)/bin/pytest -p no:cacheprovider --timeout=0 -s tests/integration/test_soak.py $(SOAK_ARGS)

# The fault tests (tests/integration/test_faults.py) at FAULT_TRIALS trials per fault
# and phase (`make test` runs 1); `make soak` runs them too.
FAULT_TRIALS ?= 20
soak-faults: setup
	PYKATA_FAULT_TRIALS=$(FAULT_TRIALS) PYKATA_FAULT_CRI_TRIALS=$(FAULT_TRIALS) \
	  $(VENV)/bin/pytest -p no:cacheprovider --timeout=0 tests/integration/test_faults.py $(FAULT_ARGS)

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
