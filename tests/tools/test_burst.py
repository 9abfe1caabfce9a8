"""The burst scenario's schedule, summary, report and plot (the live run is
``budget-router demo --scenario burst``; its figures are in docs/closed-loop.md)."""

from __future__ import annotations

from extproc.tools import burst as B


def _run(closed: bool) -> dict:
    shots = [{"cls": "short", "t": t, "ttft": 0.1 if closed or t < B.BURST_START_S else 3.0,
              "pool": "long" if closed and B.BURST_START_S <= t < B.BURST_END_S else "short",
              "reason": "spillover" if closed and B.BURST_START_S <= t < B.BURST_END_S else "budget_fits_short"}
             for t in (1.0, 11.0, 12.0, 25.0)]
    shots.append({"cls": "long", "t": 13.0, "ttft": 1.2, "pool": "long", "reason": "budget_over_b_short"})
    polls = [{"t": 0.0, "limits": [8192], "pools": {"short": {"running": 4, "waiting": 0}}},
             {"t": 12.0, "limits": [7782 if closed else 8192], "pools": {"short": {"running": 4, "waiting": 6}}}]
    return {"closed_loop": closed, "shots": shots, "polls": polls}


def test_schedule_has_a_burst_of_short_requests():
    plan = B.schedule(seed=1)
    assert plan == sorted(plan) and plan == B.schedule(seed=1)
    in_burst = [c for t, c in plan if B.BURST_START_S <= t < B.BURST_END_S]
    before = [c for t, c in plan if t < B.BURST_START_S]
    assert in_burst.count("short") > 3 * max(1, before.count("short"))
    assert all(0 <= t < B.RUN_S for t, _ in plan) and {"short", "long"} <= {c for _, c in plan}


def test_summary_report_and_plot(tmp_path):
    runs = [_run(False), _run(True)]
    static, closed = (B.summarize(r) for r in runs)
    assert static["spilled"] == 0 and closed["spilled"] == 2
    assert static["short_burst"]["ttft_p99_s"] == 3.0 and closed["short_burst"]["ttft_p99_s"] == 0.1
    assert closed["b_short_path"] == {"min": 7782, "max": 8192, "last": 7782}
    assert closed["pools"] == {"short->short": 2, "short->long": 2, "long->long": 1}
    text = B.format_report([static, closed])
    assert "| static | 3.00 s / 3.00 s |" in text and "| closed loop | 0.10 s / 0.10 s |" in text
    png = tmp_path / "burst.png"
    B.plot(runs, str(png))
    assert png.stat().st_size > 10_000
