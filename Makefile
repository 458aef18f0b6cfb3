# ipvs-synproxy — thin wrappers; every install step lives here so a fresh
# machine needs nothing but `make`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SP := $(VENV)/bin/ipvs-synproxy
RESULTS := build/test-results
# make sets the machine up (Debian packages included); the tool alone never
# installs a package unasked (ipvs-synproxy ... --install-deps).
export IPVS_SYNPROXY_INSTALL_DEPS := 1
# Guest test run: a hard limit (a suite takes about 40 min under TCG; 50 is the
# alarm, not the budget: `make test` as a whole must stay within the hour).
VM_TIMEOUT ?= 3000

.PHONY: all venv deps check unit testbed-test vm-test test demo bench kmod deb clean

all: test

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

venv: $(VENV)/.installed

# Debian packages (QEMU, each supported kernel series' image/headers/source, busybox, ipvsadm,
# tcpdump, cpio, chromium ...): installed with apt only when missing.
deps: venv
	$(PY) -m ipvs_synproxy_testbed.deps

kmod: deps
	$(SP) kmod build

# Debian packages (ipvs-synproxy, ipvs-synproxy-dkms, toa-dkms, keepalived-synproxy)
# in $(DEB_DIR), built by dpkg-buildpackage from a copy of the checkout's files.
DEB_DIR := build/deb
deb: deps
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	$(PY) -m ipvs_synproxy_testbed.debs $(DEB_DIR)

# Static checks: Python lint and types, and checkpatch over the kernel series.
check: deps
	$(VENV)/bin/ruff check ipvs_synproxy ipvs_synproxy_testbed webui tests bench
	$(VENV)/bin/mypy ipvs_synproxy ipvs_synproxy_testbed webui bench
	$(SP) kmod checkpatch

# Fast host tests: no kernel involved.
unit: deps
	$(PY) -m pytest -q tests/unit

# The build pipeline and the testbed contract (builds modules, boots guests).
# The DKMS install test (built on the host, installed in a guest) runs in
# vm-test's queue instead, in the slot of whichever guest suite ends first.
testbed-test: deps
	$(PY) -m pytest -q --durations=12 --ignore=tests/testbed/test_dkms.py tests/testbed

# End-to-end tests inside the guest against the real patched modules.
# The whole suite once per supported kernel series apt serves, and each
# series' DKMS install test, two guests at a time, the suites first; reports and
# logs in $(RESULTS)/{vm,dkms}-<series>.{xml,log}. VM_ARGS=--serial runs them
# one after another; VM_ARGS="--kernel 6.12" one series only.
VM_ARGS ?=
vm-test: deps
	$(SP) keepalived build
	$(PY) -m ipvs_synproxy_testbed.suite --dkms --timeout $(VM_TIMEOUT) --results $(RESULTS) $(VM_ARGS)

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
# bench/results/bench-<time>.json, bench/results/bench.png and the README table
# (which names the guest's kernel). KERNEL=6.12 (or 6.1) picks the series;
# default the newest supported one apt serves.
BENCH_TIMEOUT ?= 2400
BENCH_ARGS ?=
BENCH_RAW := build/bench/run.json
KERNEL ?=
bench: deps
	$(SP) kmod build $(if $(KERNEL),--kernel $(KERNEL))
	mkdir -p build/bench
	rm -f $(BENCH_RAW)
	$(SP) vm exec $(if $(KERNEL),--kernel $(KERNEL)) --topology --nic-pair --timeout $(BENCH_TIMEOUT) -- \
		python -m bench.run --out $(BENCH_RAW) $(BENCH_ARGS)
	$(PY) -m bench.report $(BENCH_RAW) --results bench/results --readme README.md

clean:
	rm -rf build
