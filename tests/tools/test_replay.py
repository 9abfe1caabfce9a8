"""budget-router replay: JSONL in, one JSON line per record out, summary counts."""

from __future__ import annotations

import io
import json

import orjson
import pytest

from extproc.tools import replay
from extproc.config import Config
from extproc.core.router import Router

TEXT = "The quick brown fox jumps over the lazy dog. " * 9  # 405 bytes: prior ~112 tokens


def chat(text=TEXT, **kw):
    return {"model": "llama", "messages": [{"role": "user", "content": text}], **kw}


def rec(body, pt=None, ct=None, **kw) -> bytes:
    r = {"body": body, **kw}
    if pt is not None or ct is not None:
        r["usage"] = {"prompt_tokens": pt, "completion_tokens": ct}
    return orjson.dumps(r)


LINES = [
    rec(chat(max_tokens=100), 112, 100),                      # 1 short, oracle short
    rec(chat(), 112, 50),                                     # 2 uncapped: true budget 162
    rec(chat(max_tokens=10)),                                 # 3 no usage
    b"{not json",                                             # 4 bad
    b"",                                                      # 5 blank: skipped
    b'{"body": [1, 2]}',                                      # 6 bad: body not an object
    rec({"messages": []}, 10, 5),                             # 7 not an LLM request: long, not benign
    rec({"model": "llama", "prompt": [1] * 131072}, 131072, 0),  # 8 rejected 400
    rec(chat(max_tokens=8150), 30, 8150),                     # 9 benign: long, true 8180 fits short
    b'{"usage": {"prompt_tokens": 3}}',                       # 10 bad: no body
    rec(chat(max_tokens=100), 9000, 100),                     # 11 harmful: short, true 9100
    rec({"model": "llama", "prompt": [1] * 50}, 50, 7, path="/v1/completions"),  # 12 exact
]


def run_lines(lines, cfg=None):
    router = Router(cfg or Config())
    out = io.BytesIO()
    summary = replay.Summary()
    replay.replay_lines(router, [ln + b"\n" for ln in lines], out, summary)
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    return rows, summary


def test_one_row_per_record_in_order_with_fields():
    rows, s = run_lines(LINES)
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    by = {r["line"]: r for r in rows}
    fields = {"line", "estimate", "prompt_tokens", "output", "output_source", "budget", "margin", "category",
              "model", "pool", "reason", "completion_tokens", "oracle_pool"}
    for n in (1, 2, 3, 7, 8, 9, 11, 12):
        assert fields <= set(by[n]), n
        assert by[n]["budget"] == by[n]["estimate"] + by[n]["output"]
    r1 = by[1]
    assert r1["estimate"] == round(len(TEXT) / 4 + 11) == 112
    assert (r1["pool"], r1["oracle_pool"], r1["true_budget"], r1["output_source"]) == ("short", "short", 212, "request")
    assert r1["category"] == "prose" and r1["model"] == "llama" and r1["rel_error"] == pytest.approx(0, abs=0.01)
    r2 = by[2]
    assert (r2["output"], r2["output_source"], r2["true_budget"], r2["oracle_pool"]) == (1024, "default", 162, "short")
    assert by[3]["oracle_pool"] is None and by[3]["prompt_tokens"] is None and "true_budget" not in by[3]
    assert by[7]["pool"] == "long" and by[7]["reason"] == "not_llm" and by[7]["category"] is None
    assert by[7]["oracle_pool"] == "short" and "rel_error" not in by[7]
    assert by[8]["status"] == 400 and by[8]["reason"] == "context_length_exceeded"
    assert (by[9]["pool"], by[9]["oracle_pool"], by[9]["true_budget"]) == ("long", "short", 8180)
    assert (by[11]["pool"], by[11]["oracle_pool"], by[11]["true_budget"]) == ("short", "long", 9100)
    assert by[11]["rel_error"] < -0.9
    assert by[12]["estimate"] == 50 and by[12]["category"] == "tokens" and "rel_error" not in by[12]
    assert by[12]["true_budget"] == 57
    for n in (4, 6, 10):
        assert set(by[n]) == {"line", "error"} and by[n]["error"].startswith("not a replay record")


def test_summary_counts():
    _, s = run_lines(LINES)
    assert s.requests == 8
    assert [n for n, _ in s.bad_lines] == [4, 6, 10]
    assert s.with_usage == 7
    assert s.harmful == 1
    assert s.benign == 1
    assert s.rejected == 1
    assert s.pools == {"short": 5, "long": 3}
    d = s.as_dict()
    assert d["harmful_pct"] == round(100 / 7, 3) and d["benign_pct"] == round(100 / 7, 3)
    assert d["misroute_pct"] == round(200 / 7, 3)
    assert d["bad_lines"] == 3
    # every record is before the warm-up: no headline error figures yet
    assert d["rel_error_long_prompts"] == {}
    assert set(s.all_rel_errors) == {"prose"} and len(s.all_rel_errors["prose"]) == 4


def test_learning_happens_between_lines():
    body = chat("word " * 2000)  # 10,000 bytes: prior 2511 tokens
    rows, _ = run_lines([rec(body, 5000, 10)] * 40)
    assert rows[0]["estimate"] == 2511
    assert rows[-1]["estimate"] == pytest.approx(5000, rel=0.02)


def test_headline_errors_after_warmup():
    lines = [rec(chat("word " * 1000), 1500, 10)] * (replay.WARMUP_REQUESTS + 10)
    _, s = run_lines(lines)
    d = s.as_dict()
    assert d["rel_error_long_prompts"]["prose"]["n"] == 10
    assert d["rel_error_long_prompts"]["all"]["n"] == 10
    assert d["rel_error_long_prompts"]["all"]["p90"] < 0.01


def test_percentile():
    assert replay.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert replay.percentile([5.0], 90) == 5.0
    assert replay.percentile([0.0, 10.0], 90) == 9.0


def test_run_writes_file_and_reports_bad_lines(tmp_path):
    src = tmp_path / "requests.jsonl"
    src.write_bytes(b"\n".join(LINES) + b"\n")
    dst = tmp_path / "out.jsonl"
    err = io.StringIO()
    s = replay.run(Config(), str(src), str(dst), err=err)
    rows = [json.loads(x) for x in dst.read_bytes().splitlines()]
    assert len(rows) == 11
    assert s["requests"] == 8 and s["harmful"] == 1 and s["benign"] == 1 and s["rejected"] == 1
    text = err.getvalue()
    assert "line 4: not a replay record" in text
    assert "line 6: not a replay record" in text
    assert "line 10: not a replay record" in text
    assert "requests: 8 (7 with usage, 3 bad lines, 1 rejected 400/413)" in text
    assert "harmful 1" in text and "benign 1" in text


def test_run_caps_bad_line_report(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"nope\n" * 25)
    err = io.StringIO()
    s = replay.run(Config(), str(src), str(tmp_path / "o.jsonl"), err=err)
    assert s["bad_lines"] == 25 and s["requests"] == 0
    assert err.getvalue().count("not a replay record") == 20
    assert "... and 5 more bad lines" in err.getvalue()
