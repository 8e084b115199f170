# iChat: `make run` starts the gateway with a managed vLLM worker; `make test` runs the suite.
# Both install what they need first (into .venv) and build the small real models.

VENV       ?= .venv
PY         := $(VENV)/bin/python
MODELS_DIR ?= $(HOME)/.cache/ichat/models
CONFIG     ?= conf/quickstart.yaml
PYTEST_ARGS ?=

export ICHAT_MODELS_DIR := $(MODELS_DIR)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: system setup models sglang-args-venv test test-fast run worker bench bench-routing clean

setup:
	@scripts/setup_venv.sh

system:
	@scripts/setup_system.sh

models: setup
	@$(PY) scripts/prepare_models.py --models-dir "$(MODELS_DIR)"

# SGLang's real argument parser in its own small venv (SGLang itself cannot run here).
sglang-args-venv:
	@scripts/setup_sglang_parser_venv.sh

# Fast in-process tests first; the real-engine end-to-end tests last.
test: system setup models sglang-args-venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS)
	$(PY) -m pytest -q -p no:cacheprovider -m e2e --durations=15 $(PYTEST_ARGS)

test-fast: system setup sglang-args-venv
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

run: setup models
	@$(PY) -m ichat.gateway --config $(CONFIG)

worker: setup models
	@$(PY) -m ichat.worker --model "$(MODELS_DIR)/smollm2-135m-instruct" --served-model-name smollm2 \
		--port 8001 --enforce-eager --max-model-len 2048

bench: setup models
	@$(PY) benchmarks/gateway_overhead.py
	@$(MAKE) --no-print-directory bench-routing

# Routing: policy cost per request and index memory; then hit rate / TTFT on two real replicas.
bench-routing: setup models
	@$(PY) benchmarks/routing_policy_cost.py
	@$(PY) benchmarks/routing_quality.py

clean:
	rm -rf $(VENV) .venv-sglang-args .pytest_cache
