# Everything a fresh machine needs: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

# torch first, with pip and pinned exactly: pip finds the CPU build on this kind of machine's disk (a looser pin, or
# uv, would download a multi-GB CUDA build). The rest with uv, which resolves the same versions as pip here (checked
# with a diff of both freezes) in ~15 s against pip's 1-2 min; pip takes over if uv cannot. uv compiles the
# bytecode at install, as pip does: otherwise every process that a fresh test run or demo starts at once (test
# workers, SuperLink, SuperNodes, party workers) compiles flwr, scipy, sklearn... on its own first import.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0 uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]' || \
		$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedscore demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Tests run in parallel (pytest-xdist), one test module per worker at a time so that a module's shared training
# (its module-scoped fixtures) runs once; the 15 slowest tests are listed at the end. TEST_WORKERS=1 runs serially.
# Modules are handed out longest first (tests/conftest.py orders them; xdist's own reorder, by number of tests,
# would start the few-test Flower modules last and leave one worker idle at the end).
# The tests write bytecode even where PYTHONDONTWRITEBYTECODE is set (as in this project's shared sessions): pytest
# then keeps its assertion-rewritten test modules in tests/__pycache__, where each worker would otherwise rewrite and
# compile all 43 of them again at collection (11.7 s -> 6.4 s per process, BENCHMARKS.md "Test tiers"), and the
# processes the tests start find the checkout's own modules compiled.
TEST_WORKERS ?= 2
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

# everything, as CI runs it: lint, units, in-process runs, real Flower federations (`federation`), `slow` tests
test: $(STAMP) lint
	$(PYTEST)

# what a developer runs while working: units and in-process runs on small data (no federation, nothing `slow`)
test-fast: $(STAMP)
	$(PYTEST) -m "not federation and not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
