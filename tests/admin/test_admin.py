"""Admin plane end to end: served on its own port ([admin] port), apart from
ext_proc; every call authenticated with the bearer token; every change
validated and audited; reachable with the generated stubs,
`budget-router status/admin`, and gRPC reflection; B_short changed at run
time applies to the next request."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from extproc.admin import auth, generate
from extproc.admin.v1 import admin_pb2 as pb
from extproc.admin.v1 import admin_pb2_grpc as pbg
from extproc.tools.stack import Stack, loopback_config

openai = pytest.importorskip("openai")

#: ~1,500 tokens of English: short at B_short 8192, long at 1024.
PROMPT = "The quick brown fox jumps over the lazy dog near the river bank. " * 110
TOKEN = "test-admin-token-0123456789abcdef"


def test_generated_code_is_up_to_date():
    assert generate.main(["--check"]) == 0, "run: python -m extproc.admin.generate"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("admin"))
    token_file = os.path.join(workdir, "admin-token")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    cfg = loopback_config(router={"sample_rate": 1.0}, admin={"token_file": token_file})
    st = Stack(cfg, workdir=workdir, time_scale=0)
    st.start()
    yield st
    st.stop()


def _cli(stack, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args, "--config", stack.config_path()],
                          capture_output=True, text=True, timeout=60, env=env)


def _send(stack, n=1, content=PROMPT, model="admin-model"):
    client = openai.OpenAI(base_url=stack.url, api_key="x", max_retries=0)
    pools = []
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=16)
        pools.append(raw.http_response.headers["x-pool-name"])
    return pools


def _admin(stack) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{stack.cfg.admin.port}")


AUTH = [("authorization", "Bearer " + TOKEN)]


def _samples(stack) -> int:
    out = _cli(stack, "status", "--json")
    assert out.returncode == 0, out.stderr
    docs = json.loads(out.stdout)
    return sum(int(f.get("samples", 0)) for d in docs for f in d.get("fits", []) if f["model"] == "admin-model")


def test_status_shows_learning_move(stack):
    _send(stack, 3)
    first = _samples(stack)
    _send(stack, 4)
    assert _samples(stack) == first + 4 >= 7
    text = _cli(stack, "status")
    assert text.returncode == 0 and "admin-model" in text.stdout and "bytes/tok" in text.stdout


def test_b_short_changed_at_runtime_applies_to_next_request_and_is_audited(stack):
    assert _send(stack) == ["short"]
    out = _cli(stack, "admin", "set-b-short", "1024")
    assert out.returncode == 0, out.stderr
    assert "B_short=1024" in out.stdout
    try:
        assert _send(stack) == ["long"]
    finally:
        assert _cli(stack, "admin", "set-b-short", "8192").returncode == 0
    assert _send(stack) == ["short"]
    audit = [json.loads(ln) for ln in open(stack.logs["router"], encoding="utf-8")
             if "admin change: b_short" in ln]
    assert [(a["old"], a["new"]) for a in audit[-2:]] == [(8192, 1024), (1024, 8192)]
    assert audit[-1]["caller"].startswith("peer=ipv") and auth.fingerprint(TOKEN) in audit[-1]["caller"]
    assert TOKEN not in open(stack.logs["router"], encoding="utf-8").read()


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong-token-wrong-token")],
                                      [("authorization", TOKEN)]], ids=["none", "wrong", "no-scheme"])
def test_unauthenticated_calls_are_refused_and_change_nothing(stack, metadata):
    with _admin(stack) as ch:
        stub = pbg.AdminStub(ch)
        for call, req in ((stub.SetBShort, pb.SetBShortRequest(b_short=1024)),
                          (stub.GetCalibration, pb.GetCalibrationRequest()),
                          (stub.RestoreSnapshot, pb.Snapshot(state_json=b"{}")),
                          (stub.ReloadConfig, pb.ReloadConfigRequest())):
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=5, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # reflection needs the token too; health does not (probes)
        with pytest.raises(grpc.RpcError) as e:
            list(ProtoReflectionDescriptorDatabase(ch).get_services())
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert _send(stack) == ["short"]  # B_short still 8192


def test_admin_api_is_not_on_the_ext_proc_port(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.cfg.router.port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            pbg.AdminStub(ch).SetBShort(pb.SetBShortRequest(b_short=1024), timeout=5, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert "budget_router.admin.v1.Admin" not in services
        assert "envoy.service.ext_proc.v3.ExternalProcessor" in services


@pytest.mark.parametrize("b_short, match", [(100_000, "max_model_len"), (1, "at least 512")])
def test_invalid_b_short_is_refused_with_a_clear_message(stack, b_short, match):
    with _admin(stack) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pbg.AdminStub(ch).SetBShort(pb.SetBShortRequest(b_short=b_short), timeout=5, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in e.value.details()


def test_snapshot_round_trip(stack):
    _send(stack, 2)
    with _admin(stack) as ch:
        stub = pbg.AdminStub(ch)
        snap = stub.TakeSnapshot(pb.TakeSnapshotRequest(write=True), timeout=5, metadata=AUTH)
        assert snap.samples >= 2 and json.loads(snap.state_json)["estimator"]["root"]["samples"] == snap.samples
        restored = stub.RestoreSnapshot(snap, timeout=5, metadata=AUTH)
        assert restored.samples == snap.samples
        with pytest.raises(grpc.RpcError) as e:
            stub.RestoreSnapshot(pb.Snapshot(state_json=b"{not json"), timeout=5, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # not even a protobuf message
        raw = ch.unary_unary("/budget_router.admin.v1.Admin/SetBShort")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff", timeout=5, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_poisoned_snapshot_is_refused_and_nothing_changes(stack):
    """The issue's attack: root fit A=0, b=1e6, samples=1000 made every
    request a 400 (estimate 725M tokens); it must be refused whole."""
    _send(stack, 2)
    with _admin(stack) as ch:
        stub = pbg.AdminStub(ch)
        snap = stub.TakeSnapshot(pb.TakeSnapshotRequest(), timeout=5, metadata=AUTH)
        before = stub.GetCalibration(pb.GetCalibrationRequest(), timeout=5, metadata=AUTH)
        state = json.loads(snap.state_json)
        n = len(state["estimator"]["root"]["b"])
        state["estimator"]["root"].update(A=[0.0] * (n * n), b=[1e6] * n, samples=1000)
        with pytest.raises(grpc.RpcError) as e:
            stub.RestoreSnapshot(pb.Snapshot(state_json=json.dumps(state).encode()), timeout=5, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "implausible" in e.value.details() and "nothing changed" in e.value.details()
        after = stub.GetCalibration(pb.GetCalibrationRequest(), timeout=5, metadata=AUTH)
        assert [f.SerializeToString() for f in after.fits] == [f.SerializeToString() for f in before.fits]
    client = openai.OpenAI(base_url=stack.url, api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="admin-model", messages=[{"role": "user", "content": "hello there"}], max_tokens=16)
    assert raw.http_response.status_code == 200 and raw.http_response.headers["x-pool-name"] == "short"



def test_reload_config_reads_only_the_configured_file(stack):
    rss = stack.rss_kb("router")
    with _admin(stack) as ch:
        stub = pbg.AdminStub(ch)
        for path in ("/dev/zero", "/etc/passwd", stack.logs["router"]):
            with pytest.raises(grpc.RpcError) as e:
                stub.ReloadConfig(pb.ReloadConfigRequest(path=path), timeout=5, metadata=AUTH)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "only the config file the router started with" in e.value.details()
        # the configured file (or naming it) works
        res = stub.ReloadConfig(pb.ReloadConfigRequest(), timeout=5, metadata=AUTH)
        assert res.b_short == stack.cfg.b_short
        res = stub.ReloadConfig(pb.ReloadConfigRequest(path=stack.config_path()), timeout=5, metadata=AUTH)
        assert res.b_short == stack.cfg.b_short
    # /dev/zero once grew the worker by 1 GB in 0.6 s
    assert stack.rss_kb("router") - rss < 20_000


def test_reflection_lists_and_describes_services(stack):
    with _admin(stack) as ch:
        intercept = grpc.intercept_channel(ch, _MetadataInterceptor(AUTH))
        db = ProtoReflectionDescriptorDatabase(intercept)
        services = set(db.get_services())
        assert {"budget_router.admin.v1.Admin", "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("budget_router.admin.v1.Admin")
        assert fd.name == "budget_router/admin/v1/admin.proto"
        assert [m.name for m in fd.service[0].method] == [
            "GetCalibration", "SetBShort", "SetLimit", "ReloadConfig", "TakeSnapshot", "RestoreSnapshot"]


class _MetadataInterceptor(grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata):
        self.metadata = metadata

    def intercept_stream_stream(self, continuation, details, request_iterator):
        details = details._replace(metadata=list(details.metadata or []) + self.metadata)
        return continuation(details, request_iterator)


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 64 KiB tmpfs filled to the last byte (a real ENOSPC);
    needs mount rights (root), else skipped: the not-a-directory case below
    runs everywhere."""
    where = tmp_path / "full"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("case", ["full disk", "not a directory"])
