# The two set-up commands a newcomer runs: `make demo` and `make test`.
# Each creates the virtual environment when absent; torch is pinned by constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erasekit-installed

.PHONY: install demo test test-slow bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The tests also exercise the optional NudeNet judge (AGPL-3.0): only `make test` installs it.
TEST_STAMP := $(VENV)/.erasekit-test-installed
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,nudenet]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/erasekit demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
