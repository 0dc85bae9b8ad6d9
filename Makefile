# Two commands on a fresh machine: `make demo` (main job on the embedded default) and `make test`.
# Each sets up .venv once; a second run reinstalls nothing (the stamp tracks pyproject.toml).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo_out

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlm2rec-lab demo --out $(DEMO)

# Installs nothing outside .venv. The explorer's browser test drives a Chromium found on PATH
# through Playwright, and is skipped (with the reason) where none is; .ci/run installs Debian's
# chromium first and sets CI, under which a missing browser fails the test.
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(DEMO)
