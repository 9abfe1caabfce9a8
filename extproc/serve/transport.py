"""Pick the ext_proc gRPC server by name (config: ``[router] transport``).

* ``"fast"``: ``extproc.serve.h2c.serve_fast``, the purpose-built h2c server.
* ``"grpcio"``: ``extproc.serve.grpc_aio.serve_grpcio``, the same service on
  grpc.aio, the reference baseline and fallback.

Both take the same arguments and serve the contract of ``extproc.serve.rpc``.
"""

from __future__ import annotations

from .grpc_aio import serve_grpcio
from .h2c import serve_fast
from .rpc import NewStream


async def serve(transport: str, new_stream: NewStream, host: str, port: int, **kw):
    """Pick a transport by name: "fast" or "grpcio" (config: [router] transport)."""
    if transport == "fast":
        return await serve_fast(new_stream, host, port, **kw)
    if transport == "grpcio":
        return await serve_grpcio(new_stream, host, port, **kw)
    raise ValueError(f"unknown transport {transport!r}; expected 'fast' or 'grpcio'")
