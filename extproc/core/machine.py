"""Per-request ext_proc state machine: ProcessingRequest in, ProcessingResponses out.

Sans-I/O in the style of h11: no sockets, no clocks, no randomness of its own
(the sampler's uniform draw is injected). The transport calls ``receive`` for
every message Envoy sends on one stream and writes back what it returns; when
the second value is True it ends the stream with gRPC OK, which makes Envoy
continue the HTTP request without the processor (the cheap way to skip the
response phase of requests we do not learn from).

Phases of one stream (Envoy config: request headers SKIP, request body
BUFFERED, response headers SEND, response body STREAMED; a two-exchange
config sends the request headers too, and both work):

    request_headers  -> (two-exchange configs) continue; or 413 at once when
                        Content-Length is over the limit; 415 for a
                        Content-Encoding we cannot decode; route long and
                        close for non-LLM requests (also a Content-Type that
                        is not JSON)
    request_body     -> first message of the stream (one exchange): the same
                        header checks, on the headers the message carries as
                        request attributes (``attribute_headers``); then
                        decode a gzip/deflate body within the body limit
                        (then forward it decoded); decide: routing header
                        (raw_value) + clear_route_cache + dynamic metadata; or
                        an immediate 400/413; close unless this response is
                        sampled
    response_headers -> note status / content type; close if nothing to learn
                        (also when no request phase came first: a request
                        without a body, or Envoy's own answer)
    response_body*   -> scan chunks for usage (never changing them unless we
                        added include_usage ourselves); at end of stream: learn
                        and close

The transitions between these phases are one table, ``TRANSITIONS``
((state, event) -> next state; anything else raises ``IllegalTransition``).
The machine talks to the router through ``extproc.core.port.RouterPort``.

Every message gets exactly one response of its own kind, in order, whatever
state we are in (duplicate end-of-stream, empty chunks, late trailers); a bug
in the core never loses the request: it is routed to the long pool.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from . import content_coding
from .. import defaults as D
from . import policy as P
from .policy import Decision
from .port import RouterPort
from .usage import JSONUsage, SSEUsage, Usage, context_error

log = logging.getLogger(__name__)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON_CT = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
    append_action=_OVERWRITE,
)

# Immutable responses, serialised once (the transport serialises per send).
_CONTINUE_REQ_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_CONTINUE_RESP_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_REQ_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
_CONTINUE_RESP_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
_CONTINUE_REQ_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_CONTINUE_RESP_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

#: Kinds of harmful misroute the response phase detects (metric label
#: ``kind``): a tier below the last (the short pool, with two) refused the
#: prompt with a context-length 400 (every vLLM version), or vLLM 0.32+
#: answered 200 but cut the answer at that tier's max_model_len
#: (finish_reason "length").
MISROUTE_CONTEXT = "context_length"
MISROUTE_TRUNCATED = "truncated"

#: Media types a JSON body may be sent as. FastAPI (vLLM's server) parses a
#: body as JSON only for these (or no Content-Type at all) and refuses others
#: itself, so the router mirrors it: any other type is routed long unparsed.
_JSON_TYPE = "application/json"
_JSON_SUFFIX = "+json"


def is_json_content_type(value: str) -> bool:
    media = value.split(";", 1)[0].strip().lower()
    return media == _JSON_TYPE or (media.startswith("application/") and media.endswith(_JSON_SUFFIX))


class State(enum.IntEnum):
    """Where one stream is: the phase whose message it waits for."""

    REQ_HEADERS = 0
    REQ_BODY = 1
    RESP_HEADERS = 2
    RESP_BODY = 3
    DONE = 4  # nothing left to do: every further message is answered "continue"


class Event(enum.IntEnum):
    """What happened on a stream: the machine's decisions and the transport's calls."""

    HEADERS_CONTINUED = 0  # request headers of a JSON POST: wait for its body
    HEADERS_ROUTED = 1     # request headers decided it (no body, not JSON): routed, closed
    REFUSED = 2            # an immediate response (413, 415, 400): closed
    BODY_PART = 3          # part of a split request body: wait for the rest
    ROUTED_WATCHED = 4     # body routed, its response watched (sampled or near a limit)
    ROUTED = 5             # body routed, nothing to watch: closed
    RESPONSE_READ = 6      # response headers worth reading the body of
    RESPONSE_SKIPPED = 7   # response headers with nothing to learn: closed
    RESPONSE_PART = 8      # a chunk of a watched response body
    RESPONSE_END = 9       # the end of a watched response body: learned, closed
    UNKNOWN_MESSAGE = 10   # a message of no kind we know: closed
    FAILED = 11            # the core raised: routed to the last tier, closed
    FINISHED = 12          # the transport saw the client half-close
    ABORTED = 13           # the transport saw the stream reset


#: Every transition of one stream, as h11's ``_state.py`` keeps them: (state,
#: event) -> next state. Any pair not here is a bug (``IllegalTransition``).
#: Messages that arrive out of phase (a duplicate end of stream, late
#: trailers) are answered "continue" and change nothing: they are no event.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.REQ_HEADERS, Event.HEADERS_CONTINUED): State.REQ_BODY,
    (State.REQ_HEADERS, Event.HEADERS_ROUTED): State.DONE,
    (State.REQ_HEADERS, Event.REFUSED): State.DONE,
    (State.REQ_BODY, Event.BODY_PART): State.REQ_BODY,
    (State.REQ_BODY, Event.REFUSED): State.DONE,
    (State.REQ_BODY, Event.ROUTED_WATCHED): State.RESP_HEADERS,
    (State.REQ_BODY, Event.ROUTED): State.DONE,
    (State.REQ_HEADERS, Event.RESPONSE_SKIPPED): State.DONE,
    (State.REQ_BODY, Event.RESPONSE_SKIPPED): State.DONE,
    (State.RESP_HEADERS, Event.RESPONSE_READ): State.RESP_BODY,
    (State.RESP_HEADERS, Event.RESPONSE_SKIPPED): State.DONE,
    (State.RESP_BODY, Event.RESPONSE_PART): State.RESP_BODY,
    (State.RESP_BODY, Event.RESPONSE_END): State.DONE,
    # From anywhere (DONE included: abort after the end is a no-op).
    **{(state, event): State.DONE for state in State
       for event in (Event.UNKNOWN_MESSAGE, Event.FAILED, Event.FINISHED, Event.ABORTED)},
}


class IllegalTransition(Exception):
    """The machine tried a transition ``TRANSITIONS`` does not have (a bug)."""

    def __init__(self, state: State, event: Event):
        super().__init__(f"no transition from {state.name} on {event.name}")
        self.state, self.event = state, event


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)


def _headers_dict(hdrs: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in hdrs.headers.headers:
        out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


#: Dynamic-metadata key that names the Content-Encoding of a body the router
#: forwards decoded ("identity"); Envoy's routes copy it into the request.
CONTENT_ENCODING_METADATA_KEY = "content_encoding"

#: Request attribute expression -> the header name it stands for.
_ATTRIBUTE_HEADER_ITEMS = tuple(D.EXT_PROC_REQUEST_ATTRIBUTES)


def attribute_headers(req: pb.ProcessingRequest) -> dict[str, str]:
    """The request headers a body message carries as attributes
    (``ProcessingRequest.attributes``: one Struct per filter, keyed by the
    filter's name, each field keyed by the attribute expression)."""
    out: dict[str, str] = {}
    for attrs in req.attributes.values():
        fields = attrs.fields
        for key, name in _ATTRIBUTE_HEADER_ITEMS:
            if key in fields:  # (a lookup in C; iterating the map is Python)
                value = fields[key].string_value  # "" unless a string
                if value:
                    out[name] = value
    return out


def _fill_metadata(s: struct_pb2.Struct, namespace: str, d: Decision,
                   extra: dict[str, object] | None = None) -> None:
    # Field by field: Struct.update() walks Python values generically and
    # costs ~15 us per request; direct assignment costs ~3 us.
    fields = s.fields[namespace].struct_value.fields
    values = d.metadata()
    if extra:
        values.update(extra)
    for key, value in values.items():
        if type(value) is str:
            fields[key].string_value = value
        else:
            fields[key].number_value = value


def _metadata(namespace: str, d: Decision, extra: dict[str, object] | None = None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    _fill_metadata(s, namespace, d, extra)
    return s


#: (routing header, pool) -> a routed request's response without its
#: metadata (header mutation, clear_route_cache), serialised: constant per
#: pool (bounded by the configured pools). Parsing it in C and filling the
#: metadata in place costs ~5 us less per request than building the
#: messages field by field.
_ROUTE_BODY_HEAD: dict[tuple[str, str], bytes] = {}


class StreamMachine:
    """One ext_proc stream. ``draw`` returns a uniform number in [0, 1)."""

    def __init__(self, router: RouterPort, draw: Callable[[], float]):
        self.router = router
        self.draw = draw
        self.state = State.REQ_HEADERS
        self.path = ""
        self.method = ""
        self.request_headers: dict[str, str] = {}
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.codings: tuple[str, ...] = ()  # Content-Encoding to undo
        self.decision: Decision | None = None
        self.sampled = False
        self.injected_usage = False
        self.scanner: JSONUsage | SSEUsage | None = None
        self.response_status = 0
        self.watch_misroute = False   # routed below the last tier near its limit: check the status
        self.misroute = ""            # "" or MISROUTE_CONTEXT / MISROUTE_TRUNCATED
        self.usage: Usage | None = None
        self.learned = False
        self.rel_error: float | None = None
        self.aborted = False

    def _to(self, event: Event) -> None:
        """Take the transition ``event`` calls for in this state."""
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise IllegalTransition(self.state, event) from None

    # --- transport interface -------------------------------------------------
    def receive(self, req: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self._on_request_headers(req.request_headers)
            if kind == "request_body":
                if self.state == State.REQ_HEADERS:
                    # The header phase was skipped: what it gave comes with
                    # the body, as request attributes.
                    refused = self._on_attributes(req)
                    if refused is not None:
                        return refused
                return self._on_request_body(req.request_body)
            if kind == "response_headers":
                return self._on_response_headers(req.response_headers)
            if kind == "response_body":
                return self._on_response_body(req.response_body)
            if kind == "request_trailers":
                return [_CONTINUE_REQ_TRAILERS], False
            if kind == "response_trailers":
                return [_CONTINUE_RESP_TRAILERS], self.state == State.DONE
        except Exception:  # a bug must not lose the request: answer and go on
            log.exception("ext_proc state machine failed on %s; continuing without the router", kind)
            return [self._fallback(kind)], True
        # Empty, or a kind this version does not know: there is no response
        # of its kind to give, so end the stream (OK) and let Envoy go on
        # without us rather than wait for an answer that never comes.
        log.warning("ext_proc message of unknown kind %r: closing the stream", kind)
        self._to(Event.UNKNOWN_MESSAGE)
        return [], True

    @property
    def held_bytes(self) -> int:
        """Body bytes this stream keeps between messages (a split request
        body, a JSON response body scanned for usage): the transport counts
        them against its memory budget."""
        s = self.scanner
        if self.body_parts:
            return self.body_size
        if type(s) is JSONUsage and not s.done and not s.overflow:
            return s.size
        return 0

    def abort(self) -> None:
        # A client that stops reading at "data: [DONE]" makes Envoy reset the
        # stream before the body's end reaches us: the usage is already here.
        if self.state == State.RESP_BODY and not self.learned:
            self._learn()
        self.aborted = True
        self._to(Event.ABORTED)

    def finish(self) -> None:
        self._to(Event.FINISHED)

    # --- phases ----------------------------------------------------------------
    def _on_request_headers(self, msg: pb.HttpHeaders) -> tuple[list[pb.ProcessingResponse], bool]:
        if self.state != State.REQ_HEADERS:
            return [_CONTINUE_REQ_HEADERS], False
        d = self._check_headers(_headers_dict(msg), msg.end_of_stream)
        if d is None:
            self._to(Event.HEADERS_CONTINUED)
            return [_CONTINUE_REQ_HEADERS], False
        if d.status is not None:
            return self._refuse(d)
        return [self._route_headers(d)], True

    def _on_attributes(self, req: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool] | None:
        """The request's headers from the body message's attributes (header
        phase skipped): refused or routed here, or None to go on to the body."""
        d = self._check_headers(attribute_headers(req), False)
        if d is None:
            self._to(Event.HEADERS_CONTINUED)
            return None
        if d.status is not None:
            return self._refuse(d)
        self._routed(d)
        return [self._route_body(d, None)], True

    def _check_headers(self, h: dict[str, str], end_of_stream: bool) -> Decision | None:
        """What the request headers alone decide: a route (not an LLM
        request), a refusal, or None (read the body)."""
        self.request_headers = h
        self.path = h.get(":path", "")
        self.method = h.get(":method", "")
        router = self.router
        if end_of_stream or self.method != "POST":
            return router.not_llm(f"{self.method or 'request'} without a body" if end_of_stream
                                  else f"method {self.method}")
        length = h.get("content-length")
        if length is not None and length.isdigit() and int(length) > router.stream_settings.max_body_bytes:
            return router.too_large(int(length))
        ctype = h.get("content-type")
        if ctype is not None and ctype != _JSON_TYPE and not is_json_content_type(ctype):
            return router.not_llm(f"content-type {ctype[:64]!r} is not JSON")
        coding = h.get("content-encoding")
        if coding is not None and coding not in content_coding.IDENTITY:
            codings = content_coding.parse_codings(coding)
            if isinstance(codings, content_coding.Unsupported):
                return router.unsupported_encoding(codings.coding[:64])
            self.codings = codings
        return None

    def _on_request_body(self, msg: pb.HttpBody) -> tuple[list[pb.ProcessingResponse], bool]:
        if self.state != State.REQ_BODY:
            return [_CONTINUE_REQ_BODY], self.state == State.DONE
        max_body_bytes = self.router.stream_settings.max_body_bytes
        part = msg.body  # (each read of a bytes field copies it out of the message: once)
        if part:
            self.body_size += len(part)
            if self.body_size <= max_body_bytes:
                self.body_parts.append(part)
        if not msg.end_of_stream:
            # BUFFERED mode sends one message; tolerate a split body anyway.
            self._to(Event.BODY_PART)
            return [_CONTINUE_REQ_BODY], False
        decoded = None
        if self.body_size > max_body_bytes:
            d = self.router.too_large(self.body_size)
        else:
            body = self.body_parts[0] if len(self.body_parts) == 1 else b"".join(self.body_parts)
            if self.codings:
                decoded = body = self._decode(body)
            d = body if isinstance(body, Decision) else self.router.route(self.path, body)
        self.body_parts = []
        self.decision = d
        if d.status is not None:
            self._to(Event.REFUSED)
            return [self._immediate(d)], True
        mutation = None
        self.watch_misroute = self.router.near_threshold_short(d)
        # A watched stream without usage gets include_usage added (and its
        # usage chunk cut out of what the client receives), so a truncation
        # misroute is counted by default, not only when the client asked.
        if (d.stream and not d.include_usage and d.routable
                and (self.router.stream_settings.inject_include_usage or self.watch_misroute)):
            mutation = self._inject_include_usage(body)
        if mutation is None and decoded is not None:
            mutation = decoded  # pools read plain bodies (vLLM does not decompress requests)
        self.sampled = mutation is not None or self.router.want_sample(d, self.draw())
        keep = self.sampled or self.watch_misroute
        self._to(Event.ROUTED_WATCHED if keep else Event.ROUTED)
        return [self._route_body(d, mutation)], not keep

    def _on_response_headers(self, msg: pb.HttpHeaders) -> tuple[list[pb.ProcessingResponse], bool]:
        if self.state in (State.REQ_HEADERS, State.REQ_BODY):
            # A response before the request reached us whole: a request
            # without a body (header phase skipped) or Envoy's own answer
            # (a body over its buffer). Nothing to route or learn.
            self._to(Event.RESPONSE_SKIPPED)
            return [_CONTINUE_RESP_HEADERS], True
        if self.state != State.RESP_HEADERS:
            return [_CONTINUE_RESP_HEADERS], self.state == State.DONE
        h = _headers_dict(msg)
        status = h.get(":status", "0")
        self.response_status = int(status) if status.isdigit() else 0
        ctype = h.get("content-type", "")
        encoded = h.get("content-encoding", "identity") not in ("", "identity")
        watch = self.watch_misroute and not encoded and not msg.end_of_stream
        if watch and self.response_status == 400:
            # Maybe vLLM's "maximum context length" error: read the JSON body.
            self.scanner = JSONUsage()
            self._to(Event.RESPONSE_READ)
            return [_CONTINUE_RESP_HEADERS], False
        if not (self.sampled or watch) or self.response_status != 200 or encoded or msg.end_of_stream:
            # (A watched 200 is read for finish_reason "length": vLLM 0.32+
            # cuts a too-long answer short instead of refusing it.)
            self._to(Event.RESPONSE_SKIPPED)
            return [_CONTINUE_RESP_HEADERS], True
        if ctype.startswith("text/event-stream"):
            self.scanner = SSEUsage(strip_usage_chunk=self.injected_usage)
        else:
            self.scanner = JSONUsage()
        self._to(Event.RESPONSE_READ)
        return [_CONTINUE_RESP_HEADERS], False

    def _on_response_body(self, msg: pb.HttpBody) -> tuple[list[pb.ProcessingResponse], bool]:
        if self.state != State.RESP_BODY or self.scanner is None:
            return [_CONTINUE_RESP_BODY], self.state == State.DONE
        out = self.scanner.feed(msg.body, msg.end_of_stream)
        if out is not None and out != msg.body:
            resp = pb.ProcessingResponse(response_body=pb.BodyResponse(
                response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=out))))
        else:
            resp = _CONTINUE_RESP_BODY
        if not msg.end_of_stream:
            if isinstance(self.scanner, SSEUsage) and self.scanner.done and not self.learned:
                self._learn()  # [DONE] seen: the usage chunk came before it
            self._to(Event.RESPONSE_PART)
            return [resp], False
        self._to(Event.RESPONSE_END)
        if not self.learned:
            self._learn()
        return [resp], True

    # --- helpers -----------------------------------------------------------------
    def _refuse(self, d: Decision) -> tuple[list[pb.ProcessingResponse], bool]:
        self.decision = d
        self._to(Event.REFUSED)
        return [self._immediate(d)], True

    def _decode(self, body: bytes) -> bytes | Decision:
        """The body with its Content-Encoding undone, or the refusal."""
        out = content_coding.decode(body, self.codings, self.router.stream_settings.max_body_bytes)
        if isinstance(out, content_coding.TooLarge):
            return self.router.decoded_too_large()
        if isinstance(out, content_coding.Corrupt):
            return self.router.undecodable(", ".join(self.codings), out.why[:200])
        return out

    def _learn(self) -> None:
        """Learn from what the response showed (at most once per stream)."""
        d = self.decision
        if d is None or self.scanner is None:
            return
        u = self.scanner.usage
        if self.response_status == 400 and isinstance(self.scanner, JSONUsage):
            # A harmful misroute the short pool caught: its error message
            # carries vLLM's own prompt count, which is worth learning from.
            e = context_error(self.scanner.text)
            if e is None:
                return
            self.misroute = MISROUTE_CONTEXT
            if e.lower_bound and e.prompt_tokens <= d.estimate:
                return  # vLLM 0.32's "at least N": says nothing the estimate did not
            u = Usage(e.prompt_tokens, None)
        elif (self.scanner.truncated and u is not None
              and self.router.truncation_misroute(d, u.prompt_tokens, u.completion_tokens)):
            self.misroute = MISROUTE_TRUNCATED
        if u is None or self.learned or not (self.sampled or self.misroute):
            return
        self.usage = u
        self.rel_error = self.router.learn(d, u.prompt_tokens, u.completion_tokens)
        self.learned = True

    def _route_common(self, d: Decision, extra: list[base_pb2.HeaderValueOption] | None = None) -> pb.CommonResponse:
        hdrs = [_header(self.router.stream_settings.routing_header, d.pool)]
        if extra:
            hdrs += extra
        return pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=hdrs), clear_route_cache=True)

    def _routed(self, d: Decision) -> None:
        """The request headers alone decided its route."""
        self.decision = d
        self._to(Event.HEADERS_ROUTED)

    def _route_headers(self, d: Decision) -> pb.ProcessingResponse:
        self._routed(d)
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=self._route_common(d)),
            dynamic_metadata=_metadata(self.router.stream_settings.metadata_namespace, d))

    def _route_body(self, d: Decision, new_body: bytes | None) -> pb.ProcessingResponse:
        settings = self.router.stream_settings
        if new_body is None:
            # The common case (see _ROUTE_BODY_HEAD).
            key = (settings.routing_header, d.pool)
            head = _ROUTE_BODY_HEAD.get(key)
            if head is None:
                head = _ROUTE_BODY_HEAD[key] = pb.ProcessingResponse(
                    request_body=pb.BodyResponse(response=self._route_common(d))).SerializeToString()
            resp = pb.ProcessingResponse.FromString(head)
            _fill_metadata(resp.dynamic_metadata, settings.metadata_namespace, d)
            return resp
        common = self._route_common(d, [_header("content-length", str(len(new_body)))])
        common.body_mutation.body = new_body
        md = None
        if self.codings:  # the new body is the decoded one, whatever else changed
            common.header_mutation.remove_headers.append("content-encoding")
            # Envoy drops a body response's header mutations when the
            # header phase was skipped; its routes set Content-Encoding
            # from this key instead (envoy.bootstrap).
            md = {CONTENT_ENCODING_METADATA_KEY: content_coding.IDENTITY_CODING}
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common),
                                     dynamic_metadata=_metadata(settings.metadata_namespace, d, md))

    def _immediate(self, d: Decision) -> pb.ProcessingResponse:
        assert d.status is not None and d.error is not None
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=d.status),
                headers=pb.HeaderMutation(set_headers=[
                    _JSON_CT, _header(self.router.stream_settings.decision_header, d.header_value())]),
                body=d.error,
                details=f"budget_router_{d.reason}",
            ),
            dynamic_metadata=_metadata(self.router.stream_settings.metadata_namespace, d))

    def _inject_include_usage(self, body: bytes) -> bytes | None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        so = doc.get("stream_options")
        if so is not None and not isinstance(so, dict):
            return None
        doc["stream_options"] = {**(so or {}), "include_usage": True}
        self.injected_usage = True
        return orjson.dumps(doc)

    def _fallback(self, kind: str | None) -> pb.ProcessingResponse:
        """Answer ``kind`` routing to the long pool (after an internal error)."""
        self._to(Event.FAILED)
        d = Decision(pool=self.router.stream_settings.fallback_pool, reason=P.R_INTERNAL)
        self.decision = d
        if kind == "request_headers":
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=self._route_common(d)))
        if kind == "request_body":
            return pb.ProcessingResponse(request_body=pb.BodyResponse(response=self._route_common(d)))
        return {
            "response_headers": _CONTINUE_RESP_HEADERS, "response_body": _CONTINUE_RESP_BODY,
            "request_trailers": _CONTINUE_REQ_TRAILERS, "response_trailers": _CONTINUE_RESP_TRAILERS,
        }.get(kind or "", _CONTINUE_RESP_BODY)
