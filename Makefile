# Two commands do all set-up on a fresh machine (see README):
#   make demo   create .venv, install, train the default ViT on the embedded digits, evaluate,
#               write a checkpoint and an attention-rollout PNG under outputs/demo
#   make test   create .venv if needed and run the whole test suite (CPU; kernels under TRITON_INTERPRET=1)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ZOO := $(VENV)/bin/zoo
DEMO_DIR ?= outputs/demo
PYTEST_WORKERS ?= 2

.PHONY: venv demo test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	$(ZOO) train experiment=vit_digits run_dir=$(DEMO_DIR)
	$(ZOO) eval ckpt=$(DEMO_DIR)/checkpoints/last.ckpt
	$(ZOO) viz rollout ckpt=$(DEMO_DIR)/checkpoints/last.ckpt out=$(DEMO_DIR)/attention_rollout.png
	@echo "demo outputs in $(DEMO_DIR)"

test: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

bench: venv
	$(ZOO) bench attention

clean:
	rm -rf $(VENV) outputs build *.egg-info
