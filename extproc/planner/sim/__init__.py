"""The fleet simulator: traces, hardware cost model, the vLLM instance model
(the one model of vLLM's scheduler), prefix cache, balancers, the fleet and the
router's closed loop, metrics. Imports ``extproc.core``, ``config`` and ``defaults``;
never ``sizing``, ``report``, ``serve`` or ``tools``."""
