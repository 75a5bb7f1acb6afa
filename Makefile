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

# `make deb` packages the binary that is there (`make build deb` rebuilds it first), so that
# the packaging test can package the binary the e2e tests ran, without a release build.
DEB_DIR ?= .build/deb
# gzip: seconds instead of minutes for xz on a 60 MB binary, and read by every dpkg.
DEB_COMPRESSION ?= gzip
DEB_ROOT = $(DEB_DIR)/root

.PHONY: all deps build test unit-test e2e-test bench-selftest demo install uninstall clean bench deb

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

# The binary, the man pages and the shell completions under the prefix $(1); $(2) is zsh's
# directory under share/zsh (site-functions for a local install, Debian's
# vendor-completions in the package). The completions come from the binary's own argument
# parser, so they always match its options.
define install-files
	install -d $(1)/bin $(1)/share/man/man1 $(1)/share/man/man5 $(1)/share/bash-completion/completions \
		$(1)/share/zsh/$(2) $(1)/share/fish/vendor_completions.d
	install -m 0755 $(BIN) $(1)/bin/culvert
	install -m 0644 man/culvert.1 $(1)/share/man/man1/culvert.1
	install -m 0644 man/culvert.toml.5 $(1)/share/man/man5/culvert.toml.5
	$(BIN) --generate-completion-script bash > $(1)/share/bash-completion/completions/culvert
	$(BIN) --generate-completion-script zsh > $(1)/share/zsh/$(2)/_culvert
	$(BIN) --generate-completion-script fish > $(1)/share/fish/vendor_completions.d/culvert.fish
	chmod 0644 $(1)/share/bash-completion/completions/culvert $(1)/share/zsh/$(2)/_culvert \
		$(1)/share/fish/vendor_completions.d/culvert.fish
endef

install: build
	$(call install-files,$(DESTDIR)$(PREFIX),site-functions)

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/culvert $(DESTDIR)$(PREFIX)/share/man/man1/culvert.1 \
		$(DESTDIR)$(PREFIX)/share/man/man5/culvert.toml.5 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/culvert \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions/_culvert \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/culvert.fish

$(BIN):
	$(SWIFT) build $(RELEASE_FLAGS)

# culvert_VERSION_ARCH.deb in $(DEB_DIR), VERSION from `culvert --version`: the binary in
# /usr/bin (stripped, as Debian ships binaries), man pages (gzipped, as Debian keeps them), completions, the systemd units in
# /lib/systemd/system (their ExecStart pointed at /usr/bin/culvert) and the copyright file.
deb: $(BIN)
	rm -rf $(DEB_ROOT)
	$(call install-files,$(DEB_ROOT)/usr,vendor-completions)
	strip --strip-unneeded $(DEB_ROOT)/usr/bin/culvert
	gzip -9n $(DEB_ROOT)/usr/share/man/man1/culvert.1 $(DEB_ROOT)/usr/share/man/man5/culvert.toml.5
	install -d $(DEB_ROOT)/lib/systemd/system $(DEB_ROOT)/usr/share/doc/culvert $(DEB_ROOT)/DEBIAN
	for unit in contrib/systemd/*.service; do \
		sed 's|/usr/local/bin/culvert|/usr/bin/culvert|g' $$unit > $(DEB_ROOT)/lib/systemd/system/$${unit##*/}; \
		chmod 0644 $(DEB_ROOT)/lib/systemd/system/$${unit##*/}; \
	done
	install -m 0644 contrib/deb/copyright $(DEB_ROOT)/usr/share/doc/culvert/copyright
	@set -e; version=$$($(BIN) --version); arch=$$(dpkg --print-architecture); \
	size=$$(du -sk --exclude=DEBIAN $(DEB_ROOT) | cut -f1); \
	sed -e "s/@VERSION@/$$version/" -e "s/@ARCH@/$$arch/" -e "s/@SIZE@/$$size/" contrib/deb/control \
		> $(DEB_ROOT)/DEBIAN/control; \
	dpkg-deb --build --root-owner-group -Z$(DEB_COMPRESSION) $(DEB_ROOT) $(DEB_DIR)/culvert_$${version}_$${arch}.deb

clean:
	rm -rf .build
