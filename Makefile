# Everything a fresh machine needs: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch first, pinned exactly (a looser pin can pull a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedscore demo

lint: $(STAMP)
	$(BIN)/ruff check .

# all tests, including one real multi-process Flower federation
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# in-process tests only
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not federation"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
