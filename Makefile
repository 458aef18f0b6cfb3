# ipvs-synproxy — thin wrappers; every install step lives here so a fresh
# machine needs nothing but `make`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SP := $(VENV)/bin/ipvs-synproxy
RESULTS := build/test-results
# Guest test run: a hard limit well under CI's budget.
VM_TIMEOUT ?= 2700

.PHONY: all venv deps check unit testbed-test vm-test test demo bench kmod clean

all: test

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

venv: $(VENV)/.installed

# Debian packages (QEMU, the 6.1 kernel image/headers/source, busybox, ipvsadm,
# tcpdump, cpio, chromium ...): installed with apt only when missing.
deps: venv
	$(PY) -m ipvs_synproxy_testbed.deps

kmod: deps
	$(SP) kmod build

# Static checks: Python lint and types, and checkpatch over the kernel series.
check: deps
	$(VENV)/bin/ruff check ipvs_synproxy webui tests bench
	$(VENV)/bin/mypy ipvs_synproxy webui bench
	$(SP) kmod checkpatch

# Fast host tests: no kernel involved.
unit: deps
	$(PY) -m pytest -q tests/unit

# The build pipeline and the testbed contract (builds modules, boots guests).
testbed-test: deps
	$(PY) -m pytest -q tests/testbed

# End-to-end tests inside the guest against the real patched modules.
vm-test: deps
	$(SP) kmod build-toa
	$(SP) keepalived build
	mkdir -p $(RESULTS)
	rm -f $(RESULTS)/vm.xml
	$(SP) vm exec --topology --timeout $(VM_TIMEOUT) -- \
		python -m pytest -q -p no:cacheprovider tests/vm --junitxml=$(abspath $(RESULTS))/vm.xml
	$(PY) -m ipvs_synproxy_testbed.junit $(RESULTS)/vm.xml

test: check unit testbed-test vm-test

# The main job: clients served through FULLNAT VIPs in the guest, step by step;
# then the ops console on the host's http://127.0.0.1:$(DEMO_PORT)/ (login printed)
# while clients and a small SYN flood run, until Ctrl-C or DEMO_HOLD seconds.
DEMO_PORT ?= 8088
DEMO_HOLD ?=
DEMO_TIMEOUT ?= 86400
demo: deps
	$(SP) kmod build-toa
	$(SP) vm exec --topology --forward $(DEMO_PORT) --timeout $(DEMO_TIMEOUT) -- \
		python -m ipvs_synproxy_testbed.demo --console-port $(DEMO_PORT) \
		$(if $(DEMO_HOLD),--hold $(DEMO_HOLD))

# Benchmarks (bench/README.md): every contender measured in one guest boot, then
# bench/results/bench-<time>.json, bench/results/bench.png and the README table.
BENCH_TIMEOUT ?= 2400
BENCH_ARGS ?=
BENCH_RAW := build/bench/run.json
bench: deps
	$(SP) kmod build
	mkdir -p build/bench
	rm -f $(BENCH_RAW)
	$(SP) vm exec --topology --timeout $(BENCH_TIMEOUT) -- \
		python -m bench.run --out $(BENCH_RAW) $(BENCH_ARGS)
	$(PY) -m bench.report $(BENCH_RAW) --results bench/results --readme README.md

clean:
	rm -rf build
