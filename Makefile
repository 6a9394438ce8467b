# Two commands for a fresh machine (see README):
#   make serve   set up .venv, execute the notebooks (smoke), build the site, serve it on 127.0.0.1:8000
#   make test    set up .venv (and headless Chromium for the browser test), run the full test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# GPU users: make serve TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>" or preinstall torch in .venv.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install serve site notebooks lab test browser lint bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Install the CPU torch only where the venv has none: GPU users keep the build they brought.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[docs,test]"
	@touch $@

install: $(VENV)/.installed

notebooks: install
	$(PY) -m reference_impls.knowledge.notebooks --smoke

site: notebooks
	$(VENV)/bin/mkdocs build --strict

serve: site
	@echo "Serving the atlas on http://127.0.0.1:$(PORT) (Ctrl-C to stop)"
	$(PY) -m http.server $(PORT) --bind 127.0.0.1 --directory site

# Open the notebooks in JupyterLab (installed by the set-up), from the repository root as the notebooks expect.
lab: install
	$(VENV)/bin/jupyter lab --notebook-dir=. notebooks/

# Debian's Chromium and ChromeDriver drive the real-browser test; installed here when absent.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium/chromedriver missing: the browser test will be skipped (run as root or: sudo apt-get install chromium chromium-driver)"; fi; \
	fi

test: install browser
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=25 tests

lint: install
	$(VENV)/bin/ruff check reference_impls tests benchmarks

bench: install
	$(PY) -m benchmarks.rollout_overhead
	$(PY) -m benchmarks.update_overhead
	$(PY) -m benchmarks.grpo_step_cost
	$(PY) -m benchmarks.dpok_kl_share
	$(PY) -m benchmarks.relation_given_objects
	$(PY) -m benchmarks.overoptimisation
	$(PY) -m benchmarks.render_speed
	$(PY) -m benchmarks.method_table --seeds 0 1 2

# Every method's gpu preset for a few iterations plus an SD-size UNet update at bf16 (needs CUDA; says so without).
gpu-check: install
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf site build docs/code docs/bib docs/methods docs/families docs/taxonomy.md docs/bibliography.md docs/notebooks docs/assets/generated docs/assets/mathjax
