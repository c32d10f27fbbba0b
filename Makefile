# The two commands a user needs: `make run` and `make test`. Everything else is set up on demand.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck unit bench clean

$(BIN)/.installed: pyproject.toml shop/pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required (python3.11, python3.12 or python3.13 on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The library with every extra, and the shop (its own distribution) beside it.
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		-e '.[cli,prometheus,embedded,sqlalchemy,testing,dev]' -e './shop[bench]'
	@touch $@

run: $(BIN)/.installed
	$(BIN)/pglayer-shop serve $(ARGS)

test: $(BIN)/.installed lint typecheck unit

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/pglayer-shop bench

clean:
	# The embedded server first: stopped, and its files removed wherever they are kept.
	# Refused while a running `make run` (or another process) uses it.
	if test -x $(BIN)/python; then $(BIN)/python -c 'import sys, pglayer; sys.excepthook = lambda t, e, tb: print("make clean:", e, file=sys.stderr); pglayer.EmbeddedPostgres(".pglayer").destroy()' || exit 1; fi
	rm -rf $(VENV) .pglayer .mypy_cache .pytest_cache .ruff_cache
