# `make demo` and `make test` work on a fresh clone: they create .venv and install what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.winnow-installed
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test lint check bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m pipeline.demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q $(TEST_ARGS)

# ruff's pyflakes, import order, bugbear and pyupgrade rules at 120 columns (pyproject.toml): zero findings
lint: install
	$(BIN)/ruff check .

# before a commit: lint, then the fast tier
check: lint test

bench: install
	$(BIN)/python bench/curate_images.py
	$(BIN)/python bench/scorers.py
	$(BIN)/python bench/video.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/hostile.py

# one GPU machine, unattended, no downloads (random weights at real sizes): bench/gpu.json and a table
bench-gpu: install
	$(BIN)/python bench/gpu.py

clean:
	rm -rf demo_out .pytest_cache
