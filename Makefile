# LLM Lab — the commands a learner types. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A pinned torch first: where a CPU build of 2.13.0 lies on disk pip takes it in seconds; an
# unpinned torch would pull a multi-GB CUDA build. GPU users: make setup TORCH="torch==2.13.0"
# with their CUDA index configured, or any torch>=2.4,<2.15 already in the venv.
TORCH  ?= torch==2.13.0
KERNEL := llm-lab
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# Tests: smoke profile, batch mode (no live redraws), no hub traffic.
TEST_ENV := LABKIT_PROFILE=smoke LABKIT_BATCH=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
            MPLBACKEND=Agg PYDEVD_DISABLE_FILE_VALIDATION=1

.PHONY: help setup assets kernel browser lab run test test-unit test-notebooks test-ui contract bench clean-smoke

help:
	@echo "make setup   create .venv, install labkit + dependencies, register the kernel, fetch assets"
	@echo "make lab     open JupyterLab on notebooks/ with the LLM Lab kernel"
	@echo "make run     execute every notebook (full profile) into build/run/ + summary"
	@echo "make test    unit tests + every notebook through nbval (smoke profile) + UI tests"
	@echo "make test-ui only the JupyterLab-in-Chromium UI tests (screenshots: tests/ui/artifacts/)"
	@echo "make bench   training tokens/s and MFU: labkit GPT vs HF Llama, vs the measured matmul peak"

setup: $(VENV)/.installed kernel assets browser
	@$(PY) -m labkit check | tail -n 1

# Re-installs only when pyproject.toml changes: a second `make setup` takes seconds.
$(VENV)/.installed: pyproject.toml
	@$(PY) -c "import sys; assert sys.version_info >= (3, 10)" 2>/dev/null || \
	  { rm -rf $(VENV); $(PYTHON) -c "import sys; assert sys.version_info >= (3, 10), 'LLM Lab needs Python >= 3.10'" \
	    && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

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
	$(TEST_ENV) $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider --durations=5

test-unit: setup
	$(TEST_ENV) $(PY) -m pytest tests -p no:cacheprovider

test-ui: setup
	$(TEST_ENV) $(PY) -m pytest tests/ui -p no:cacheprovider -v

test-notebooks: setup
	$(TEST_ENV) $(PY) -m pytest notebooks --nbval-lax -p no:cacheprovider --durations=0

bench: setup
	$(PY) benchmarks/train_throughput.py --json build/bench.json
	$(PY) benchmarks/decode_throughput.py --json build/decode_bench.json

contract:
	$(PY) ../shared/tools/nbcontract.py

clean-smoke:
	rm -rf build/smoke
