"""One router process for the benchmark: a transport serving a handler.

    python -m bench.router_proc --transport fast --handler trivial --port 50051

``--handler trivial`` is bench.trivial_handler (transport cost alone);
``--handler real`` is the router's own state machine (extproc.core.machine) when
it exists. Prints "READY <port>" on stdout once listening.
"""

from __future__ import annotations

import argparse
import os
import asyncio
import signal
import time
import sys

from extproc.serve.grpc_aio import serve_grpcio
from extproc.serve.h2c import serve_fast

TRANSPORTS = ("fast", "grpcio", "grpc_sync", "grpclib")

#: Matches extproc.defaults.GRPC_MAX_MESSAGE_BYTES: an 8 MiB body + 1 MiB.
MAX_MESSAGE_BYTES = 9 * 1024 * 1024


async def real_worker():
    """The router's own per-stream factory, as `budget-router serve` runs it:
    extproc.serve.server.Worker (Router core + StreamMachine + telemetry), with
    its admin plane (grpc.aio on a free port, in the same event loop) unless
    BENCH_ADMIN=0. Its calibration snapshot goes to a temp dir, its Prometheus
    endpoint is off."""
    import tempfile

    from extproc.admin import plane
    from extproc.config import load
    from extproc.serve.server import Worker

    cfg = load(env={}).replace(
        router={"state_file": tempfile.mkdtemp(prefix="bench-router-") + "/state.json"},
        telemetry={"prometheus_port": 0})
    w = Worker(cfg, telemetry=os.environ.get("BENCH_TELEMETRY", "1") == "1")
    if os.environ.get("BENCH_ADMIN", "1") == "1":
        w.admin = await plane.serve(w, cfg, 0, None, None)
        await w.admin.set_serving(True)
    return w


async def main_async(a) -> None:
    worker = None
    if a.handler == "trivial":
        from bench.trivial_handler import new_stream
    else:
        worker = await real_worker()
        new_stream = worker.new_stream
    if a.transport == "fast":
        serve = serve_fast
    elif a.transport == "grpcio":
        serve = serve_grpcio
    elif a.transport == "grpc_sync":
        from bench.alt_transports import serve_grpc_sync as serve
    else:
        from bench.alt_transports import serve_grpclib as serve
    tls = {}
    if a.tls:  # "cert,key,client CA": ext_proc over mTLS (fast and grpcio only)
        from extproc.tls import TlsFiles
        tls = {"tls": TlsFiles("router", *a.tls.split(","))}
    server = await serve(new_stream, a.host, a.port, max_message_bytes=MAX_MESSAGE_BYTES, **tls)
    print(f"READY {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if a.profile:
        # SIGUSR1 starts a cProfile of this process, SIGUSR2 stops it and
        # writes the stats to <profile>.<n>.prof (bench_router --profile
        # brackets each routed run with them).
        import cProfile
        prof: list = []
        dumps = [0]

        def start_profile() -> None:
            prof[:] = [cProfile.Profile(time.thread_time)]  # CPU, not wall: the host is shared
            prof[0].enable()

        def stop_profile() -> None:
            if prof:
                prof[0].disable()
                dumps[0] += 1
                prof[0].dump_stats(f"{a.profile}.{dumps[0]}.prof")
                prof.clear()
            print("PROFILED", flush=True)

        loop.add_signal_handler(signal.SIGUSR1, start_profile)
        loop.add_signal_handler(signal.SIGUSR2, stop_profile)
    await stop.wait()
    await server.stop(1.0)
    if worker is not None and worker.admin is not None:
        await worker.admin.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", choices=TRANSPORTS, default="fast")
    ap.add_argument("--handler", choices=("trivial", "real"), default="trivial")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls", default="", metavar="CERT,KEY,CA", help="serve mTLS with these PEM files")
    ap.add_argument("--profile", default="", metavar="PREFIX",
                    help="cProfile between SIGUSR1 and SIGUSR2, stats to PREFIX.<n>.prof")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="event loop: auto = the router's own choice (extproc.serve.loop)")
    a = ap.parse_args()
    try:
        from extproc.serve.loop import run
        run(main_async(a), a.loop)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
