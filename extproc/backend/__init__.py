"""Simulated OpenAI/vLLM-compatible backend pools (``budget-router backend``).

* ``engine``: pure continuous-batching timing model (injectable clock);
* ``tokens``: prompt token counting with a Llama-3-like chat template;
* ``server``: aiohttp shell serving /v1/chat/completions, /v1/completions,
  /v1/models, /health and /metrics;
* ``cli``: the ``backend`` subcommand.

May import: ``extproc.config``/``defaults`` and its own modules (it stands in
for vLLM, so it knows nothing of the router). Must not import ``extproc.tools``
or ``extproc.cli``.
"""
