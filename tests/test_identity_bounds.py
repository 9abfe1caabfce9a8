"""Bounded identity, end to end (issue 11 point 2): 64 requests whose model
is "junkNN-" + 1 MiB of "x" once pinned every model slot for good and cost
+147 MB RSS, a 134 MB state file, a 201 MB /metrics page and a 67 MB
GetCalibration reply; the real model never got a fit of its own. Now names
are bounded (extproc.core.estimator.bounded_model_name), idle names age out
of a full table, and every one of those sizes stays small."""

from __future__ import annotations

import json
import os
import urllib.request

import grpc
import pytest

from extproc.admin.v1 import admin_pb2 as pb
from extproc.admin.v1 import admin_pb2_grpc as pbg
from extproc.defaults import MAX_MODEL_NAME_CHARS

openai = pytest.importorskip("openai")

FLOOD = 64
NAME_BYTES = 2 ** 20
#: Real-model samples after the flood: model_idle_samples is set to 16 below,
#: so the real model takes the least recently learned junk slot well before.
REAL = 24



@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory(router={"sample_rate": 1.0, "snapshot_interval_s": 3600.0},
                         estimator={"model_idle_samples": 16})


def _chat(client, model: str, content: str = "Tell me about the river bank and its trees. " * 8):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=8)
    assert raw.http_response.status_code == 200
    return raw.http_response.headers


def test_flood_of_huge_model_names_stays_small(stack):
    client = openai.OpenAI(base_url=stack.url, api_key="x", max_retries=0, timeout=60)
    _chat(client, "warmup")  # imports, first allocations
    rss = [stack.rss_kb("router")]
    for flood in range(2):  # the second flood finds the table full of the first
        for i in range(FLOOD):
            _chat(client, f"junk{flood}{i:02d}-" + "x" * NAME_BYTES)
        rss.append(stack.rss_kb("router"))
    for _ in range(REAL):
        _chat(client, "meta-llama/Llama-3.1-8B-Instruct")

    admin = grpc.insecure_channel(f"127.0.0.1:{stack.cfg.admin.port}")
    stub = pbg.AdminStub(admin)
    cal = stub.GetCalibration(pb.GetCalibrationRequest(), timeout=10)
    stub.TakeSnapshot(pb.TakeSnapshotRequest(write=True), timeout=10)
    admin.close()
    state_bytes = os.path.getsize(stack.cfg.router.state_file)
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.cfg.telemetry.prometheus_port}/metrics", timeout=10) as r:
        page = r.read()
    print(f"\nRSS +{(rss[1] - rss[0]) / 1024:.1f} MB, +{(rss[2] - rss[1]) / 1024:.1f} MB, state file {state_bytes / 1e3:.0f} KB, /metrics {len(page) / 1e3:.0f} KB, "
          f"GetCalibration {cal.ByteSize() / 1e3:.0f} KB")

    # the real model learned in a slot of its own
    own = [f for f in cal.fits if f.model == "meta-llama/Llama-3.1-8B-Instruct"]
    assert own and sum(f.samples for f in own) >= REAL // 2
    # names in every output are bounded
    assert max(len(f.model) for f in cal.fits) <= MAX_MODEL_NAME_CHARS
    state = json.loads(open(stack.cfg.router.state_file, "rb").read())
    assert max(len(m) for m in state["estimator"]["models"]) <= MAX_MODEL_NAME_CHARS
    assert b"x" * (MAX_MODEL_NAME_CHARS + 1) not in page
    # sizes (before: 134 MB state, 201 MB /metrics, 67 MB reply, +147 MB RSS)
    assert state_bytes < 2_000_000
    assert len(page) < 1_000_000
    assert cal.ByteSize() < 200_000
    # RSS: 128 MiB of names went through; what stays is allocator high-water
    # (+12-15 MB per run here, once +66 MB), not the names (64 retained names
    # alone were 64 MiB, +147 MB in all), and a second flood adds little.
    assert rss[2] - rss[0] < 96 * 1024
    assert rss[2] - rss[1] < 24 * 1024
