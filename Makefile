# The two commands: `make demo` runs a real trial end to end; `make test` sets up and tests.
SHELL := /bin/bash
export AUTOVIBE_DATA ?= $(CURDIR)/var
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
# command:Debian package
APT_PACKAGES := git:git bwrap:bubblewrap socat:socat redis-server:redis-server tmux:tmux \
  cloud-init:cloud-init virt-xml-validate:libvirt-clients xmllint:libxml2-utils \
  systemd-analyze:systemd qemu-img:qemu-utils iptables:iptables chromium:chromium \
  c++:g++ objdump:binutils mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs genisoimage:genisoimage \
  qemu-system-x86_64:qemu-system-x86 libvirtd:libvirt-daemon-system vncsnapshot:vncsnapshot

.PHONY: setup bytecode system-deps demo test test-fast test-vm lint typecheck bench bench-deps down clean schema

## setup: install uv if absent, then the locked environment (.venv); llama.cpp compiles once.
## From uv's cache first (--offline): online, uv revalidates the llama-cpp-python sdist once
## its HTTP cache entry is stale, and a registry that answers with a new copy means another
## ~8-minute compile; offline it reuses the wheel it built. Nothing cached: online.
setup: system-deps
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
	  || python3 -m pip install --quiet --break-system-packages uv
	@$(UV) sync --frozen --offline 2>/dev/null || $(UV) sync --frozen
	@$(MAKE) --no-print-directory bytecode

## bytecode: the environment's modules and ours compiled, for plain and `python -O` runs (the
## proxy's mitmdump). Python reads .pyc files where PYTHONDONTWRITEBYTECODE keeps it from writing
## them (as on CI machines); without them every process compiles all it imports again (the
## proxy: 1.9 s to listen, 0.8 s with them). The environment's only when it changed since.
PACKAGES := contracts common traffic budget orchestrator proxy ledger retention serving workers secretstore
bytecode:
	@lib=$$($(UV) run --frozen python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	stamp="$$(dirname "$$lib")/.autovibe-bytecode"; \
	if [ ! -e "$$stamp" ] || [ "$$lib" -nt "$$stamp" ]; then \
	  $(UV) run --frozen python -m compileall -q -j0 -o 0 -o 1 "$$lib" >/dev/null \
	    || echo "bytecode: some installed modules did not compile; they compile when imported"; \
	  touch "$$stamp"; fi
	@$(UV) run --frozen python -m compileall -q -j0 -o 0 -o 1 $(PACKAGES) >/dev/null

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do command -v $${p%%:*} >/dev/null || missing="$$missing $${p##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "please install:$$missing"; exit 1; fi; fi

## demo: start model server, proxy and API; run configs/trials/demo.yaml; print the report
demo: setup
	$(UV) run --frozen autovibe demo

## test: lint, type-check and the whole suite (real processes; live suites need *_ADDR)
## --no-loadscope-reorder: the files go out in the order tests/conftest.py gives them, longest
## first by tests/durations.json, so the two workers finish together.
test: setup lint typecheck
	$(UV) run --frozen pytest -q -n 2 --dist loadfile --no-loadscope-reorder

## test-fast: unit and in-process tests, and those that start our own small processes (mitmdump,
## the deterministic model, bubblewrap); no llama.cpp, Ray, Superset, whole stack or `slow` test. Under 3 min on 2 cores.
FAST := not (live or e2e or model or ray or superset or slow)
test-fast:
	$(UV) run --frozen pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "$(FAST)"

## test-vm: boot a worker VM under libvirt, check it and run a demo assignment in it (root; image
## cached in ~/.cache/autovibe/vm-data): 6-10 min under TCG on 2 cores, +30 s after a code change, +4 min for a first build
test-vm: setup
	$(UV) run --frozen pytest -q -m vm tests/workers/test_vm_boot.py

lint:
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

typecheck:
	$(UV) run --frozen mypy contracts common traffic budget orchestrator proxy ledger workers serving retention secretstore bench

schema:
	$(UV) run --frozen autovibe config schema

## bench: every benchmark in bench/ (python -m bench.<name>), figures into docs/benchmarks.md
BENCHES := $(filter-out __init__ report,$(basename $(notdir $(wildcard bench/*.py))))
## bench-deps: nginx for bench.proxy's static upstream (else it falls back to its asyncio stub)
bench-deps:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; \
	  else echo "please install nginx-light (bench.proxy falls back to its asyncio upstream)"; fi; }

bench: setup bench-deps
	@for b in $(BENCHES); do echo "== bench.$$b"; $(UV) run --frozen python -m bench.$$b $(BENCH_ARGS) || exit 1; done

down:
	-$(UV) run --frozen autovibe down

clean: down
	rm -rf var .venv
