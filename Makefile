# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   set up .venv and run the main job on the built-in simulator
#   make test   set up .venv with dev extras and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint bench-simulator clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# A real tritonserver for the Triton tests and benchmark: the binary of the nvidia-pytriton
# wheel (55 MB download, 144 MB installed; Triton 2.51 with the Python backend), installed
# with --no-deps into its own folder because the wheel pins numpy<2. Not fatal when it
# cannot be installed: the Triton-server tests then skip, saying why.
PYTRITON := $(VENV)/pytriton/.installed-0.7.0
$(PYTRITON): | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/pytriton \
		nvidia-pytriton==0.7.0 && touch $@ \
		|| echo "nvidia-pytriton not installed: the tests that need tritonserver will skip"

demo: $(STAMP)
	$(BIN)/genrerank demo

test: $(STAMP) $(PYTRITON)
	$(BIN)/ruff check .
	# Two workers, each test file on one (module fixtures are built once): 8 min, not 12.
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

bench-simulator: $(STAMP)
	$(BIN)/python benchmarks/bench_simulator.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
