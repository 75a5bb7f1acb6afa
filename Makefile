# culvert — build, test and install. Only `deps` installs anything (apt packages, pytest);
# `make demo` and `make test` run it first so they work on a fresh Debian 12 machine with
# Swift, and every other target expects the machine to be set up already.

PREFIX ?= /usr/local
DESTDIR ?=
SWIFT ?= swift
PYTHON ?= python3
RELEASE_FLAGS = -c release --static-swift-stdlib
BIN = .build/release/culvert
# Build and test dependencies from apt; installed only when missing.
APT_PACKAGES = libssl-dev zlib1g-dev pkg-config python3 iproute2 procps nftables openssh-server openssh-client openssl haproxy nginx proxychains4 dante-server

.PHONY: all deps build test unit-test e2e-test bench-selftest demo install uninstall clean bench

# Prerequisites are run one after another, left to right: `deps` must finish before anything
# builds, and the swift targets share .build, which one build at a time may use.
.NOTPARALLEL:

all: build

deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@$(PYTHON) -c 'import pytest' 2>/dev/null || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pytest >/dev/null 2>&1; \
		 $(PYTHON) -c 'import pytest' 2>/dev/null) || \
		$(PYTHON) -m pip install --quiet pytest || \
		$(PYTHON) -m pip install --quiet --break-system-packages pytest
	@$(PYTHON) -c 'import socks' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet PySocks || \
		$(PYTHON) -m pip install --quiet --break-system-packages PySocks
	@$(PYTHON) -c 'import websockets.asyncio.client' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet websockets || \
		$(PYTHON) -m pip install --quiet --break-system-packages websockets
	@$(PYTHON) -c 'import prometheus_client' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet prometheus-client || \
		$(PYTHON) -m pip install --quiet --break-system-packages prometheus-client

build:
	$(SWIFT) build $(RELEASE_FLAGS)

unit-test:
	$(SWIFT) test

e2e-test: build
	CULVERT_BIN=$(abspath $(BIN)) $(PYTHON) -m pytest -q -p no:cacheprovider Tests/e2e

# The benchmark harness's own tests (parsers, report, targets, process handling): seconds,
# no benchmark is run.
bench-selftest:
	$(PYTHON) -m pytest -q -p no:cacheprovider bench/test_harness.py

test: deps unit-test e2e-test bench-selftest

demo: deps build
	CULVERT_BIN=$(abspath $(BIN)) $(PYTHON) Tests/demo/demo.py

bench: build
	$(PYTHON) bench/run.py $(if $(QUICK),--quick,)

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/culvert
	install -m 0644 man/culvert.1 $(DESTDIR)$(PREFIX)/share/man/man1/culvert.1

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/culvert $(DESTDIR)$(PREFIX)/share/man/man1/culvert.1

clean:
	rm -rf .build
