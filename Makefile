# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo lint test smoke bench clean

# Re-install only when the project metadata changed; pip takes torch/torchvision from local disk.
# The export extra (onnx, onnxscript, onnxruntime): the ONNX tests of tests/test_export_cli.py need it; the
# tracking extra (mlflow-skinny): the --mlflow test of tests/test_search.py.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -e '.[dev,export,tracking]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) launch/search.py

# tests/test_monitoring.py loads the Ray dashboard in a real headless browser: Debian's chromium.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

# Lint and format check first: seconds, before a half-hour suite.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint $(CHROMIUM)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/step_cost.py --quick

clean:
	rm -rf build *.egg-info .pytest_cache
