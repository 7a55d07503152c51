# LLM Lab — the commands a learner types. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A pinned torch first: where a CPU build of 2.13.0 lies on disk pip takes it in seconds; an
# unpinned torch would pull a multi-GB CUDA build. GPU users: make setup TORCH="torch==2.13.0"
# with their CUDA index configured (any CUDA build of 2.13.0 satisfies the lock). Another torch
# version: make setup TORCH="torch==X" LOCK= (installs without the lock).
TORCH  ?= torch==2.13.0
# Exact versions of everything else, as a pip constraints file (`make lock` regenerates it).
LOCK   ?= requirements.lock
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check $(if $(LOCK),-c $(LOCK))
KERNEL := llm-lab
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# The test environment (smoke profile, batch mode, no hub traffic) is set in conftest.py, so
# `make test` and a bare `pytest` run the same; pyproject.toml adds the doctests and nbval.

.PHONY: help setup lock assets kernel browser lab run test test-unit test-notebooks test-ui contract bench clean-smoke

help:
	@echo "make setup   create .venv, install labkit + dependencies (from requirements.lock), register the kernel, fetch assets"
	@echo "make lock    re-resolve requirements.lock from pyproject.toml (UPGRADE=1: newest allowed versions)"
	@echo "make lab     open JupyterLab on notebooks/ with the LLM Lab kernel"
	@echo "make run     execute every notebook (full profile) into build/run/ + summary"
	@echo "make test    unit tests + every notebook through nbval (smoke profile) + UI tests"
	@echo "make test-ui only the JupyterLab-in-Chromium UI tests (screenshots: tests/ui/artifacts/)"
	@echo "make bench   training tokens/s and MFU (labkit GPT vs HF Llama); decode tokens/s (labkit, HF, ONNX Runtime) vs the memory floor"

setup: $(VENV)/.installed kernel assets browser
	@$(PY) -m labkit check | tail -n 1

# Re-installs only when pyproject.toml or the lock changes: a second `make setup` takes seconds.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PY) -c "import sys; assert sys.version_info >= (3, 11)" 2>/dev/null || \
	  { rm -rf $(VENV); $(PYTHON) -c "import sys; assert sys.version_info >= (3, 11), 'LLM Lab needs Python >= 3.11'" \
	    && $(PYTHON) -m venv $(VENV); }
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]"
	@touch $@

# The lock: every package and version `make setup` installs, resolved by uv for Linux, macOS
# and Windows and every Python the lab supports, with torch held at $(TORCH). Kept pins stay
# unless pyproject.toml rules them out (UPGRADE=1 takes the newest allowed). torch's own CUDA
# libraries (nvidia-*, cuda-*, triton) are left out: torch pins them exactly itself, and
# leaving them out lets a CUDA build of the same torch satisfy the lock. Needs PyPI.
UV_VERSION := uv>=0.9,<1
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check "$(UV_VERSION)"
	@mkdir -p build/lock && echo "$(TORCH)" > build/lock/torch.txt
	@cp $(LOCK) build/lock/resolved.txt 2>/dev/null || true
	$(PY) -m uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
	  --constraint build/lock/torch.txt --no-header --quiet $(if $(UPGRADE),--upgrade) \
	  --output-file build/lock/resolved.txt
	@{ echo "# requirements.lock: the exact version of every package LLM Lab installs, for Linux, macOS"; \
	   echo "# and Windows, Python >= 3.11. A pip constraints file: make setup and environment.yml run"; \
	   echo "#   pip install -c requirements.lock \"$(TORCH)\" && pip install -c requirements.lock -e \".[dev]\""; \
	   echo "# Generated from pyproject.toml by \`make lock\` ($$($(PY) -m uv --version | cut -d' ' -f1-2)): edit pyproject.toml,"; \
	   echo "# run \`make lock\` (keeps current pins where still allowed; \`make lock UPGRADE=1\` takes the"; \
	   echo "# newest allowed versions), commit both. torch's CUDA libraries (nvidia-*, cuda-*, triton)"; \
	   echo "# are left out on purpose: torch pins them itself, so any CUDA build of this torch fits."; \
	   echo "#"; \
	   awk '/^[^ #]/ { skip = ($$0 ~ /^(nvidia-|cuda-|triton==)/) } !skip' build/lock/resolved.txt; \
	 } > $(LOCK)
	@echo "$(LOCK): $$(grep -c '^[a-z]' $(LOCK)) pins; torch $$(grep '^torch==' $(LOCK))"

kernel: $(VENV)/.installed
	@$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "LLM Lab (.venv)" >/dev/null
	@echo "kernel '$(KERNEL)' registered in $(VENV)"

assets: $(VENV)/.installed
	$(PY) -m labkit assets fetch

# The UI tests drive Debian's chromium (Playwright's own browser download is not used).
# Installed with apt where we are root and it is missing; otherwise the UI tests skip.
browser:
	@if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then \
	  echo "chromium: found (UI tests will run)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium: installing with apt-get (about 1 min)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    && echo "chromium: installed"; \
	else \
	  echo "chromium: not found and cannot apt-get it here; the UI tests will skip (install chromium to run them)"; \
	fi

# Jupyter refuses to run as root unless told; containers often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG)

run: setup
	$(PY) -m labkit run --profile full --out build/run $(NOTEBOOKS)

test: setup
	$(PY) -m pytest labkit tests notebooks --durations=5

test-unit: setup
	$(PY) -m pytest labkit tests

test-ui: setup
	$(PY) -m pytest tests/ui -v

test-notebooks: setup
	$(PY) -m pytest notebooks --durations=0

bench: setup
	$(PY) benchmarks/train_throughput.py --json build/bench.json
	$(PY) benchmarks/decode_throughput.py --json build/decode_bench.json

contract:
	$(PY) ../shared/tools/nbcontract.py

clean-smoke:
	rm -rf build/smoke
