"""The per-stream ext_proc state machine: exact ProcessingResponse sequences."""

from __future__ import annotations

import json

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format

from extproc.core import machine as M
from extproc.config import Config
from extproc.core.router import Router
from extproc.core.usage import Usage

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CONT_REQ_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONT_REQ_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONT_RESP_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONT_RESP_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
CHAT = "/v1/chat/completions"
TEXT = "Tell me about the history of Rome in a few paragraphs, please."


# --- message builders ------------------------------------------------------------------

def hmap(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                       for k, v in headers.items()])


def req_headers(path=CHAT, method="POST", eos=False, **extra) -> pb.ProcessingRequest:
    h = {":method": method, ":path": path, ":authority": "x", "content-type": "application/json"}
    h.update({k.replace("_", "-"): v for k, v in extra.items()})
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hmap(h), end_of_stream=eos))


def req_body(body: bytes, eos=True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=eos))


def resp_headers(status="200", ctype="application/json", eos=False, **extra) -> pb.ProcessingRequest:
    h = {":status": status, "content-type": ctype}
    h.update({k.replace("_", "-"): v for k, v in extra.items()})
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(h), end_of_stream=eos))


def resp_body(body: bytes, eos=False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=eos))


def chat_body(text=TEXT, **kw) -> bytes:
    return orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": text}], **kw})


def json_response(pt: int, ct: int) -> bytes:
    return orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


