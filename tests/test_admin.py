"""Admin API end to end: served on the router's gRPC port beside ext_proc,
reachable with the generated stubs, `budget-router status/admin`, and gRPC
reflection; B_short changed at run time applies to the next request."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from extproc.admin import generate
from extproc.admin.v1 import admin_pb2 as pb
from extproc.admin.v1 import admin_pb2_grpc as pbg
from extproc.tools.stack import Stack, loopback_config

openai = pytest.importorskip("openai")

#: ~1,500 tokens of English: short at B_short 8192, long at 1024.
PROMPT = "The quick brown fox jumps over the lazy dog near the river bank. " * 110


def test_generated_code_is_up_to_date():
    assert generate.main(["--check"]) == 0, "run: python -m extproc.admin.generate"


@pytest.fixture(scope="module", params=["fast", "grpcio"])
def stack(request):
    cfg = loopback_config(router={"sample_rate": 1.0, "transport": request.param})
    st = Stack(cfg, time_scale=0)
    st.start()
    yield st
    st.stop()


def _cli(stack, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args, "--config", stack.config_path()],
                          capture_output=True, text=True, timeout=60)


def _send(stack, n=1, content=PROMPT):
    client = openai.OpenAI(base_url=stack.url, api_key="x", max_retries=0)
    pools = []
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model="admin-model", messages=[{"role": "user", "content": content}], max_tokens=16)
        pools.append(raw.http_response.headers["x-pool-name"])
    return pools


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


def test_b_short_changed_at_runtime_applies_to_next_request(stack):
    assert _send(stack) == ["short"]
    out = _cli(stack, "admin", "set-b-short", "1024")
    assert out.returncode == 0, out.stderr
    assert "B_short=1024" in out.stdout
    try:
        assert _send(stack) == ["long"]
    finally:
        assert _cli(stack, "admin", "set-b-short", "8192").returncode == 0
    assert _send(stack) == ["short"]


def test_invalid_b_short_is_refused_with_a_clear_message(stack):
    port = stack.cfg.router.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            pbg.AdminStub(ch).SetBShort(pb.SetBShortRequest(b_short=100_000), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_model_len" in e.value.details()


def test_snapshot_round_trip(stack):
    _send(stack, 2)
    with grpc.insecure_channel(f"127.0.0.1:{stack.cfg.router.port}") as ch:
        stub = pbg.AdminStub(ch)
        snap = stub.TakeSnapshot(pb.TakeSnapshotRequest(write=True), timeout=5)
        assert snap.samples >= 2 and json.loads(snap.state_json)["estimator"]["root"]["samples"] == snap.samples
        restored = stub.RestoreSnapshot(snap, timeout=5)
        assert restored.samples == snap.samples
        with pytest.raises(grpc.RpcError) as e:
            stub.RestoreSnapshot(pb.Snapshot(state_json=b"{not json"), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reflection_lists_and_describes_services(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.cfg.router.port}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"budget_router.admin.v1.Admin", "envoy.service.ext_proc.v3.ExternalProcessor",
                "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("budget_router.admin.v1.Admin")
        assert fd.name == "budget_router/admin/v1/admin.proto"
        assert [m.name for m in fd.service[0].method] == [
            "GetCalibration", "SetBShort", "SetLimit", "ReloadConfig", "TakeSnapshot", "RestoreSnapshot"]
