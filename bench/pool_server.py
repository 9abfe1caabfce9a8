"""A minimal, fast stand-in for a vLLM pool: an asyncio Protocol speaking
keep-alive HTTP/1.1 that answers every request with a fixed OpenAI-like chat
completion. It reads Content-Length bodies (Envoy's upstream codec always
sends one for a buffered body) and never becomes the benchmark's bottleneck
(~20 us of CPU per request).

    python -m bench.pool_server --port 8101
"""

from __future__ import annotations

import argparse
import asyncio

BODY = (
    b'{"id":"cmpl-bench","object":"chat.completion","created":0,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":300,"completion_tokens":1,"total_tokens":301}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)

#: Largest request head we buffer, like h11's 16 KiB default.
MAX_HEAD_BYTES = 16 * 1024


class PoolProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1  # bytes of the current request still to read (-1: in head)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self.transport.close()
                    break
                head = bytes(buf[:end]).lower()
                i = head.find(b"\r\ncontent-length:")
                length = int(head[i + 17 : head.find(b"\r\n", i + 2) if head.find(b"\r\n", i + 2) > 0 else None]) if i >= 0 else 0
                del buf[: end + 4]
                self.need = length
            if len(buf) < self.need:
                break
            del buf[: self.need]
            self.need = -1
            out.append(RESPONSE)
        if out:
            self.transport.write(b"".join(out))


async def serve(host: str, port: int):
    loop = asyncio.get_running_loop()
    return await loop.create_server(PoolProtocol, host, port, reuse_address=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()

    async def run():
        server = await serve(a.host, a.port)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