def content_chunk(text: str) -> bytes:
    return sse({"id": "x", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def usage_chunk(pt: int, ct: int) -> bytes:
    return sse({"id": "x", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})


def hv(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=OVERWRITE)


def metadata(resp: pb.ProcessingResponse) -> dict:
    return json_format.MessageToDict(resp.dynamic_metadata)


def confident_router(cfg: Config | None = None) -> Router:
    r = Router(cfg or Config())
    for _ in range(r.cfg.estimator.min_samples_confident):
        d = r.route(CHAT, chat_body())
        r.learn(d, 27, 100)
    return r


def machine(router=None, draw=0.99):
    router = router or confident_router()
    return M.StreamMachine(router, lambda: draw)


def expected_route_body(router: Router, body: bytes, extra=(), new_body=None) -> pb.ProcessingResponse:
    d = router.route(CHAT, body)
    common = pb.CommonResponse(header_mutation=pb.HeaderMutation(
        set_headers=[hv("x-budget-pool", d.pool), *extra]), clear_route_cache=True)
    if new_body is not None:
        common.body_mutation.body = new_body
    resp = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
    resp.dynamic_metadata.update({"token_budget_router": d.metadata()})
    return resp


# --- request phase -----------------------------------------------------------------------

def test_short_request_not_sampled_exact_sequence():
    r = confident_router()
    m = machine(r, draw=0.99)
    body = chat_body()
    assert m.receive(req_headers(content_length=str(len(body)))) == ([CONT_REQ_HEADERS], False)
    expected = expected_route_body(r, body)
    out, close = m.receive(req_body(body))
    assert out == [expected]
    assert close is True
    resp = out[0]
    common = resp.request_body.response
    assert [(h.header.key, h.header.raw_value, h.header.value) for h in common.header_mutation.set_headers] == \
           [("x-budget-pool", b"short", "")]
    assert common.header_mutation.set_headers[0].append_action == OVERWRITE
    assert common.clear_route_cache is True
    assert not common.HasField("body_mutation")
    md = metadata(resp)["token_budget_router"]
    assert md["pool"] == "short" and md["reason"] == "budget_fits_short"
    assert md["estimate"] == m.decision.estimate and 20 <= md["estimate"] <= 35
    assert m.decision.output_source == "learned" and 100 <= m.decision.output <= 110
    # issue 17: the budget shown is the padded one the limits saw, with its margin
    d = m.decision
    assert d.margin > 0 and md["budget"] == d.padded == round(d.estimate * (1 + d.margin) + d.output) > d.budget
    assert md["decision"] == (f"pool=short; est={d.estimate}; budget={d.padded}; margin={d.margin:.3f}; "
                              "cat=prose; reason=budget_fits_short")
    assert m.sampled is False and m.state == M.State.DONE


def test_short_request_sampled_then_json_usage_learned():
    r = confident_router()
    m = machine(r, draw=0.0)
    body = chat_body()
    samples = r.estimator.fits[("llama", "prose")].samples
    assert m.receive(req_headers()) == ([CONT_REQ_HEADERS], False)
    out, close = m.receive(req_body(body))
    assert out == [expected_route_body(r, body)] and close is False
    assert m.receive(resp_headers()) == ([CONT_RESP_HEADERS], False)
    data = json_response(31, 77)
    assert m.receive(resp_body(data[:40])) == ([CONT_RESP_BODY], False)
    assert m.receive(resp_body(b"")) == ([CONT_RESP_BODY], False)
    assert m.receive(resp_body(data[40:], eos=True)) == ([CONT_RESP_BODY], True)
    assert m.learned and m.state == M.State.DONE
    assert r.estimator.fits[("llama", "prose")].samples == samples + 1
    assert m.usage == Usage(31, 77) and not m.misroute
    assert m.rel_error == pytest.approx((m.decision.estimate - 31) / 31, abs=0.05)
    # late messages after the end: one response of the matching kind each, close
    assert m.receive(resp_body(b"", eos=True)) == ([CONT_RESP_BODY], True)
    assert m.receive(pb.ProcessingRequest(response_trailers=pb.HttpTrailers())) == (
        [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())], True)


def test_unconfident_router_samples_even_with_high_draw():
    r = Router(Config())
    m = machine(r, draw=0.999)
    m.receive(req_headers())
    out, close = m.receive(req_body(chat_body()))
    assert close is False and m.sampled


def test_sse_response_usage_learned():
    r = Router(Config())
    m = machine(r, draw=0.5)
    m.receive(req_headers())
    _, close = m.receive(req_body(chat_body(stream=True, stream_options={"include_usage": True})))
    assert close is False
    assert m.receive(resp_headers(ctype="text/event-stream; charset=utf-8")) == ([CONT_RESP_HEADERS], False)
    stream = content_chunk("Hello") + usage_chunk(29, 5) + b"data: [DONE]\n\n"
    for k in range(0, len(stream), 17):
        piece = stream[k:k + 17]
        assert m.receive(resp_body(piece)) == ([CONT_RESP_BODY], False)  # never changed
    assert m.receive(resp_body(b"", eos=True)) == ([CONT_RESP_BODY], True)
    assert m.learned and m.usage == Usage(29, 5)
    assert r.outputs.sketches[("llama", "prose")].samples == 1


@pytest.mark.parametrize("headers", [
    dict(status="500"), dict(status="200", content_encoding="gzip"), dict(status="200", eos=True),
])
def test_response_headers_without_learnable_body_close(headers):
    r = Router(Config())
    m = machine(r, draw=0.0)
    m.receive(req_headers())
    m.receive(req_body(chat_body()))
    assert m.receive(resp_headers(**headers)) == ([CONT_RESP_HEADERS], True)
    assert m.receive(resp_body(json_response(10, 10), eos=True)) == ([CONT_RESP_BODY], True)
    assert not m.learned
    assert all(f.samples == 0 for f in r.estimator.fits.values())


def test_content_length_over_limit_immediate_413_at_headers():
    r = Router(Config())
    m = machine(r)
    limit = r.cfg.router.max_body_bytes
    out, close = m.receive(req_headers(content_length=str(limit + 1)))
    assert close is True and len(out) == 1
    ir = out[0].immediate_response
    assert out[0].WhichOneof("response") == "immediate_response"
    assert ir.status == http_status_pb2.HttpStatus(code=413)
    assert list(ir.headers.set_headers) == [
        hv("content-type", "application/json"),
        hv("x-budget-decision", f"pool=long; est=0; budget=0; margin=0.000; cat=-; reason=body_too_large")]
    err = json.loads(ir.body)["error"]
    assert err["code"] == "request_too_large" and f"{limit + 1} bytes" in err["message"]
    assert ir.details == "budget_router_body_too_large"
    assert metadata(out[0])["token_budget_router"]["reason"] == "body_too_large"
    # a (buggy) body message afterwards still gets its own answer
    assert m.receive(req_body(b"{}")) == ([CONT_REQ_BODY], True)


def test_content_length_at_limit_continues():
    r = Router(Config())
    m = machine(r)
    assert m.receive(req_headers(content_length=str(r.cfg.router.max_body_bytes))) == ([CONT_REQ_HEADERS], False)


def test_body_over_limit_413():
    cfg = Config().replace(router={"max_body_bytes": 64 * 1024})
    r = Router(cfg)
    m = machine(r)
    assert m.receive(req_headers()) == ([CONT_REQ_HEADERS], False)  # no content-length (chunked)
    assert m.receive(req_body(b"x" * 40_000, eos=False)) == ([CONT_REQ_BODY], False)
    out, close = m.receive(req_body(b"y" * 40_000, eos=True))
    assert close is True
    ir = out[0].immediate_response
    assert ir.status.code == 413
    assert "80000 bytes" in json.loads(ir.body)["error"]["message"]
    assert m.body_parts == []


def test_impossible_length_immediate_400_json():
    r = Router(Config())
    m = machine(r)
    n = r.cfg.long.max_model_len
    body = orjson.dumps({"model": "llama", "prompt": [7] * n})
    m.receive(req_headers(path="/v1/completions"))
    out, close = m.receive(req_body(body))
    assert close is True and len(out) == 1
    ir = out[0].immediate_response
    assert ir.status.code == 400
    assert ir.details == "budget_router_context_length_exceeded"
    assert ir.headers.set_headers[0] == hv("content-type", "application/json")
    assert ir.headers.set_headers[1].header.key == "x-budget-decision"
    err = json.loads(ir.body)
    # issue 17: vLLM 0.32's shape, whoever answers
    assert err["error"]["code"] == 400 and err["error"]["param"] == "input_tokens"
    assert err["error"]["type"] == "BadRequestError"
    assert f"at least {n} input tokens" in err["error"]["message"]


@pytest.mark.parametrize("method, eos", [("GET", True), ("GET", False), ("POST", True), ("DELETE", False)])
def test_non_llm_methods_routed_long_at_headers(method, eos):
    r = Router(Config())
    m = machine(r)
    out, close = m.receive(req_headers(path="/v1/models", method=method, eos=eos))
    assert close is True and len(out) == 1
    common = out[0].request_headers.response
    assert list(common.header_mutation.set_headers) == [hv("x-budget-pool", "long")]
    assert common.clear_route_cache is True
    md = metadata(out[0])["token_budget_router"]
    assert md["pool"] == "long" and md["reason"] == "not_llm"
    assert m.state == M.State.DONE and m.decision.detail


def test_malformed_json_routed_long_not_sampled():
    r = Router(Config())
    m = machine(r, draw=0.0)
    m.receive(req_headers())
    out, close = m.receive(req_body(b'{"model": "llama", "messages": [ '))
    assert close is True
    common = out[0].request_body.response
    assert list(common.header_mutation.set_headers) == [hv("x-budget-pool", "long")]
    assert common.clear_route_cache
    assert metadata(out[0])["token_budget_router"]["reason"] == "not_llm"


def test_split_body_empty_chunks_and_duplicate_end():
    r = confident_router()
    m = machine(r, draw=0.0)
    body = chat_body()
    assert m.receive(req_headers()) == ([CONT_REQ_HEADERS], False)
    assert m.receive(req_body(b"", eos=False)) == ([CONT_REQ_BODY], False)
    assert m.receive(req_body(body[:10], eos=False)) == ([CONT_REQ_BODY], False)
    assert m.receive(req_body(b"", eos=False)) == ([CONT_REQ_BODY], False)
    assert m.receive(req_body(body[10:], eos=False)) == ([CONT_REQ_BODY], False)
    out, close = m.receive(req_body(b"", eos=True))
    assert out == [expected_route_body(r, body)] and close is False
    # duplicate end of stream: exactly one plain answer of the same kind
    assert m.receive(req_body(b"", eos=True)) == ([CONT_REQ_BODY], False)
    assert m.receive(req_headers()) == ([CONT_REQ_HEADERS], False)
    assert m.receive(resp_headers()) == ([CONT_RESP_HEADERS], False)
    assert m.receive(resp_headers()) == ([CONT_RESP_HEADERS], False)  # duplicate
    assert m.receive(resp_body(json_response(27, 3), eos=True)) == ([CONT_RESP_BODY], True)
    assert m.receive(resp_body(b"", eos=True)) == ([CONT_RESP_BODY], True)
    assert m.learned


def test_trailers_answered():
    m = machine(Router(Config()), draw=0.0)
    rt = pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
    st = pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    m.receive(req_headers())
    assert m.receive(rt) == ([pb.ProcessingResponse(request_trailers=pb.TrailersResponse())], False)
    m.receive(req_body(chat_body()))
    m.receive(resp_headers())
    m.receive(resp_body(b"{"))
    assert m.receive(st) == ([pb.ProcessingResponse(response_trailers=pb.TrailersResponse())], False)
    m.receive(resp_body(b"}", eos=True))
    assert m.receive(st) == ([pb.ProcessingResponse(response_trailers=pb.TrailersResponse())], True)


def test_abort_before_usage_learns_nothing():
    r = Router(Config())
    m = machine(r, draw=0.0)
    m.receive(req_headers())
    m.receive(req_body(chat_body(stream=True, stream_options={"include_usage": True})))
    m.receive(resp_headers(ctype="text/event-stream"))
    m.receive(resp_body(content_chunk("Hi")))
    assert m.scanner.usage is None
    m.abort()
    assert m.aborted and m.state == M.State.DONE
    assert m.receive(resp_body(usage_chunk(30, 2) + b"data: [DONE]\n\n", eos=True)) == ([CONT_RESP_BODY], True)
    assert not m.learned and m.usage is None
    assert all(f.samples == 0 for f in r.estimator.fits.values())
    assert r.outputs.sketches == {}


def test_abort_after_usage_learns_once():
    """A client that stops reading at [DONE] makes Envoy reset the stream
    before the body's end: the usage already seen is learned, once."""
    r = Router(Config())
    m = machine(r, draw=0.0)
    m.receive(req_headers())
    m.receive(req_body(chat_body(stream=True, stream_options={"include_usage": True})))
    m.receive(resp_headers(ctype="text/event-stream"))
    m.receive(resp_body(content_chunk("Hi") + usage_chunk(30, 2)))
    assert not m.learned
    m.abort()
    assert m.aborted and m.learned and m.usage == Usage(30, 2)
    assert m.receive(resp_body(b"data: [DONE]\n\n", eos=True)) == ([CONT_RESP_BODY], True)
    assert r.estimator.root.samples == 1


def test_done_event_learns_before_end_of_stream():
    r = Router(Config())
    m = machine(r, draw=0.0)
    m.receive(req_headers())
    m.receive(req_body(chat_body(stream=True, stream_options={"include_usage": True})))
    m.receive(resp_headers(ctype="text/event-stream"))
    assert m.receive(resp_body(usage_chunk(30, 2) + b"data: [DONE]\n\n")) == ([CONT_RESP_BODY], False)
    assert m.learned and r.estimator.root.samples == 1
    assert m.receive(resp_body(b"", eos=True)) == ([CONT_RESP_BODY], True)
    assert r.estimator.root.samples == 1


def test_inject_include_usage_rewrites_body_and_strips_usage_chunk():
    cfg = Config().replace(router={"inject_include_usage": True})
    r = confident_router(cfg)
    m = machine(r, draw=0.99)  # not sampled by draw: injection forces it
    body = chat_body(stream=True, temperature=0.5)
    m.receive(req_headers(content_length=str(len(body))))
    out, close = m.receive(req_body(body))
    assert close is False and m.sampled and m.injected_usage
    common = out[0].request_body.response
    new = common.body_mutation.body
    doc = json.loads(new)
    assert doc["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in doc.items() if k != "stream_options"} == json.loads(body)
    assert list(common.header_mutation.set_headers) == [
        hv("x-budget-pool", "short"), hv("content-length", str(len(new)))]
    assert out == [expected_route_body(r, body, extra=[hv("content-length", str(len(new)))], new_body=new)]

    assert m.receive(resp_headers(ctype="text/event-stream")) == ([CONT_RESP_HEADERS], False)
    c1, c2 = content_chunk("Hel"), content_chunk("lo")
    u, done = usage_chunk(27, 2), b"data: [DONE]\n\n"
    assert m.receive(resp_body(c1)) == ([CONT_RESP_BODY], False)  # unchanged chunk: plain continue
    # a chunk ending inside an event: the complete part goes on, the rest waits
    out, close = m.receive(resp_body(c2 + u[:20]))
    assert close is False
    assert out[0].response_body.response.body_mutation.body == c2
    out, close = m.receive(resp_body(u[20:]))
    assert out[0].response_body.response.body_mutation.WhichOneof("mutation") == "body"
    assert out[0].response_body.response.body_mutation.body == b""  # usage-only chunk cut out
    out, close = m.receive(resp_body(done, eos=True))
    assert close is True and out == [CONT_RESP_BODY]
    assert m.learned and m.usage == Usage(27, 2)


@pytest.mark.parametrize("body", [
    chat_body(stream=True, stream_options={"include_usage": True}),  # the client asked itself
    chat_body(stream=False),
])
def test_inject_not_applied_when_not_needed(body):
    cfg = Config().replace(router={"inject_include_usage": True})
    r = confident_router(cfg)
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    out, close = m.receive(req_body(body))
    assert close is True and not m.injected_usage
    assert not out[0].request_body.response.HasField("body_mutation")


def test_internal_error_falls_back_to_long(monkeypatch):
    r = Router(Config())
    m = machine(r)

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(r, "route", boom)
    m.receive(req_headers())
    out, close = m.receive(req_body(chat_body()))
    assert close is True
    assert list(out[0].request_body.response.header_mutation.set_headers) == [hv("x-budget-pool", "long")]
    assert out[0].request_body.response.clear_route_cache
    assert m.decision.reason == "internal_error"


# --- misroute watch (near-threshold short requests) -------------------------------------------

def near_threshold_body(r: Router) -> bytes:
    b = r.cfg.b_short
    body = chat_body(max_tokens=b - 1500)
    d = r.route(CHAT, body)
    assert d.pool == "short" and r.near_threshold_short(d)
    return body


def test_near_threshold_short_watched_200_read_for_truncation_not_learned_when_not_sampled():
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    out, close = m.receive(req_body(near_threshold_body(r)))
    assert close is False and not m.sampled and m.watch_misroute
    assert out[0].request_body.response.header_mutation.set_headers[0] == hv("x-budget-pool", "short")
    # vLLM 0.32 answers a too-long request 200, cut short: the body is read.
    assert m.receive(resp_headers()) == ([CONT_RESP_HEADERS], False)
    assert m.receive(resp_body(json_response(1600, 900), eos=True)) == ([CONT_RESP_BODY], True)
    assert not m.learned and not m.misroute


def truncated_json(pt: int, ct: int) -> bytes:
    return json_response(pt, ct).replace(b'"finish_reason":"stop"', b'"finish_reason":"length"')


def test_near_threshold_short_truncated_json_is_a_misroute_and_learned():
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    m.receive(req_body(near_threshold_body(r)))   # max_tokens 6692, short max_model_len 8192
    samples = r.estimator.fits[("llama", "prose")].samples
    m.receive(resp_headers())
    body = truncated_json(1600, 8192 - 1600)      # clipped to max_model_len - prompt < 6692
    assert m.receive(resp_body(body[:40])) == ([CONT_RESP_BODY], False)
    assert m.receive(resp_body(body[40:], eos=True)) == ([CONT_RESP_BODY], True)
    assert m.misroute == M.MISROUTE_TRUNCATED and m.learned
    assert m.usage == Usage(1600, 6592)
    assert r.estimator.fits[("llama", "prose")].samples == samples + 1


def test_near_threshold_short_truncated_sse_is_a_misroute():
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    m.receive(req_body(near_threshold_body(r)))
    m.receive(resp_headers(ctype="text/event-stream"))
    finish = sse({"id": "x", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": ""}, "finish_reason": "length"}]})
    for chunk in (content_chunk("a"), finish, usage_chunk(1600, 6592), sse(b"[DONE]")):
        assert m.receive(resp_body(chunk)) == ([CONT_RESP_BODY], False)
    assert m.misroute == M.MISROUTE_TRUNCATED and m.learned and m.usage == Usage(1600, 6592)


def test_near_threshold_stream_without_usage_truncation_detected_client_sees_the_same():
    """Issue 17: a watched stream whose client did not ask for usage gets
    include_usage added (inject_include_usage off, the default), the
    truncation is counted, and the client receives exactly the bytes it
    would have without it (the usage-only chunk is cut out)."""
    r = confident_router()
    assert not r.cfg.router.inject_include_usage
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    body = json.loads(near_threshold_body(r))
    out, close = m.receive(req_body(json.dumps({**body, "stream": True}).encode()))
    assert close is False and m.watch_misroute and m.injected_usage
    sent = json.loads(out[0].request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    m.receive(resp_headers(ctype="text/event-stream"))
    finish = sse({"id": "x", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": ""}, "finish_reason": "length"}]})
    chunks = (content_chunk("a"), finish, usage_chunk(1600, 6592), sse(b"[DONE]"))
    client = b""
    for i, chunk in enumerate(chunks):
        (resp,), _ = m.receive(resp_body(chunk, eos=i == len(chunks) - 1))
        mut = resp.response_body.response
        client += mut.body_mutation.body if mut.HasField("body_mutation") else chunk
    assert client == content_chunk("a") + finish + sse(b"[DONE]")
    assert m.misroute == M.MISROUTE_TRUNCATED and m.usage == Usage(1600, 6592)


def test_stream_far_from_the_threshold_is_not_rewritten():
    """Only watched (near-threshold, short) streams get include_usage: the
    rest of the traffic is routed as before, body untouched."""
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    out, close = m.receive(req_body(chat_body(stream=True)))
    assert not m.watch_misroute and not m.injected_usage and close is True
    assert not out[0].request_body.response.HasField("body_mutation")


@pytest.mark.parametrize("pt, ct", [
    (1600, 6692),   # the request's own cap ended it: not a misroute
    (1000, 6692),   # finished on its cap well inside the context
])
def test_length_finish_on_the_requests_cap_is_not_a_misroute(pt, ct):
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    m.receive(req_body(near_threshold_body(r)))
    m.receive(resp_headers())
    m.receive(resp_body(truncated_json(pt, ct), eos=True))
    assert not m.misroute and not m.learned


def test_long_routed_truncation_is_not_a_short_misroute():
    r = confident_router()
    d = r.route(CHAT, chat_body(max_tokens=20000))
    assert d.pool == "long"
    assert not r.truncation_misroute(d, 1600, 8192)


def test_vllm_032_context_error_lower_bound():
    """vLLM 0.32 reports "at least max_model_len + 1": counted; learned only
    when it shows the estimate too low."""
    r = confident_router()
    err = orjson.dumps({"error": {"message": (
        "This model's maximum context length is 8192 tokens. However, your prompt contains at least 8193 "
        "input tokens, which exceeds this limit even without any output tokens. Please reduce the length "
        "of the input prompt. (parameter=input_tokens, value=8193)"), "type": "BadRequestError",
        "param": "input_tokens", "code": 400}})
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    m.receive(req_body(near_threshold_body(r)))
    m.receive(resp_headers(status="400"))
    assert m.receive(resp_body(err, eos=True)) == ([CONT_RESP_BODY], True)
    assert m.misroute == M.MISROUTE_CONTEXT and m.learned and m.usage == Usage(8193, None)


def test_near_threshold_short_400_context_error_learns_prompt_tokens():
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    m.receive(req_body(near_threshold_body(r)))
    samples = r.estimator.fits[("llama", "prose")].samples
    assert m.receive(resp_headers(status="400")) == ([CONT_RESP_HEADERS], False)
    err = orjson.dumps({"object": "error", "type": "BadRequestError", "code": 400, "message": (
        "This model's maximum context length is 8192 tokens. However, you requested 8300 tokens "
        "(1608 in the messages, 6692 in the completion). Please reduce the length of the messages.")})
    assert m.receive(resp_body(err[:50])) == ([CONT_RESP_BODY], False)
    assert m.receive(resp_body(err[50:], eos=True)) == ([CONT_RESP_BODY], True)
    assert m.misroute and m.learned
    assert m.usage == Usage(1608, None)
    assert r.estimator.fits[("llama", "prose")].samples == samples + 1


def test_near_threshold_short_400_other_error_learns_nothing():
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    m.receive(req_body(near_threshold_body(r)))
    m.receive(resp_headers(status="400"))
    assert m.receive(resp_body(b'{"message": "bad temperature"}', eos=True)) == ([CONT_RESP_BODY], True)
    assert not m.misroute and not m.learned


def test_far_from_threshold_not_watched():
    r = confident_router()
    m = machine(r, draw=0.99)
    m.receive(req_headers())
    _, close = m.receive(req_body(chat_body(max_tokens=10)))
    assert close is True and not m.watch_misroute


# --- the transition table and the router port -----------------------------------------

def test_transition_table_reaches_every_state_and_ends_in_done():
    S, E = M.State, M.Event
    seen, todo = {S.REQ_HEADERS}, [S.REQ_HEADERS]
    while todo:
        s = todo.pop()
        for (frm, _), to in M.TRANSITIONS.items():
            if frm == s and to not in seen:
                seen.add(to)
                todo.append(to)
    assert seen == set(S)
    # the transport's calls and failures end a stream from anywhere, DONE included
    for s in S:
        for e in (E.ABORTED, E.FINISHED, E.FAILED, E.UNKNOWN_MESSAGE):
            assert M.TRANSITIONS[s, e] == S.DONE
    assert not any(frm == S.DONE and to != S.DONE for (frm, _), to in M.TRANSITIONS.items())


def test_illegal_transition_raises_and_the_stream_still_gets_its_answer(monkeypatch):
    m = machine()
    with pytest.raises(M.IllegalTransition, match="REQ_HEADERS on ROUTED"):
        m._to(M.Event.ROUTED)
    assert m.state == M.State.REQ_HEADERS
    # A table missing a transition the machine takes is a bug in the core: the
    # request is still answered (routed to the last tier), never lost.
    table = {k: v for k, v in M.TRANSITIONS.items() if k != (M.State.REQ_HEADERS, M.Event.HEADERS_CONTINUED)}
    monkeypatch.setattr(M, "TRANSITIONS", table)
    out, close = m.receive(req_headers())
    assert close is True and out[0].request_headers.response.header_mutation.set_headers[0].header.raw_value == b"long"
    assert m.state == M.State.DONE


class _PortOnly:
    """A router seen only through RouterPort: any other attribute is an error."""

    def __init__(self, router: Router):
        self._router = router

    def __getattr__(self, name):
        if name != "stream_settings" and name not in vars(M.RouterPort):
            raise AssertionError(f"the machine reached past RouterPort: router.{name}")
        return getattr(self._router, name)


@pytest.mark.parametrize("stream", [False, True])
def test_machine_talks_to_the_router_only_through_its_port(stream):
    r = Router(Config())
    assert isinstance(r, M.RouterPort)
    m = M.StreamMachine(_PortOnly(r), lambda: 0.0)
    body = chat_body(stream=stream)
    assert m.receive(req_headers()) == ([CONT_REQ_HEADERS], False)
    out, close = m.receive(req_body(body))
    assert close is False and out[0].request_body.response.header_mutation.set_headers[0].header.key == "x-budget-pool"
    m.receive(resp_headers(ctype="text/event-stream" if stream else "application/json"))
    data = (content_chunk("hi") + usage_chunk(29, 5) + b"data: [DONE]\n\n") if stream else json_response(29, 5)
    assert m.receive(resp_body(data, eos=True))[1] is True
    assert m.learned and m.usage == Usage(29, 5)
    # refusals and the fallback go through the port too
    big = M.StreamMachine(_PortOnly(r), lambda: 0.0)
    out, close = big.receive(req_headers(content_length=str(r.cfg.router.max_body_bytes + 1)))
    assert close and out[0].immediate_response.status.code == 413
    gz = M.StreamMachine(_PortOnly(r), lambda: 0.0)
    out, close = gz.receive(req_headers(content_encoding="br;q=1, zstd"))
    assert close and out[0].HasField("immediate_response")


# --- one exchange per request: header phase skipped, headers as attributes ---------------

ATTR_FILTER = "envoy.filters.http.ext_proc"


def req_body_attrs(body: bytes, eos=True, path=CHAT, method="POST", **headers) -> pb.ProcessingRequest:
    """A body message as Envoy sends it with request_header_mode SKIP: the
    request_attributes in a Struct under the filter's name."""
    from extproc import defaults as D
    by_header = {name: expr for expr, name in D.EXT_PROC_REQUEST_ATTRIBUTES}
    req = req_body(body, eos)
    fields = req.attributes[ATTR_FILTER].fields
    values = {":path": path, ":method": method, "content-type": "application/json",
              **{k.replace("_", "-"): v for k, v in headers.items()}}
    for name, value in values.items():
        if value is not None:
            fields[by_header[name]].string_value = value
    return req


def test_body_first_routes_in_one_exchange_like_two():
    r = confident_router()
    body = chat_body()
    m = machine(r, draw=0.99)
    out, close = m.receive(req_body_attrs(body, x_request_id="rid-1", traceparent="00-ab-cd-01"))
    assert (out, close) == ([expected_route_body(r, body)], True)
    assert m.path == CHAT and m.method == "POST" and m.state == M.State.DONE
    assert m.request_headers["x-request-id"] == "rid-1" and m.request_headers["traceparent"] == "00-ab-cd-01"
    # the same decision as through the header phase
    two = machine(r, draw=0.99)
    two.receive(req_headers())
    assert two.receive(req_body(body)) == (out, close)


def test_attribute_headers_take_known_string_attributes_of_any_filter_name():
    req = req_body_attrs(b"{}", content_encoding="gzip")
    req.attributes["envoy.filters.http.ext_proc.other"].fields["request.size"].number_value = 3
    req.attributes[ATTR_FILTER].fields["request.headers['x-unknown']"].string_value = "nope"
    assert M.attribute_headers(req) == {":path": CHAT, ":method": "POST", "content-type": "application/json",
                                        "content-encoding": "gzip"}
    assert M.attribute_headers(req_body(b"{}")) == {}


def test_body_first_not_json_routed_long_in_the_body_response():
    m = machine()
    out, close = m.receive(req_body_attrs(chat_body(), content_type="text/plain"))
    assert close is True and m.decision.reason == "not_llm" and m.state == M.State.DONE
    common = out[0].request_body.response
    assert [(h.header.key, h.header.raw_value) for h in common.header_mutation.set_headers] == [("x-budget-pool", b"long")]
    assert common.clear_route_cache and metadata(out[0])["token_budget_router"]["pool"] == "long"


def test_body_first_without_attributes_is_not_a_post_routed_long():
    m = machine()
    out, close = m.receive(req_body(chat_body()))
    assert close is True and m.decision.reason == "not_llm" and m.decision.detail == "method "
    assert out[0].request_body.response.header_mutation.set_headers[0].header.raw_value == b"long"


def test_body_first_unsupported_encoding_415_and_over_limit_413():
    m = machine()
    out, close = m.receive(req_body_attrs(b"\x1b\x00", content_encoding="br"))
    assert close is True and out[0].immediate_response.status.code == 415
    r = confident_router()
    big = b"x" * (r.cfg.router.max_body_bytes + 1)
    m = machine(r)
    out, close = m.receive(req_body_attrs(big))
    assert close is True and out[0].immediate_response.status.code == 413
    assert str(len(big)).encode() in out[0].immediate_response.body


def test_body_first_gzip_forwarded_decoded_with_identity_encoding_in_metadata():
    import gzip
    r = confident_router()
    body = chat_body()
    m = machine(r)
    out, close = m.receive(req_body_attrs(gzip.compress(body), content_encoding="gzip"))
    common = out[0].request_body.response
    assert common.body_mutation.body == body
    assert list(common.header_mutation.remove_headers) == ["content-encoding"]
    md = metadata(out[0])["token_budget_router"]
    assert md[M.CONTENT_ENCODING_METADATA_KEY] == "identity" and md["pool"] == "short"
    plain = machine(r)
    assert M.CONTENT_ENCODING_METADATA_KEY not in metadata(plain.receive(req_body_attrs(body))[0][0])["token_budget_router"]


def test_body_first_split_body_waits_for_the_end():
    r = confident_router()
    body = chat_body()
    m = machine(r)
    assert m.receive(req_body_attrs(body[:10], eos=False)) == ([CONT_REQ_BODY], False)
    assert m.state == M.State.REQ_BODY
    assert m.receive(req_body(body[10:])) == ([expected_route_body(r, body)], True)


@pytest.mark.parametrize("first", ["nothing", "headers"])
@pytest.mark.parametrize("status", ["200", "413"])
def test_response_before_the_request_was_routed_closes(first, status):
    """A request without a body (header phase skipped) or Envoy's own answer
    (a body over its buffer) shows the processor only a response: continue,
    close, no decision."""
    m = machine()
    if first == "headers":
        m.receive(req_headers())
        assert m.state == M.State.REQ_BODY
    assert m.receive(resp_headers(status=status)) == ([CONT_RESP_HEADERS], True)
    assert m.state == M.State.DONE and m.decision is None
