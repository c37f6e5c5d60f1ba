# Quick start: `make demo` runs the main job, `make test` the tests. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the versions the suite runs against; `make test-latest` empties it to test the newest releases
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test test-latest test-slow lint bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first: any other torch requirement pulls gigabytes of CUDA packages
	$(PY) -m pip install --quiet $(PIN) torch==2.13.0
	# the distribution was named cvt until it became cvt-pytorch: drop an old editable install of that name
	$(PY) -m pip uninstall --quiet --yes cvt 2>/dev/null || true
	$(PY) -m pip install --quiet $(PIN) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cvt demo

test: $(STAMP)
	$(PY) -m pytest -q

# the suite against the newest release of every dependency (torch stays the CPU 2.13.0), in a fresh .venv-latest
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) .venv-latest build dist src/*.egg-info .pytest_cache
