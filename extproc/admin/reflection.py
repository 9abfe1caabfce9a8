"""gRPC server reflection (grpc.reflection.v1alpha and v1) for the router's
port, so ``grpcurl -plaintext HOST:PORT list`` and ``describe`` work.

Message in, message out: one ServerReflectionResponse per request, answered
from the process's protobuf descriptor pool by grpcio-reflection's own
lookup code; the transport streams them.
"""

from __future__ import annotations

from grpc_reflection.v1alpha import _base
from grpc_reflection.v1alpha import reflection_pb2 as pb

SERVICE_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
SERVICE_V1 = "grpc.reflection.v1.ServerReflection"
METHOD = "ServerReflectionInfo"


class Reflection(_base.BaseReflectionServicer):
    """Answers reflection requests for ``service_names``."""

    def respond(self, request_bytes: bytes) -> bytes:
        # v1 and v1alpha share the message layout (same field numbers).
        req = pb.ServerReflectionRequest.FromString(request_bytes)
        kind = req.WhichOneof("message_request")
        if kind == "file_by_filename":
            resp = self._file_by_filename(req, req.file_by_filename)
        elif kind == "file_containing_symbol":
            resp = self._file_containing_symbol(req, req.file_containing_symbol)
        elif kind == "file_containing_extension":
            ext = req.file_containing_extension
            resp = self._file_containing_extension(req, ext.containing_type, ext.extension_number)
        elif kind == "all_extension_numbers_of_type":
            resp = self._all_extension_numbers_of_type(req, req.all_extension_numbers_of_type)
        elif kind == "list_services":
            resp = self._list_services(req)
        else:
            resp = pb.ServerReflectionResponse(
                error_response=pb.ErrorResponse(error_code=12, error_message="unknown reflection request"),
                original_request=req)
        return resp.SerializeToString()


def methods(service_names: list[str]) -> dict[str, object]:
    """Streaming methods for the transport: path -> message handler."""
    r = Reflection(service_names + [SERVICE_V1ALPHA, SERVICE_V1])
    return {f"/{SERVICE_V1ALPHA}/{METHOD}": r.respond, f"/{SERVICE_V1}/{METHOD}": r.respond}
