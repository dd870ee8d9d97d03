# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test smoke bench clean

# Re-install only when the project metadata changed; pip takes torch/torchvision from local disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) launch/search.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/step_cost.py --quick

clean:
	rm -rf build *.egg-info .pytest_cache
