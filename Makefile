# Two commands do all the set-up (README, "Two commands"):
#   make demo   install what is missing, then train BN against BNET on digits and print the table
#   make test   install what is missing (a browser for the docs test too), build the docs site (which runs every
#               notebook, failing on any cell error, as nbdev-test would), run every pytest test
# The individual steps are listed in README ("Step by step") for installing by hand.
SHELL := /bin/bash
PYTHON ?= python
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= runs/digits
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export MPLBACKEND := Agg

.PHONY: demo test install browser sync docs

# pip runs only for what is missing, so an installed checkout starts at once and one installed elsewhere is left alone.
install:
	@$(PYTHON) .ci/missing.py $(TORCH) || $(PYTHON) -m pip install -q $(TORCH)
	@$(PYTHON) .ci/missing.py || $(PYTHON) -m pip install -q -e ".[dev]"

# --resume: a second `make demo` prints the finished table again, and an interrupted one continues.
demo: install
	bnet-train --dataset digits --arch xresnet18 --norm bn,bnet --epochs 5 --out $(DEMO_OUT) --resume

# Debian's chromium and chromedriver for tests/test_docs_site.py, where apt exists; elsewhere that test skips and says how to enable it.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "no apt-get: the docs-site browser test will skip (install chromium and chromedriver to run it)"; exit 0; fi; \
	SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
	for i in 1 2 3; do $$SUDO apt-get update -qq && break; echo "apt-get update failed (try $$i)" >&2; sleep 10; done; \
	for i in 1 2 3; do $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null && break; \
	  echo "apt-get install chromium failed (try $$i)" >&2; sleep 10; done; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { echo "could not install chromium and chromium-driver" >&2; exit 1; }

# The notebooks are the source: exporting them must leave the generated modules as they are.
sync: install
	@before=$$(cat bnet_fastai/*.py bnet_fastai/*/*.py 2>/dev/null | md5sum); nbdev-export; \
	if [ "$$before" != "$$(cat bnet_fastai/*.py bnet_fastai/*/*.py 2>/dev/null | md5sum)" ]; then \
	  echo "nbdev-export changed bnet_fastai/: the notebooks and the modules were out of sync (commit the exported files)" >&2; exit 1; fi

# The site build runs each notebook's cells as nbdev-test does and fails on any cell error: it is the notebooks' test.
docs: install
	$(PYTHON) docs/build.py

# Two pytest workers, one file each at a time (a file's shared fixtures are built once), one torch thread each; files
# in tests/conftest.py's order (longest first), not xdist's (most tests first, which puts the README blocks last).
# pytest's exit status 5 means it collected nothing: fail rather than pass vacuously.
TEST_WORKERS ?= 2
test: install browser sync docs
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
