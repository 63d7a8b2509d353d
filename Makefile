# One entry point for people and CI. `make test` and `make demo` work on a
# fresh Debian 12 machine: both depend on `setup`, which installs what is missing.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
UV    := $(VENV)/bin/uv
export BCC_KERNEL_SOURCE := $(CURDIR)/build/kernel-headers

.PHONY: setup lock lint typecheck unit netns fuzz vm-test example-test vm-stress test demo bench bench-host bench-vm clean

setup:
	@bash scripts/setup.sh

# Re-resolve uv.lock on purpose (after editing pyproject.toml; LOCK_ARGS=--upgrade to move every
# pin), re-export uv's own hash-pinned bootstrap file from it, then install the new lock.
lock: setup
	$(UV) lock $(LOCK_ARGS)
	$(UV) export --frozen --quiet --only-group uv --no-emit-project -o packaging/uv-requirements.txt
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check controlplane tests vm-tests bench examples
	$(VENV)/bin/ruff format --check controlplane tests vm-tests bench examples

# Tests, VM drivers, benchmarks and examples are type-checked as strictly as the package.
typecheck: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict tests
	MYPYPATH=vm-tests/suite $(VENV)/bin/mypy --strict vm-tests/suite vm-tests/*.py
	$(VENV)/bin/mypy --strict bench examples

unit: setup
	$(PY) -m pytest -q tests/unit

# Host kernel only: the plugin's VM tests (offload_vm) are listed as skipped here and run
# by example-test, in the same boot as the example.
netns: setup
	$(PY) -m pytest -q tests/netns --offload-vm=never

# Not part of `make test` (the unit suite runs each target a few seconds): the
# fuzzing targets of tests/unit/test_fuzz.py with many more random inputs each
# (FUZZ_EXAMPLES per target, default 5,000: about 5 minutes in all on a loaded machine).
FUZZ_EXAMPLES ?= 5000
fuzz: setup
	OFFLOADCTL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/unit/test_fuzz.py

vm-test: setup
	$(PY) vm-tests/run --timeout 2700 --results build/vm-results -- $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider vm-tests/suite -o junit_logging=system-out --junitxml=build/vm-results/junit.xml

# The operator's example (README "Test your config") and the plugin's own VM tests, run as
# a user runs them: through the pytest plugin, which sends them to the VM on a kernel
# without flowtables (one boot; the kernel/initramfs cache is vm-tests/run's) and fails
# rather than skips without one.
example-test: setup
	OFFLOADCTL_VM_CACHE=$(CURDIR)/build/vm $(PY) -m pytest -q -p no:cacheprovider \
	    examples/testing tests/netns/test_plugin_vm.py --offload-vm=require \
	    --junitxml=build/example-results/junit.xml

# Not part of `make test`: every invalidation scenario 10 times in one boot (~13 min), and the
# next-hop change (issue 20) 10 times idle and 10 with a CPU hog in the guest,
# for chasing intermittent failures; each failure prints the router's state.
vm-stress: setup
	$(PY) vm-tests/run --timeout 2700 --results build/vm-stress --env VMTEST_REPEAT=10 -- $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider vm-tests/suite/test_invalidation.py
	$(PY) vm-tests/run --timeout 2700 --results build/vm-stress-nexthop --env VMTEST_REPEAT=10 --env VMTEST_CPU_HOG=both -- $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider vm-tests/suite/test_nexthop.py

test: lint typecheck unit netns vm-test example-test

demo: setup
	@bash scripts/demo.sh

bench: bench-host bench-vm

# Each benchmark prints a table whose baselines are measured in the same run.
bench-host: setup
	$(PY) bench/bench_cli.py
	$(PY) bench/bench_apply.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_codec.py
	$(PY) bench/bench_invalidation.py
	$(PY) bench/bench_agent.py
	$(PY) bench/bench_startup.py
	$(PY) bench/bench_reuseport.py

bench-vm: setup
	$(PY) vm-tests/run --results build/vm-bench -- $(CURDIR)/$(PY) vm-tests/bench_vm.py
	$(PY) vm-tests/run --results build/vm-bench-invalidation -- \
	    $(CURDIR)/$(PY) vm-tests/bench_invalidation_vm.py --runs 5
	$(PY) vm-tests/run --results build/vm-bench-agent -- \
	    $(CURDIR)/$(PY) bench/bench_agent.py --join-latency 100
	$(PY) vm-tests/run --results build/vm-bench-startup -- \
	    $(CURDIR)/$(PY) bench/bench_startup.py

.PHONY: deb package-check

# build/offloadctl_VERSION_ARCH.deb: the app in a private venv under /opt/offloadctl.
deb: setup
	bash packaging/deb/build.sh

# Installs the .deb on this machine (root), runs and verifies it, then purges it.
package-check: deb
	bash packaging/deb/check.sh

clean:
	rm -rf build .mypy_cache .pytest_cache .ruff_cache