def test_failed_snapshot_write_is_an_error_to_the_caller_and_counted(case, tmp_path, request):
    """Issue 17: TakeSnapshot(write=true) on a full disk returned OK; now the
    caller gets the error (RESOURCE_EXHAUSTED for ENOSPC), it is counted, and
    the router keeps serving its calibration (the answer without write works)."""
    from extproc import config as C
    from extproc.admin.service import RESOURCE_EXHAUSTED, INTERNAL, AdminError, AdminService
    from extproc.serve import server as S
    if case == "full disk":
        state = request.getfixturevalue("full_disk") / "state.json"
    else:
        (tmp_path / "file").write_text("")
        state = tmp_path / "file" / "state.json"
    w = S.Worker(C.Config().replace(router={"state_file": str(state)}), 0, telemetry=False)
    svc = AdminService(w, None)
    with pytest.raises(AdminError) as e:
        svc.take_snapshot(pb.TakeSnapshotRequest(write=True))
    assert e.value.code == (RESOURCE_EXHAUSTED if case == "full disk" else INTERNAL)
    assert "not written" in e.value.message and str(state) in e.value.message
    assert w.snapshot_failures == 1
    assert json.loads(svc.take_snapshot(pb.TakeSnapshotRequest()).state_json)["estimator"]["root"]["samples"] == 0
