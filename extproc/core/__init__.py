"""The pure core: everything that decides, and nothing that waits.

Here live the request parser (``request``), the byte-class features
(``features``), the learned prompt-token estimator (``estimator``), the output
budget (``output_budget``), the routing policy (``policy``), the facade that
ties them together (``router``: route → want_sample → learn), response usage
parsing (``usage``), the per-stream ext_proc state machine (``machine``),
the OpenAI-style error bodies (``errors``), what a body holds beyond text
(``content_coding`` bounded decompression, ``images`` dimensions from image
headers, ``media`` audio/file parts), and the closed loop: pool signals
turned into per-tier load (``load``), ``spillover`` and the adaptive tier
boundaries (``threshold``). The same objects run online (driven
by ``extproc.serve``), offline (``extproc.tools.replay``) and in the planner.

May import: the standard library's pure parts, numpy, orjson, the Envoy/
protobuf message classes, ``extproc.config.schema`` (not the config package,
whose loader reads files) and ``extproc.defaults``. Must not import
``extproc.serve``, ``tools``, ``envoy``, ``backend``, ``planner``, ``admin``,
nor ``asyncio``, ``socket``, ``time``, ``random``, ``os``, ``tomllib`` (or
anything else that does I/O, reads a clock or draws randomness of its own):
clocks and random numbers are passed in. ``tests/test_architecture.py``
enforces it through everything the core imports, transitively.
"""
