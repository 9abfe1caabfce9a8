"""A stand-in for the router's per-stream state machine (extproc/core/machine.py),
used to measure transports alone: it answers request_headers with CONTINUE
and request_body with the routing header mutation, clear_route_cache and a
dynamic-metadata Struct, then closes the stream with OK, like a routed,
unsampled request in the real router."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

ROUTING_HEADER = "x-budget-pool"


def _body_response(pool: str) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    common = resp.request_body.response
    common.clear_route_cache = True
    hv = common.header_mutation.set_headers.add()
    hv.header.key = ROUTING_HEADER
    hv.header.raw_value = pool.encode()
    hv.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    md = struct_pb2.Struct()
    ns = md.fields["token_budget_router"].struct_value
    ns.fields["pool"].string_value = pool
    ns.fields["estimate"].number_value = 1234
    resp.dynamic_metadata.CopyFrom(md)
    return resp


class TrivialHandler:
    __slots__ = ("_n",)

    def __init__(self) -> None:
        self._n = 0

    def receive(self, req: pb.ProcessingRequest):
        which = req.WhichOneof("request")
        if which == "request_headers":
            r = pb.ProcessingResponse()
            r.request_headers.SetInParent()
            if req.request_headers.end_of_stream:  # no body: route now
                return [r], True
            return [r], False
        if which == "request_body":
            return [_body_response("short" if len(req.request_body.body) < 65536 else "long")], True
        return [], True

    def abort(self) -> None:
        pass

    def finish(self) -> None:
        pass


def new_stream(metadata=None) -> TrivialHandler:
    return TrivialHandler()
