# Two commands do all set-up on a fresh machine (see README):
#   make demo   - the main job on the embedded SmolLM2-135M-Instruct
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv model demo test test-fast clean-venv

$(VENV)/.installed: setup.py requirements/cpu-vllm.txt requirements/constraints-cpu.txt scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

venv: $(VENV)/.installed

model: venv
	$(PY) -m vllm_kvzip.models smollm2

demo: model
	$(PY) -m vllm_kvzip.demo

test: model
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
