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

.PHONY: help setup assets kernel lab run test test-unit test-notebooks contract clean-smoke

help:
	@echo "make setup   create .venv, install labkit + dependencies, register the kernel, fetch assets"
	@echo "make lab     open JupyterLab on notebooks/ with the LLM Lab kernel"
	@echo "make run     execute every notebook (full profile) into build/run/ + summary"
	@echo "make test    unit tests + every notebook through nbval (smoke profile)"

setup: $(VENV)/.installed kernel assets
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

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

run: setup
	LABKIT_BATCH=1 MPLBACKEND=Agg $(PY) -m labkit run --profile full --out build/run $(NOTEBOOKS)

test: setup
	$(TEST_ENV) $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider --durations=5

test-unit: setup
	$(TEST_ENV) $(PY) -m pytest tests -p no:cacheprovider

test-notebooks: setup
	$(TEST_ENV) $(PY) -m pytest notebooks --nbval-lax -p no:cacheprovider --durations=0

contract:
	$(PY) ../shared/tools/nbcontract.py

clean-smoke:
	rm -rf build/smoke
