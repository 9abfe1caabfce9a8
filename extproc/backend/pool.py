"""One simulated vLLM replica: the planner's scheduler model driven by a clock.

There is one model of vLLM's scheduling in this project,
``extproc.planner.sim.instance.Instance`` (continuous batching, chunked
prefill, KV blocks, recompute preemption, roofline step times). The planner
drives it with its event clock; this module drives the same model with the
caller's clock (the pool server maps wall time to simulated seconds by
``--time-scale``; tests pass numbers). Pure: no I/O, no sleeping, no wall clock.

What lives here is only what a live server needs around the model:

* request bookkeeping: ids, the tokens each request has *released* to its
  client, finish reasons, client aborts;
* releasing tokens when their step has ended: ``advance(now)`` runs the
  model's steps that start before ``now`` and releases the tokens of steps
  that ended by ``now`` (a step that ends later releases at its end, so a token
  shows up at most one step late, never early);
* the bounded waiting queue (``QueueFull``, the server's 503): vLLM's queue is
  unbounded, this bound is simulator-specific load shedding;
* the counters and histograms the pool exports as vLLM metrics (latencies in
  *simulated* seconds).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from ..planner.sim import hardware as hw
from ..planner.sim.instance import INF, Instance, Seq

# --- Defaults (each with its reason) ----------------------------------------

#: vLLM's default --max-model-len is the model's context; 8192 is the
#: project's short-pool length (extproc.defaults.SHORT_MAX_MODEL_LEN).
DEFAULT_MAX_MODEL_LEN = 8192

#: The hardware the simulated pools model by default: one H100 serving
#: Llama-3-8B (the served name ``llama-3-8b-sim``), profiles from the
#: planner's table (extproc.planner.sim.hardware).
DEFAULT_GPU = "h100"
DEFAULT_MODEL_PROFILE = "llama-3-8b"

#: Default bound on the waiting queue: 4 x max_num_seqs. Simulator-specific
#: (vLLM queues without bound); enough to absorb a burst of 4 full batches,
#: beyond which queueing delay exceeds what any client would wait for.
WAITING_PER_SEQ_SLOT = 4

#: vLLM's histogram buckets (vllm/engine/metrics.py) for TTFT and end-to-end
#: latency, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0)

# Request states.
STATE_WAITING = "waiting"
STATE_RUNNING = "running"
FINISHED = "finished"
ABORTED = "aborted"

ConfigError = hw.ConfigError


class QueueFull(Exception):
    """The waiting queue is at its bound; the request is rejected."""


@dataclass(frozen=True)
class PoolConfig:
    """What ``budget-router backend`` is started with: vLLM's scheduler flags,
    the hardware it models and the simulator's queue bound."""

    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = hw.MAX_NUM_SEQS
    #: KV-cache capacity in tokens (vLLM's --kv-cache-memory-bytes / bytes per
    #: token); None: what the GPU's memory leaves, as vLLM's profiling run finds.
    kv_cache_tokens: int | None = None
    block_size: int = hw.BLOCK_SIZE
    max_num_batched_tokens: int = hw.MAX_NUM_BATCHED_TOKENS
    max_waiting: int | None = None  # None: WAITING_PER_SEQ_SLOT * max_num_seqs
    gpu: str = DEFAULT_GPU
    model: str = DEFAULT_MODEL_PROFILE
    tp: int | None = None  # None: the model's default for the GPU

    @property
    def waiting_bound(self) -> int:
        if self.max_waiting is None:
            return WAITING_PER_SEQ_SLOT * self.max_num_seqs
        return self.max_waiting

    def instance_config(self) -> hw.InstanceConfig:
        """The planner's config of this replica (raises ConfigError)."""
        for name in ("max_model_len", "max_num_seqs", "block_size", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ConfigError("kv_cache_tokens must be >= 1")
        if self.waiting_bound < 1:
            # Arrivals queue until the next step boundary, so a bound of 0
            # would refuse everything.
            raise ConfigError("max_waiting must be >= 1")
        cfg = hw.make_config(self.gpu, self.model, self.max_model_len, self.tp,
                             max_num_seqs=self.max_num_seqs,
                             max_num_batched_tokens=self.max_num_batched_tokens,
                             block_size=self.block_size)
        if self.kv_cache_tokens is not None:
            per_gpu = -(-self.kv_cache_tokens * cfg.model.kv_bytes_per_token // cfg.tp)
            cfg = cfg.with_(kv_cache_memory_bytes=per_gpu)
        return cfg.validate()

    def validate(self) -> "PoolConfig":
        self.instance_config()
        return self


class Histogram:
    """Cumulative Prometheus histogram (pure data)."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf only
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", self.count))
        return out


@dataclass
class Stats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    rejected: int = 0
    success: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


class _OpenRecords:
    """The model's per-request outcome table (planner: ``Records``, sized for a
    trace) for an open-ended stream of requests: entries appear on first use
    and are dropped when the pool forgets the request."""

    __slots__ = ("first_token", "finish", "first_sched", "preempts", "rejected", "inst", "pool")

    def __init__(self) -> None:
        nan = float("nan")
        self.first_token: dict[int, float] = defaultdict(lambda: nan)
        self.finish: dict[int, float] = defaultdict(lambda: nan)
        self.first_sched: dict[int, float] = defaultdict(lambda: nan)
        self.preempts: dict[int, int] = defaultdict(int)
        self.rejected: dict[int, int] = defaultdict(int)
        self.inst: dict[int, int] = {}
        self.pool: dict[int, int] = {}

    def forget(self, rid: int) -> None:
        for table in (self.first_token, self.finish, self.first_sched, self.preempts,
                      self.rejected, self.inst, self.pool):
            table.pop(rid, None)


@dataclass(eq=False)
class Sequence:
    """One (prompt, choice) as its client sees it: tokens released so far."""

    req_id: str
    prompt_tokens: int
    max_tokens: int           # output tokens this sequence will produce
    arrival: float
    finish_reason: str = "length"
    state: str = STATE_WAITING
    generated: int = 0        # tokens released to the client (never decreases)
    first_token_at: float | None = None
    finished_at: float | None = None
    num_preemptions: int = 0
    seq: Seq | None = field(default=None, repr=False)  # the model's sequence

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, ABORTED)


def _nan(x: float) -> bool:
    return x != x


class Pool:
    """A vLLM replica for a live server: ``Instance`` plus a clock. Not thread-safe."""

    def __init__(self, config: PoolConfig | None = None, now: float = 0.0) -> None:
        self.config = config or PoolConfig()
        self.instance_config = self.config.instance_config()
        self.rec = _OpenRecords()
        self._work = [0.0]
        self.model = Instance(self.instance_config, 0, self.rec, self._work, 0)  # type: ignore[arg-type]
        self.model.t = now
        self.seqs: dict[str, Sequence] = {}
        self.stats = Stats()
        self._live: dict[int, Sequence] = {}       # rid -> not yet done
        self._changed: dict[int, Sequence] = {}
        self._rids = itertools.count()
        self._released_at = now  # model time of the last release

    # -- queries --------------------------------------------------------------
    # The gauges (running, waiting, KV usage, preemptions) describe the model's
    # state after the step in progress, as vLLM's scheduler stats describe the
    # batch it has scheduled.

    @property
    def now(self) -> float:
        """Simulated time the model's state is at (end of its last step)."""
        return self.model.t

    @property
    def num_running(self) -> int:
        return len(self.model.running)

    @property
    def num_waiting(self) -> int:
        return len(self.model.waiting)

    @property
    def num_preemptions(self) -> int:
        return self.model.preemptions

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (vLLM's kv_cache_usage_perc is 0-1)."""
        return self.model.used_blocks() / self.model.total_blocks

    def next_event_time(self) -> float | None:
        """When ``advance`` next has something to do; None when idle."""
        if self.model.idle() and self.model.t <= self._released_at:
            return None
        return self.model.t

    # -- inputs ---------------------------------------------------------------

    def submit(self, req_id: str, prompt_tokens: int, max_tokens: int, now: float,
               finish_reason: str = "length") -> Sequence:
        """Queue a sequence. Raises QueueFull when the waiting queue is full.

        The caller has validated prompt_tokens + max_tokens <= max_model_len.
        """
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        if prompt_tokens + max_tokens > self.config.max_model_len:
            raise ValueError("sequence longer than max_model_len")
        if req_id in self.seqs:
            raise ValueError(f"duplicate request id {req_id!r}")
        self._advance(now)
        if len(self.model.waiting) >= self.config.waiting_bound:
            self.stats.rejected += 1
            raise QueueFull(req_id)
        rid = next(self._rids)
        seq = Seq(rid, prompt_tokens, max_tokens, 0.0)
        out = Sequence(req_id, prompt_tokens, max_tokens, now, finish_reason, seq=seq)
        self.seqs[req_id] = out
        self._live[rid] = out
        self.model.add(seq, now)
        self._advance(now)  # admitted now if a step can start now, as vLLM's busy loop does
        if rid in self.model.running:
            out.state = STATE_RUNNING
        return out

    def abort(self, req_id: str, now: float) -> None:
        """Drop a sequence (client went away); frees its slot and KV."""
        self._advance(now)
        out = self.seqs.pop(req_id, None)
        if out is None or out.done:
            return
        self.model.abort(out.seq)
        out.state = ABORTED
        self._forget(out)
        self._advance(now)

    def release(self, req_id: str) -> None:
        """Forget a finished sequence (the server has answered it)."""
        out = self.seqs.get(req_id)
        if out is not None and out.done:
            del self.seqs[req_id]

    def advance(self, now: float) -> list[Sequence]:
        """Run the model's steps that start before ``now`` and return the
        sequences that released tokens (or finished) since the previous call,
        including releases made inside submit/abort."""
        self._advance(now)
        changed, self._changed = self._changed, {}
        return list(changed.values())

    def run_until_done(self, req_id: str) -> list[Sequence]:
        """Fast-forward simulated time until ``req_id`` is done (time-scale 0)."""
        out = self.seqs[req_id]
        while not out.done and not self.model.idle():
            self.model.run_until(INF)
            self._collect()
        self._collect()
        return self.advance(self.now)

    # -- internals ------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Release what ended by ``now``, then compute every step that starts
        at or before ``now`` (the model's state then lies at the end of the
        last one, possibly after ``now``: its tokens wait until then)."""
        m = self.model
        if m.t <= now:
            self._collect()
            if not m.idle():
                m.run_until(math.nextafter(now, INF))
                if m.t <= now:
                    self._collect()

    def _collect(self) -> None:
        """Release what the model produced up to its state time (<= now)."""
        m, rec, st = self.model, self.rec, self.stats
        self._released_at = m.t
        done = []
        for rid, out in self._live.items():
            out.state = STATE_RUNNING if rid in m.running else STATE_WAITING
            out.num_preemptions = rec.preempts[rid]
            finish = rec.finish[rid]
            g = out.max_tokens if not _nan(finish) else m.generated(out.seq)
            if g == out.generated and _nan(finish):
                continue
            self._changed[rid] = out
            st.generation_tokens += g - out.generated
            out.generated = g
            if out.first_token_at is None and g > 0:
                out.first_token_at = rec.first_token[rid]
                st.prompt_tokens += out.prompt_tokens
                st.ttft.observe(out.first_token_at - out.arrival)
            if not _nan(finish):
                out.state = FINISHED
                out.finished_at = finish
                st.success[out.finish_reason] = st.success.get(out.finish_reason, 0) + 1
                st.e2e.observe(finish - out.arrival)
                done.append(out)
        for out in done:
            self._forget(out)

    def _forget(self, out: Sequence) -> None:
        rid = out.seq.rid
        self._live.pop(rid, None)
        self.rec.forget(rid)
