# Entry points, each installing what it needs into .venv first:
#   make demo   - the main job: DiP-GO timestep-reuse search on the digits reference UNet
#   make test   - the test suite
#   make lock   - re-resolve the newest releases and rewrite requirements.lock
VENV ?= .venv
PYTHON ?= python3
LOCK := requirements.lock
STAMP := $(VENV)/.dipgo-installed

.PHONY: install demo test test-all lint lock

# requirements.lock pins every package (pip included) at the version the suite and
# docs/RESULTS.md were measured with; pyproject.toml only keeps the lower bounds.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -c $(LOCK) --upgrade pip
	$(VENV)/bin/python -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dipgo search recipe=digits_unet_reuse

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A fresh venv resolved from pyproject.toml alone (newest releases pip may install here), frozen.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Written by 'make lock' on $$(date -u +%Y-%m-%d), $$(.lock-venv/bin/python -V), $$(uname -sm)."; \
	  echo "# 'make install' installs exactly these versions (pip -c); edit pyproject.toml, then run 'make lock'."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv
