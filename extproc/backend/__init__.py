"""Simulated OpenAI/vLLM-compatible backend pools (``budget-router backend``).

* ``pool``: one replica as the planner models it (``planner.sim.instance``,
  the project's one model of vLLM's scheduler) driven by an injected clock;
* ``tokens``: prompt token counting with a Llama-3-like chat template;
* ``server``: aiohttp shell serving /v1/chat/completions, /v1/completions,
  /v1/models, /health and /metrics;
* ``cli``: the ``backend`` subcommand.

May import: ``extproc.config``/``defaults``, the planner's simulator
(``extproc.planner.sim``: the scheduler model and hardware profiles), ``extproc.core``'s
pure request parsing, and its own modules (it stands in for vLLM, so it knows
nothing of the router's policy). Must not import ``extproc.tools``
or ``extproc.cli``.
"""
