"""In-process CPU per ext_proc stream of the router's shell (issue 19).

    python bench/bench_shell.py [--streams 3000] [--repeats 7] [--mode one|two]

Feeds one fast-transport connection (``extproc.serve.h2c``) the bytes Envoy
sends for each routed request, with the real worker behind it
(``extproc.serve.server.Worker``: the router core, ``StreamMachine``,
telemetry without a reader, as ``bench/router_proc.py --handler real``), and
reports the process CPU time per stream (``time.process_time``): no sockets,
no event-loop wake-ups, no Envoy, so the figure is steady on a shared host
where ``bench_router.py``'s are not. Per stream:

* ``--mode one`` (the bootstrap's default: request-header phase skipped):
  HEADERS + DATA(request_body with the request attributes);
* ``--mode two`` (``header_phase=True``): HEADERS + DATA(request_headers),
  then DATA(request_body);
* a stream the router keeps for its response (sampled: every one until the
  router is confident, then a few per cent) gets the pool's answer
  (bench/pool_server.py) as response_headers and response_body, a read each;
* then Envoy's RST_STREAM after our trailers, in a read of its own.

The request is bench/loadgen.py's chat completion (``--prompt-bytes``). The
transport's writes go to a stand-in that only counts bytes. Prints the median
and spread of the repeats (µs per stream) and the bytes written per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from hpack import Encoder  # noqa: E402

from extproc import defaults as D  # noqa: E402
from extproc.config import load  # noqa: E402
from extproc.serve import h2frames as h2  # noqa: E402
from extproc.serve.h2c import FastServer, _GrpcConnection  # noqa: E402
from extproc.envoy.bootstrap import EXT_PROC_FILTER  # noqa: E402
from extproc.serve.rpc import DEFAULT_HEALTH_SERVICES, PROCESS_METHOD  # noqa: E402
from extproc.serve.server import Worker, max_message_bytes  # noqa: E402

#: Envoy's default HTTP/2 stream and connection windows (its
#: initial_stream_window_size / initial_connection_window_size), 256 MiB.
ENVOY_WINDOW = 256 * 1024 * 1024


class CountingTransport:
    """Stands in for the socket: counts what the connection writes."""

    def __init__(self):
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def chat_body(prompt_bytes: int) -> bytes:
    sys.path.insert(0, str(ROOT / "bench"))
    import loadgen
    raw = loadgen.chat_request("127.0.0.1", 1, prompt_bytes)
    return raw.split(b"\r\n\r\n", 1)[1]


def grpc_message(req: pb.ProcessingRequest) -> bytes:
    b = req.SerializeToString()
    return b"\x00" + len(b).to_bytes(4, "big") + b


def request_messages(body: bytes, mode: str) -> list[bytes]:
    """The gRPC messages Envoy sends for one request, in order."""
    headers = {":method": "POST", ":path": "/v1/chat/completions", ":authority": "127.0.0.1",
               "content-type": "application/json", "content-length": str(len(body)),
               "x-request-id": "5f0e6a4c-3b1e-4a8a-9a59-7f4c7a0b1c2d"}
    if mode == "two":
        hmap = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                           for k, v in headers.items()])
        return [grpc_message(pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hmap))),
                grpc_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))]
    req = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    fields = req.attributes[EXT_PROC_FILTER].fields
    by_name = {name: expr for expr, name in D.EXT_PROC_REQUEST_ATTRIBUTES}
    for name in (":path", ":method", "content-type", "x-request-id"):
        fields[by_name[name]].string_value = headers[name]
    return [grpc_message(req)]


def response_messages() -> list[bytes]:
    """The response phase of a stream the router keeps (sampled): the pool's
    answer (bench/pool_server.py) as response_headers and one response_body."""
    sys.path.insert(0, str(ROOT / "bench"))
    import pool_server
    hmap = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in (
        (":status", b"200"), ("content-type", b"application/json"),
        ("content-length", str(len(pool_server.BODY)).encode()))])
    return [grpc_message(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap))),
            grpc_message(pb.ProcessingRequest(response_body=pb.HttpBody(body=pool_server.BODY, end_of_stream=True)))]


def stream_reads(sid: int, block: bytes, messages: list[bytes]) -> list[bytes]:
    """The reads of one stream's request phase: HEADERS + first message; each
    later message."""
    reads = [h2.frame(h2.HEADERS, h2.FLAG_END_HEADERS, sid, block) + h2.frame(h2.DATA, 0, sid, messages[0])]
    reads += [h2.frame(h2.DATA, 0, sid, m) for m in messages[1:]]
    return reads


def feed_stream(conn: _GrpcConnection, sid: int, reads: list[bytes], response: list[bytes]) -> None:
    """One stream: its request reads; if the router kept it open, the response
    phase (each message a read); Envoy's RST_STREAM after our trailers."""
    for read in reads:
        conn.data_received(read)
    if sid in conn.calls:
        for m in response:
            conn.data_received(h2.frame(h2.DATA, 0, sid, m))
    conn.data_received(h2.rst_stream_frame(sid, h2.CANCEL))


