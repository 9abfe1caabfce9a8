"""What the router's two gRPC servers share: the contract with the service.

Both servers (``extproc.serve.h2c``, the fast one, and ``extproc.serve.grpc_aio``,
the reference) serve the same methods with the same signature: the
router's per-stream state machine (a ``StreamHandler``, one per ext_proc
stream: ``receive`` returns the responses to send and whether to close the
stream with OK right after them), Health/Check, and extra unary / streaming
methods (the admin API, reflection). ``extproc.serve.transport`` picks one.
"""

from __future__ import annotations

from typing import Callable, Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_WATCH_METHOD = "/grpc.health.v1.Health/Watch"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

#: Health services answered SERVING by default: "" (the whole server, what
#: Envoy's grpc_health_check asks when no service_name is set) and ext_proc.
DEFAULT_HEALTH_SERVICES = ("", EXT_PROC_SERVICE)

# gRPC status codes (grpc/doc/statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14


class StreamHandler(Protocol):
    def receive(self, req: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]: ...
    def abort(self) -> None: ...
    def finish(self) -> None: ...


#: ``new_stream(metadata)``: ``metadata`` holds the call's trace-context
#: headers (traceparent, tracestate) when the client sent them: Envoy puts
#: the context of its ext_proc span there, so the router's span can be its child.
NewStream = Callable[..., StreamHandler]

#: Extra methods served beside Process and Health/Check (the admin API and
#: reflection). A unary method maps its request bytes to (grpc status code,
#: message, response bytes); a streaming one maps each request message to one
#: response message and ends with OK when the client half-closes.
UnaryMethod = Callable[[bytes], tuple[int, str, bytes]]
StreamingMethod = Callable[[bytes], bytes]

#: gRPC call headers passed to new_stream (W3C trace context).
TRACE_METADATA = ("traceparent", "tracestate")
