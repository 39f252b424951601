# Set-up and tests of ganeti-kvm.  The cache of downloaded and built things
# (QEMU 10.0, the test guest) is $(GANETI_KVM_CACHE).
GANETI_KVM_CACHE ?= /var/cache/ganeti-kvm
export GANETI_KVM_CACHE

PYTHON ?= python3

.PHONY: setup test lint guest clean distclean

# Debian packages, the package itself (editable), QEMU 10.0 and the guest.
setup:
	sh scripts/setup.sh

test: setup
	$(MAKE) lint
	$(PYTHON) -m pytest -q tests

# Type check and lint, both at zero findings (settings: mypy.ini, ruff.toml).
lint:
	$(PYTHON) -m mypy
	$(PYTHON) -m ruff check .

# Build the test guest if it is not cached yet, and print its paths.
guest:
	$(PYTHON) -m tests.guestimage

# Build leftovers in the work tree; the cache is kept (see distclean).
clean:
	rm -rf build dist .pytest_cache ./*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Also drop the cache: the next setup downloads and builds everything again.
distclean: clean
	rm -rf "$(GANETI_KVM_CACHE)"

# The README's first command: set up, then boot, show, migrate and stop a real VM.
.PHONY: demo
demo: setup
	$(PYTHON) examples/demo.py

.PHONY: bench
bench: setup
	$(PYTHON) bench/run.py

# Make ganeti-kvm the KVM driver of this node's Ganeti 3.x (dpkg-divert), and undo
# it byte for byte.  ARGS passes options, e.g. ARGS=--no-restart.
.PHONY: ganeti-install ganeti-remove
ganeti-install:
	$(PYTHON) -m ganeti_kvm ganeti install $(ARGS)

ganeti-remove:
	$(PYTHON) -m ganeti_kvm ganeti remove $(ARGS)

# The Debian package (debhelper, dh-python), lintian clean: built in a temporary
# copy of the tree, cached in $(GANETI_KVM_CACHE)/deb by the tree's hash; the
# last line printed is the .deb's path (tests.debpkg.build() returns it too).
.PHONY: deb
deb:
	@deb=$$($(PYTHON) -m tests.debpkg) && \
		lintian --allow-root --fail-on error,warning "$$deb" && echo "$$deb"

# gnt-cluster upgrade --to 3.1 of a Ganeti 3.0 test cluster that runs ganeti-kvm
# (the .deb) with instances running; part of make test, this runs it alone.
.PHONY: cluster-upgrade-test
cluster-upgrade-test: setup
	$(PYTHON) -m pytest -q -s tests/test_cluster_upgrade.py