async def run(args) -> dict:
    cfg = load(env={}).replace(
        router={"state_file": tempfile.mkdtemp(prefix="bench-shell-") + "/state.json"},
        telemetry={"prometheus_port": 0})
    worker = Worker(cfg, telemetry=True)
    server = FastServer(worker.new_stream, max_message_bytes(cfg), DEFAULT_HEALTH_SERVICES)
    conn = _GrpcConnection(server)
    transport = CountingTransport()
    conn.connection_made(transport)
    # Envoy's opening: its SETTINGS and a connection WINDOW_UPDATE, both to
    # Envoy's default 256 MiB windows (so our answers are never blocked).
    window = ENVOY_WINDOW
    conn.data_received(h2.PREFACE + h2.settings_frame([(h2.SETTINGS_INITIAL_WINDOW_SIZE, window)])
                       + h2.window_update_frame(0, window - 65535))
    enc = Encoder()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), (":authority", "budget_router"),
               ("content-type", "application/grpc"), ("te", "trailers"), ("x-envoy-internal", "true")]
    messages = request_messages(chat_body(args.prompt_bytes), args.mode)
    response = response_messages()
    sid = 1
    # Warm up: caches, the HPACK dynamic table, and the router's calibration
    # (a fresh router watches every response until it is confident).
    for _ in range(args.warmup):
        feed_stream(conn, sid, stream_reads(sid, enc.encode(headers), messages), response)
        sid += 2
    gc.collect()
    gc.freeze()
    per_stream = []
    for _ in range(args.repeats):
        reads = []
        for _ in range(args.streams):
            reads.append(stream_reads(sid, enc.encode(headers), messages))
            sid += 2
        before = transport.written
        t0 = time.process_time()
        sid0 = sid - 2 * args.streams
        for i, stream in enumerate(reads):
            feed_stream(conn, sid0 + 2 * i, stream, response)
        per_stream.append((time.process_time() - t0) / args.streams * 1e6)
        written = (transport.written - before) / args.streams
    assert not conn.calls, "streams left open"
    assert not conn.conn._blocked, "answers blocked by flow control"
    assert server.counters == {} or not any(k.startswith("goaway") for k in server.counters), server.counters
    return {"us_per_stream": per_stream, "bytes_written_per_stream": written, "streams": worker.streams,
            "kept": worker.telemetry.router.samples() if worker.telemetry else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mode", choices=("one", "two"), default="one")
    ap.add_argument("--prompt-bytes", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=1000, help="streams before the timed ones")
    args = ap.parse_args(argv)
    os.environ.setdefault("OTEL_SDK_DISABLED", "false")
    res = asyncio.run(run(args))
    us = sorted(res["us_per_stream"])
    print(f"mode={args.mode} streams={args.streams}x{args.repeats}: median {statistics.median(us):.1f} µs/stream "
          f"(min {us[0]:.1f}, max {us[-1]:.1f}); {res['bytes_written_per_stream']:.0f} bytes written/stream; "
          f"router samples learned {res['kept']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
