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

.PHONY: system setup models sglang-args-venv test test-fast test-slow run worker bench bench-routing clean

setup:
	@scripts/setup_venv.sh

system:
	@scripts/setup_system.sh

models: setup
	@$(PY) scripts/prepare_models.py --models-dir "$(MODELS_DIR)"

# SGLang's real argument parser in its own small venv (SGLang itself cannot run here).
sglang-args-venv:
	@scripts/setup_sglang_parser_venv.sh

# Fast in-process tests first; the real-engine end-to-end tests last. Drills marked `slow` are
# left to `make test-slow`.
test: system setup models sglang-args-venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e and not slow" $(PYTEST_ARGS)
	$(PY) -m pytest -q -p no:cacheprovider -m "e2e and not slow" --durations=15 $(PYTEST_ARGS)

test-fast: system setup sglang-args-venv
	$(PY) -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

# The long failure drills (a 2-minute soak at 1,000 streams, a partition past the log link's
# read timeout): minutes each, run before a release.
test-slow: system setup models
	$(PY) -m pytest -q -p no:cacheprovider -m slow -s --durations=0 $(PYTEST_ARGS)

run: setup models
	@$(PY) -m ichat.gateway --config $(CONFIG)

worker: setup models
	@$(PY) -m ichat.worker --model "$(MODELS_DIR)/smollm2-135m-instruct" --served-model-name smollm2 \
		--port 8001 --enforce-eager --max-model-len 2048

# Also draws the gateway overhead results as docs/bench-gateway-overhead.png (matplotlib, for this chart only).
bench: setup models
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	@$(PY) benchmarks/gateway_overhead.py --json benchmarks/results.json
	@$(PY) benchmarks/chart.py benchmarks/results.json docs/bench-gateway-overhead.png
	@$(MAKE) --no-print-directory bench-routing

# Routing: policy cost per request and index memory; then hit rate / TTFT on two real replicas.
bench-routing: setup models
	@$(PY) benchmarks/routing_policy_cost.py
	@$(PY) benchmarks/routing_quality.py

clean:
	rm -rf $(VENV) .venv-sglang-args .pytest_cache
