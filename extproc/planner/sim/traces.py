"""Trace loaders, rate scaling, tiling and windowing.

A trace is arrival times (s, from 0, sorted) plus true prompt and output token
counts, optionally with what a router estimated (replay JSONL). Loaders count
bad rows with their line numbers; a file whose rows are all bad is an error.

The one trace loader of the project: the planner, the benches and
``budget-router demo --trace`` (``extproc.tools.demo_traffic.from_trace``)
all read traces through ``load_trace``.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import orjson

from ... import defaults as D

#: How many bad-row reasons a load report keeps verbatim (the count is exact).
MAX_BAD_ROWS_KEPT = 20

#: Default output budget assumed for replay rows without completion_tokens nor
#: a budget: the router's own (read from where the router reads it).
REPLAY_DEFAULT_OUTPUT = D.DEFAULT_OUTPUT_TOKENS


class TraceError(ValueError):
    """A trace file that cannot be simulated (unreadable, or no valid rows)."""


@dataclass
class LoadReport:
    path: str
    fmt: str
    rows: int = 0
    good: int = 0
    bad: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)

    def add_bad(self, line: int, reason: str) -> None:
        self.bad += 1
        if len(self.bad_rows) < MAX_BAD_ROWS_KEPT:
            self.bad_rows.append((line, reason))

    def summary(self) -> str:
        s = f"{self.path}: {self.good} rows loaded ({self.fmt})"
        if self.bad:
            lines = ", ".join(f"line {n}: {r}" for n, r in self.bad_rows[:5])
            s += f", {self.bad} bad rows skipped ({lines}{', ...' if self.bad > 5 else ''})"
        return s


@dataclass
class Trace:
    name: str
    arrival: np.ndarray  # float64 seconds, sorted, first = 0
    prompt: np.ndarray  # int64 true prompt tokens
    output: np.ndarray  # int64 true output tokens (>= 1)
    est_prompt: np.ndarray | None = None  # router's prompt estimate (replay)
    est_budget: np.ndarray | None = None  # router's budget (replay)
    pool_hint: np.ndarray | None = None  # int8: 0 short, 1 long, -1 unknown (replay)
    report: LoadReport | None = None
    # prompt block hashes (Mooncake `hash_ids`, one per HASH_BLOCK_TOKENS tokens):
    # an object array of int tuples, for prefix caching
    hashes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def total(self) -> np.ndarray:
        return self.prompt + self.output

    @property
    def duration(self) -> float:
        return float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0

    @property
    def rate(self) -> float:
        d = self.duration
        return (len(self) - 1) / d if d > 0 else float("inf")

    def take(self, idx: np.ndarray, name: str | None = None) -> "Trace":
        def sub(a):
            return None if a is None else a[idx]
        return Trace(name or self.name, self.arrival[idx], self.prompt[idx], self.output[idx],
                     sub(self.est_prompt), sub(self.est_budget), sub(self.pool_hint), self.report,
                     sub(self.hashes))


def _finish(name, t, p, o, report, ep=None, eb=None, ph=None, hs=None) -> Trace:
    if report.good == 0:
        raise TraceError(f"{report.path}: no valid rows ({report.bad} bad): "
                         + "; ".join(f"line {n}: {r}" for n, r in report.bad_rows[:5]))
    t = np.asarray(t, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]

    def arr(a, dt):
        return None if a is None else np.asarray(a, dtype=dt)[order]
    hashes = None
    if hs is not None and any(h for h in hs):
        hashes = np.empty(len(hs), dtype=object)
        hashes[:] = hs
        hashes = hashes[order]
    return Trace(name, t, arr(p, np.int64), arr(o, np.int64), arr(ep, np.float64),
                 arr(eb, np.float64), arr(ph, np.int8), report, hashes)


def _int(v, what: str) -> int:
    if isinstance(v, bool) or v is None or v == "":
        raise ValueError(f"missing {what}")
    x = float(v)
    if not np.isfinite(x) or x != int(x):
        raise ValueError(f"{what} not an integer: {v!r}")
    return int(x)


def parse_azure_timestamp(s: str, cache: dict[str, float] | None = None) -> float:
    """'2023-11-16 18:17:03.9799600' -> POSIX seconds.

    The Azure 2023 traces write TIMESTAMP with 7 fractional digits (100 ns,
    /work/shared/data/README.md), more than ``datetime`` holds: the seconds
    are parsed as a datetime and all 7 digits added as a fraction (strptime's
    %f would have to cut the 7th). The string has no zone; it is read as UTC
    so that a loader's arrivals do not depend on the machine's time zone (a
    DST change inside a trace would add or drop an hour). Only differences
    are used (arrivals start at 0). ``cache`` maps the seconds part to its
    value: a trace has many requests per second."""
    base, _, frac = s.strip().partition(".")
    b = cache.get(base) if cache is not None else None
    if b is None:
        b = datetime.fromisoformat(base).replace(tzinfo=timezone.utc).timestamp()
        if cache is not None:
            cache[base] = b
    return b + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: str) -> Trace:
    """Azure LLM inference trace: TIMESTAMP (datetime), ContextTokens, GeneratedTokens."""
    return load_generic(path, {"time": "TIMESTAMP", "prompt": "ContextTokens",
                               "output": "GeneratedTokens", "time_unit": "datetime"}, fmt="azure-csv")


def load_mooncake_jsonl(path: str) -> Trace:
    """Mooncake trace: timestamp (ms), input_length, output_length."""
    return load_generic(path, {"time": "timestamp", "prompt": "input_length",
                               "output": "output_length", "time_unit": "ms", "hashes": "hash_ids"},
                        fmt="mooncake-jsonl")


#: Tokens per Mooncake `hash_ids` entry: the trace hashes prompts in 512-token
#: blocks (Mooncake FAST'25 trace README: "block size 512").
HASH_BLOCK_TOKENS = 512


_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _rows(path: str):
    """Yield (line_number, dict | None, error) from a CSV or JSONL file."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith((".jsonl", ".json", ".ndjson")) or data.lstrip()[:1] == b"{":
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                yield n, None, f"invalid JSON ({e.args[0][:40]})"
                continue
            if not isinstance(row, dict):
                yield n, None, "not a JSON object"
                continue
            yield n, row, None
    else:
        text = data.decode("utf-8", errors="replace")
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise TraceError(f"{path}: empty CSV (no header)")
        for row in reader:
            yield reader.line_num, row, None


def load_generic(path: str, mapping: dict[str, str], fmt: str = "generic") -> Trace:
    """CSV or JSONL with a column mapping.

    mapping keys: ``time`` (column, optional), ``time_unit`` (s|ms|us|ns|datetime),
    ``prompt``, ``output`` (columns). Without ``time`` arrivals are left at 0
    and must be assigned with :func:`poisson_arrivals`.
    """
    if not os.path.exists(path):
        raise TraceError(f"{path}: no such file")
    rep = LoadReport(path, fmt)
    tcol, pcol, ocol = mapping.get("time"), mapping["prompt"], mapping["output"]
    hcol = mapping.get("hashes")
    hs: list[tuple] = []
    unit = mapping.get("time_unit", "s")
    if unit != "datetime" and unit not in _TIME_UNITS:
        raise TraceError(f"unknown time_unit {unit!r}")
    scale = _TIME_UNITS.get(unit, 1.0)
    ts, ps, os_ = [], [], []
    dcache: dict[str, float] = {}
    for n, row, err in _rows(path):
        rep.rows += 1
        if err:
            rep.add_bad(n, err)
            continue
        try:
            if tcol:
                v = row.get(tcol)
                if v is None or v == "":
                    raise ValueError(f"missing {tcol}")
                if unit == "datetime":
                    t = parse_azure_timestamp(str(v), dcache)
                else:
                    t = float(v) * scale
                    if not np.isfinite(t):
                        raise ValueError(f"{tcol} not finite")
            else:
                t = 0.0
            p = _int(row.get(pcol), pcol)
            o = _int(row.get(ocol), ocol)
            if p < 1:
                raise ValueError(f"{pcol} < 1: {p}")
            if o < 1:
                raise ValueError(f"{ocol} < 1: {o}")
        except (ValueError, TypeError) as e:
            rep.add_bad(n, str(e))
            continue
        ts.append(t), ps.append(p), os_.append(o)
        if hcol:
            h = row.get(hcol)
            hs.append(tuple(int(x) for x in h) if isinstance(h, list) else ())
        rep.good += 1
    return _finish(os.path.basename(path), ts, ps, os_, rep, hs=hs if hcol else None)


def load_replay_jsonl(path: str, rate: float, seed: int = 0) -> Trace:
    """The JSONL `budget-router replay` writes (no timestamps: Poisson at `rate`).

    Uses prompt_tokens (true), completion_tokens (true output; when absent the
    router's output budget, budget - estimate), estimate, budget and pool.
    """
    if not os.path.exists(path):
        raise TraceError(f"{path}: no such file")
    rep = LoadReport(path, "replay-jsonl")
    ps, os_, eps, ebs, phs = [], [], [], [], []
    for n, row, err in _rows(path):
        rep.rows += 1
        if err:
            rep.add_bad(n, err)
            continue
        try:
            p = _int(row.get("prompt_tokens"), "prompt_tokens")
            est = float(row["estimate"]) if row.get("estimate") is not None else float(p)
            bud = float(row["budget"]) if row.get("budget") is not None else None
            if row.get("completion_tokens") is not None:
                o = _int(row["completion_tokens"], "completion_tokens")
            elif bud is not None:
                o = max(1, int(round(bud - est)))
            else:
                o = REPLAY_DEFAULT_OUTPUT
            if bud is None:
                bud = est + o
            if p < 1 or o < 1:
                raise ValueError("prompt_tokens and output must be >= 1")
            pool = row.get("pool")
            ph = 0 if pool == "short" else 1 if pool == "long" else -1
        except (ValueError, TypeError, KeyError) as e:
            rep.add_bad(n, str(e))
            continue
        ps.append(p), os_.append(o), eps.append(est), ebs.append(bud), phs.append(ph)
        rep.good += 1
    t = poisson_arrivals(len(ps), rate, seed) if ps else []
    return _finish(os.path.basename(path), t, ps, os_, rep, eps, ebs, phs)


def detect_format(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.splitlines()[0] if head else b""
    if first.lstrip().startswith(b"{"):
        try:
            row = orjson.loads(first)
        except orjson.JSONDecodeError:
            return "mooncake"  # let the loader report the bad line
        if "prompt_tokens" in row and ("estimate" in row or "pool" in row):
            return "replay"
        return "mooncake"
    if b"TIMESTAMP" in first and b"ContextTokens" in first:
        return "azure"
    return "unknown"


def load_trace(path: str, fmt: str = "auto", rate: float | None = None, seed: int = 0,
               columns: str | None = None) -> Trace:
    """Load any supported trace. `columns` = 'time=ts,prompt=in,output=out,time_unit=ms'."""
    if not os.path.exists(path):
        raise TraceError(f"{path}: no such file")
    if columns:
        mapping = dict(kv.split("=", 1) for kv in columns.split(","))
        tr = load_generic(path, mapping)
        if "time" not in mapping:
            tr.arrival = poisson_arrivals(len(tr), rate or 1.0, seed)
        return tr
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "azure":
        return load_azure_csv(path)
    if fmt == "mooncake":
        return load_mooncake_jsonl(path)
    if fmt == "replay":
        return load_replay_jsonl(path, rate or 1.0, seed)
    raise TraceError(f"{path}: unknown trace format; pass --columns "
                     "time=COL,prompt=COL,output=COL[,time_unit=s|ms|datetime]")


# --- transformations (pure) ---------------------------------------------------

def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def scale_rate(tr: Trace, rate: float) -> Trace:
    """Compress or stretch time so the mean arrival rate is `rate` req/s.

    Keeps the trace's burstiness (inter-arrival shape). Traces whose timestamps
    are all equal get Poisson arrivals instead.
    """
    if len(tr) < 2 or tr.duration <= 0:
        return replace(tr, arrival=poisson_arrivals(len(tr), rate))
    f = tr.rate / rate
    return replace(tr, arrival=tr.arrival * f)


def tile(tr: Trace, duration: float) -> Trace:
    """Repeat the trace back to back until it covers `duration` seconds.

    A 19K-row trace lasts 19 s at 1,000 req/s; tiling gives the fleet time to
    reach steady state. Each copy is shifted by span + one mean gap.
    """
    if tr.duration >= duration or len(tr) < 2:
        return tr
    period = tr.duration + tr.duration / (len(tr) - 1)
    k = int(np.ceil(duration / period))
    idx = np.tile(np.arange(len(tr)), k)
    out = tr.take(idx)
    out.arrival = (tr.arrival[None, :] + period * np.arange(k)[:, None]).ravel()
    if tr.hashes is not None:
        # each copy is new content: its prefixes must not hit the previous copy's cache
        span = 1 + max((max(h) for h in tr.hashes if h), default=0)
        copy = np.repeat(np.arange(k), len(tr))
        out.hashes = np.empty(len(idx), dtype=object)
        out.hashes[:] = [tuple(x + c * span for x in h) for h, c in zip(tr.hashes[idx], copy)]
    keep = out.arrival <= duration
    return out.take(np.nonzero(keep)[0])


#: A P99 needs a trace at least this long (s) and at least P99_HORIZON_TTFTS x
#: the largest TTFT target: 10 min holds many busy periods of any pool, and a
#: request that waits as long as its target must be one of dozens of such
#: waits for the window to show whether the queue drains (issue 16: 60 s
#: traces under a 60 s target hid queues that grew for the whole window).
P99_MIN_HORIZON_S = 600.0
P99_HORIZON_TTFTS = 20.0


def cover(tr: Trace, seconds: float) -> tuple[Trace, str | None]:
    """The trace tiled (`tile`) to `seconds` when shorter, with the notice to
    show; unchanged (notice None) when long enough."""
    if tr.duration >= seconds or len(tr) < 2:
        return tr, None
    out = tile(tr, seconds)
    return out, (f"notice: trace {tr.name} lasts {tr.duration:.0f} s, shorter than the {seconds:.0f} s a P99 "
                 f"needs (max({P99_MIN_HORIZON_S:.0f} s, {P99_HORIZON_TTFTS:.0f} x the largest TTFT target)); "
                 f"tiled to {len(out):,} requests over {out.duration:.0f} s (copies shifted in time)")


def window(tr: Trace, start: float, duration: float) -> Trace:
    """Requests arriving in [start, start + duration), times rebased to 0."""
    lo, hi = np.searchsorted(tr.arrival, [start, start + duration])
    if hi <= lo:
        raise TraceError(f"window [{start}, {start + duration}) s holds no request "
                         f"(trace spans {tr.duration:.1f} s)")
    out = tr.take(np.arange(lo, hi))
    out.arrival = out.arrival - out.arrival[0]
    return out


def synthetic(n: int, rate: float, prompt_mean: float, output_mean: float, sigma: float = 1.0,
              seed: int = 0, max_total: int | None = None, name: str = "synthetic") -> Trace:
    """Lognormal prompt/output lengths with the given means, Poisson arrivals."""
    rng = np.random.default_rng(seed)

    def ln(mean):
        mu = np.log(mean) - sigma**2 / 2
        return np.maximum(1, np.round(rng.lognormal(mu, sigma, n))).astype(np.int64)
    p, o = ln(prompt_mean), ln(output_mean)
    if max_total:
        over = p + o > max_total
        p[over] = np.maximum(1, max_total // 2)
        o[over] = np.maximum(1, max_total - p[over])
    rep = LoadReport(name, "synthetic", n, n)
    return Trace(name, poisson_arrivals(n, rate, seed), p, o, report=rep)


#: Seeds > 0 shift each arrival by up to +-ARRIVAL_JITTER mean inter-arrival
#: gaps (uniform) and shuffle request contents within consecutive blocks of
#: SHUFFLE_BLOCK requests: the same load and mix over time, a different draw of
#: which request lands when (the sampling noise a re-run of the day would show).
ARRIVAL_JITTER = 1.0
SHUFFLE_BLOCK = 64


def perturb(tr: Trace, seed: int) -> Trace:
    """The trace as seed `seed` sees it: seed 0 is the trace itself."""
    if seed == 0 or len(tr) < 2:
        return tr
    rng = np.random.default_rng(1_000_003 * seed + 17)
    n = len(tr)
    gap = tr.duration / (n - 1)
    t = np.maximum(0.0, tr.arrival + rng.uniform(-ARRIVAL_JITTER, ARRIVAL_JITTER, n) * gap)
    order = np.argsort(t, kind="stable")
    # contents: a permutation inside each block of SHUFFLE_BLOCK requests
    keys = np.arange(n) // SHUFFLE_BLOCK + rng.random(n) * 0.5
    perm = np.argsort(keys, kind="stable")
    out = tr.take(perm)
    out.arrival = t[order] - t[order][0]
    return out
