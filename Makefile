# Two commands do all set-up on a fresh machine (see README):
#   make demo   create .venv, install, train the default ViT on the embedded digits (a 60-epoch version of
#               the vit_digits recipe, a few minutes on 2 CPU cores), evaluate, predict, write a checkpoint
#               and an attention-rollout PNG under outputs/demo. The full recipe of checkpoints/vit_digits
#               (250 epochs with EMA): make demo DEMO_ARGS=
#   make bench  the issue-2 benchmark: attend() vs SDPA and the zoo ViT training step vs timm's, one run
#   make test   create .venv if needed and run the whole test suite (CPU; kernels under TRITON_INTERPRET=1)
# Any pytest failure fails `make test`, including exit code 5 (no tests collected).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ZOO := $(VENV)/bin/zoo
DEMO_DIR ?= outputs/demo
DEMO_ARGS ?= trainer.max_epochs=60 task.ema_decay=0.0
PYTEST_WORKERS ?= 2
TESTS ?= tests

.PHONY: venv demo test test-fast bench gpu-check public-names clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	rm -rf $(DEMO_DIR)  # a new run: zoo train refuses a run_dir that holds one
	$(ZOO) train experiment=vit_digits run_dir=$(DEMO_DIR) $(DEMO_ARGS)
	$(ZOO) eval ckpt=$(DEMO_DIR)/checkpoints/last.ckpt
	$(ZOO) predict ckpt=$(DEMO_DIR)/released input=digits:0 input=digits:1 input=digits:2
	$(ZOO) viz rollout ckpt=$(DEMO_DIR)/released image=digits:0 out=$(DEMO_DIR)/attention_rollout.png
	@echo "demo outputs in $(DEMO_DIR): checkpoints/last.ckpt, released/ (safetensors + config.json), attention_rollout.png"

test: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 $(TESTS)

test-fast: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" $(TESTS)

gpu-check:  # no venv prerequisite: the script takes .venv when present, else the image's python3 (no install)
	bash tests/run_gpu_kernels.sh

bench: venv
	$(ZOO) bench vision --markdown

public-names: venv
	$(PY) -m tests.test_public_api --update

clean:
	rm -rf $(VENV) outputs build *.egg-info
