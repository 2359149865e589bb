# Two entry points, each installing what it needs into .venv first:
#   make demo   - the main job: DiP-GO timestep-reuse search on the digits reference UNet
#   make test   - the test suite
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.dipgo-installed

.PHONY: install demo test test-all lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
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
