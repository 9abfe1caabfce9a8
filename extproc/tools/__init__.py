"""Commands built on the rest: ``stack`` (``budget-router up``: Envoy, router
and pools as local processes), ``demo`` with its traffic (``demo_traffic``),
``burst`` (``demo --scenario burst``: closed-loop routing vs static),
``replay`` (a request log through the core, offline), and the real-vLLM pools
(``vllm_pool`` starts a vLLM CPU server, ``tiny_qwen`` generates its tiny
random-weight Qwen2 model directory with the real Qwen tokenizer).

May import everything in the package (core, serve, envoy, backend, planner,
admin); nothing but ``extproc.cli`` imports from here.
"""
