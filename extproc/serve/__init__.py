"""The I/O shell of the running router: it pumps bytes and observes.

gRPC: ``h2c`` is the purpose-built HTTP/2 server over the sans-I/O frame
layer ``h2frames``, ``grpc_aio`` the same service on grpc.aio, ``rpc`` the
contract both serve, ``limits`` every HTTP/2 limit with its reason, and
``transport`` picks a server by name. ``server`` runs the workers (one
process per Envoy endpoint, snapshots, signals, drain), ``telemetry`` exports
metrics, traces and logs, ``snapshot`` writes and reads the calibration file,
``monitor`` scrapes the pools' vLLM ``/metrics`` (once, shared by the workers).
No routing decision is made here: every message is handed to
``extproc.core`` (``StreamMachine``, ``Router``).

May import: ``extproc.core``, ``extproc.admin`` (served beside ext_proc),
``extproc.config``/``defaults``, ``extproc.dns``/``tls``, asyncio, sockets, clocks. Must not import
``extproc.tools``, ``envoy``, ``backend`` or ``planner``.
"""
