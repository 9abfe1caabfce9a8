"""The Envoy side: ``bootstrap`` renders (and validates with the real
``envoy --mode validate``) the Envoy bootstrap that puts the router in front of
the pools, from the same ``Config`` the router runs with. The checked-in
``envoy/*.yaml`` files are its output.

May import: ``extproc.config``/``defaults`` and envoy-data-plane's typed
messages. Must not import ``extproc.core``, ``serve`` or ``tools``: what Envoy
is told depends on the configuration, never on routing state.
"""
