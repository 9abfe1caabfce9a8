"""The grpcio transport's per-peer accounting (issue 17 item 3, as far as
grpc.aio allows): open calls per peer address bounded, unanswered calls that
end counted per peer across connections, a peer past the limit refused with
RESOURCE_EXHAUSTED; a real grpc.aio server and client on 127.0.0.1."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from extproc.config import Config
from extproc.serve.grpc_aio import _peer_address, serve_grpcio
from extproc.serve.limits import ServerLimits
from extproc.serve.server import Worker


#: Time for grpc.aio to dispatch a call to the handler before the client acts.
DISPATCH_S = 0.2


def test_peer_address_strips_the_port():
    assert _peer_address("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert _peer_address("ipv6:[::1]:5000") == "::1"
    assert _peer_address("unix:/tmp/s") == "/tmp/s"


async def _held_call(stub):
    """A Process call that sends no request and waits (a held stream)."""
    never = asyncio.Event()

    async def reqs():
        await never.wait()
        yield  # pragma: no cover

    return stub.Process(reqs())


def _run(limits: ServerLimits, body) -> dict:
    async def main():
        w = Worker(Config(), telemetry=False)
        srv = await serve_grpcio(w.new_stream, "127.0.0.1", 0, max_message_bytes=1 << 20, limits=limits)
        try:
            await body(srv.port)
        finally:
            await srv.stop(0)
        return dict(srv.counters)

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_open_calls_per_peer_are_bounded():
    async def body(port):
        chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(3)]  # three connections, one peer address
        held = [await _held_call(pbg.ExternalProcessorStub(ch)) for ch in chans[:2]]
        await asyncio.sleep(DISPATCH_S)
        third = await _held_call(pbg.ExternalProcessorStub(chans[2]))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await third.read()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "open calls" in e.value.details()
        for c in held:
            c.cancel()
        for ch in chans:
            await ch.close()

    counters = _run(ServerLimits(peer_max_calls=2, peer_max_resets=100), body)
    assert counters["peer_calls_refused"] == 1


def test_unanswered_calls_ended_per_peer_get_the_peer_refused():
    resets = 5

    async def body(port):
        for i in range(resets + 1):  # a new connection each time: counted per address, not per connection
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                call = await _held_call(pbg.ExternalProcessorStub(ch))
                await asyncio.sleep(DISPATCH_S)
                call.cancel()
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = await _held_call(pbg.ExternalProcessorStub(ch))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "resets" in e.value.details()

    counters = _run(ServerLimits(peer_max_resets=resets, peer_ban_s=60.0), body)
    assert counters["peer_resets_exceeded"] >= 1 and counters["peer_refused"] >= 1
