"""compose/check_healthcheck.py without a container engine: the parts that
need none (make check-compose runs the rest with podman).

The image root it builds must hold a working Envoy, bash and grep: run
them chrooted into it (``unshare -r``: a user namespace, no root needed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "compose"))
import check_healthcheck as H  # noqa: E402  (compose/check_healthcheck.py)


def test_health_cmd_is_compose_test_without_cmd_and_the_old_probe_is_http10():
    test = H.envoy_service()["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert json.loads(H.health_cmd_arg(test)) == test[1:]
    assert H.health_cmd_arg(["CMD-SHELL", "true"]) == "true"
    with pytest.raises(SystemExit):
        H.health_cmd_arg(["NONE"])
    # The old probe differs from compose's only in speaking HTTP/1.0.
    assert "HTTP/1.1" in test[-1] and "HTTP/1.0" in H.OLD_HTTP10_TEST[-1]
    assert H.OLD_HTTP10_TEST[:3] == test[:3]


def test_image_root_runs_envoy_bash_and_grep(tmp_path):
    chroot = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")
    if not (shutil.which("unshare") and shutil.which("ldd") and chroot):
        pytest.skip("needs unshare, chroot and ldd")
    probe = subprocess.run(["unshare", "-r", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    root = tmp_path / "rootfs"
    H.build_rootfs(root)
    assert (root / "usr/local/bin/envoy").stat().st_size > 1_000_000, "the ELF, not the wheel's Python launcher"
    res = subprocess.run(["unshare", "-r", chroot, str(root), "/usr/bin/bash", "-c",
                          "envoy --version && echo LIVE | grep -q LIVE && echo ok"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/local/bin:/usr/bin"})
    assert res.returncode == 0, res.stderr
    assert "version:" in res.stdout and res.stdout.strip().endswith("ok"), res.stdout


# --- compose/check_compose_stack.py and what podman accepts ---------------------------


import check_compose_stack as K  # noqa: E402  (compose/check_compose_stack.py)


def test_compose_uses_no_option_podman_43_refuses():
    """podman 4.3 (Debian 12) refuses a healthcheck's start_interval ("unknown
    flag: --health-startup-interval") when podman-compose creates the
    container; make check-compose brings the stack up there."""
    compose = yaml.safe_load(H.COMPOSE_FILE.read_text())
    for name, service in compose["services"].items():
        assert "start_interval" not in service.get("healthcheck", {}), name


def test_stack_check_images_resolve_as_podman_resolves_compose_names():
    assert K.full_name("token-budget-router:0.1.0") == "localhost/token-budget-router:0.1.0"
    assert K.full_name("envoyproxy/envoy:v1.40.0") == "docker.io/envoyproxy/envoy:v1.40.0"
    assert K.full_name("ghcr.io/org/img:1") == "ghcr.io/org/img:1"
    assert K.full_name("localhost:5000/img:1") == "localhost:5000/img:1"
    # Every image compose names (profile sim) is one the check builds or stands in for.
    compose = yaml.safe_load(H.COMPOSE_FILE.read_text())
    images = {s["image"] for s in compose["services"].values() if "sim" in s.get("profiles", ["sim"])}
    assert images == {compose["services"][n]["image"] for n in
                      ("envoy", "router", "prometheus", "otel-collector", "jaeger", "grafana")}
