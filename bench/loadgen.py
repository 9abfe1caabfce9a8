"""Closed-loop HTTP/1.1 load generator: ``concurrency`` keep-alive
connections, each sending the next request as soon as the previous response
is complete, for a bounded duration. Raw asyncio Protocols (no HTTP library)
keep its own CPU per request low.

    python -m bench.loadgen --port 10000 --concurrency 16 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

#: Longest response head we accept before calling the response malformed.
MAX_HEAD_BYTES = 64 * 1024


def chat_request(host: str, port: int, prompt_bytes: int, path: str = "/v1/chat/completions") -> bytes:
    """An OpenAI chat completion request of about ``prompt_bytes`` of prose."""
    words = ("the quick brown fox jumps over the lazy dog and keeps running " * (prompt_bytes // 60 + 1))[:prompt_bytes]
    body = json.dumps(
        {"model": "bench-model", "messages": [{"role": "user", "content": words}], "max_tokens": 64}
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class _Client(asyncio.Protocol):
    def __init__(self, request: bytes, deadline: float, latencies: list, statuses: dict, done: asyncio.Future):
        self.request = request
        self.deadline = deadline
        self.lat = latencies
        self.statuses = statuses
        self.done = done
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.t0 = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need == -1:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._finish(RuntimeError("response head too large"))
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            del buf[: end + 4]
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                self.need = int(head[i + 17 : j if j > 0 else None])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.need = -2  # chunked (ext_proc with a streamed response body makes Envoy re-chunk)
            else:
                self._finish(RuntimeError(f"no content-length in response: {head[:200]!r}"))
                return
        if self.need == -2:
            # Skip whole chunks; done at the last chunk "0\r\n\r\n" (no trailers).
            while True:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                total = eol + 2 + size + 2
                if len(buf) < total:
                    return
                del buf[:total]
                if size == 0:
                    break
        else:
            if len(buf) < self.need:
                return
            del buf[: self.need]
        t1 = time.perf_counter_ns()
        self.lat.append(t1 - self.t0)
        self.statuses[self.status] = self.statuses.get(self.status, 0) + 1
        self.need = -1
        if t1 / 1e9 >= self.deadline:
            self._finish(None)
        else:
            self._send()

    def _finish(self, exc) -> None:
        self.transport.close()
        if not self.done.done():
            if exc:
                self.done.set_exception(exc)
            else:
                self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("connection closed by server"))


async def run(host: str, port: int, concurrency: int, duration: float, request: bytes, warmup: float = 0.5) -> dict:
    """Returns {requests, seconds, rps, p50_us, p99_us, statuses}; the first
    ``warmup`` seconds are excluded (connections, Envoy pools, caches)."""
    loop = asyncio.get_running_loop()
    if warmup > 0:
        await run(host, port, concurrency, warmup, request, warmup=0)
    lat: list[int] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    deadline = time.perf_counter_ns() / 1e9 + duration
    futs = []
    for _ in range(concurrency):
        fut = loop.create_future()
        await loop.create_connection(lambda: _Client(request, deadline, lat, statuses, fut), host, port)
        futs.append(fut)
    # Bounded even if the server stops answering.
    await asyncio.wait_for(asyncio.gather(*futs), timeout=duration + 30)
    seconds = time.perf_counter() - start
    a = np.array(lat, dtype=np.float64) / 1e3
    return {
        "requests": len(lat),
        "seconds": seconds,
        "rps": len(lat) / seconds,
        "p50_us": float(np.percentile(a, 50)) if len(a) else float("nan"),
        "p99_us": float(np.percentile(a, 99)) if len(a) else float("nan"),
        "statuses": statuses,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--prompt-bytes", type=int, default=2000)
    a = ap.parse_args()
    req = chat_request(a.host, a.port, a.prompt_bytes)
    print(json.dumps(asyncio.run(run(a.host, a.port, a.concurrency, a.duration, req))))


if __name__ == "__main__":
    main()
