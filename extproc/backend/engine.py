"""Pure scheduling and timing model of one vLLM replica (no I/O, no sleeping).

The engine is a discrete-event simulation of vLLM's continuous batching,
driven by whoever owns the clock: every method takes ``now`` (simulated
seconds) and the caller decides how simulated time maps to wall time
(``server.py`` scales it by ``--time-scale``; tests pass numbers).

Model (deliberately close to vLLM's scheduler, simplified where timing does
not depend on the detail):

* **Sequences** arrive in a FCFS waiting queue. The head is admitted when a
  running slot is free (``max_num_seqs``) and the KV cache has free blocks for
  its whole context (prompt, plus output already produced if it was
  preempted), like vLLM V0's ``can_allocate``. Head-of-line blocking is kept:
  a small request behind a big one waits, as in vLLM's FCFS policy.
* **Steps** (one model forward each) process, within a token budget
  (``max_num_batched_tokens``), one token for every decoding sequence and
  chunks of prompts being prefilled (chunked prefill, vLLM V1's default).
  Step time = base forward cost + per-sequence cost + attention cost per
  context token + prefill tokens / prefill rate. So decode steps get slower
  as the batch and the contexts grow, and long prompts cost prefill time.
  A sequence emits its first token at the end of the step that completes its
  prefill (that is the TTFT), then one token per step.
* **KV cache** is counted in blocks of ``block_size`` tokens. Before a step,
  every decoding sequence needs room for one more token; when blocks run
  out the newest running sequence is preempted (vLLM's recompute
  preemption): its blocks are freed, it goes back to the *front* of the
  waiting queue and, when readmitted, must prefill prompt + output so far
  again (tokens already emitted to the client stay emitted).
* **Rejection**: when the waiting queue already holds ``max_waiting``
  sequences a new one is refused (HTTP 503 in the server). vLLM itself has
  an unbounded queue; this bound is simulator-specific load shedding.

For speed, runs of identical pure-decode steps are simulated as one
"macro step" of up to ``MAX_STEPS_PER_MACRO`` steps; an arrival in the middle
of a macro step cuts it at the next step boundary, so results match a
step-by-step simulation except that the attention cost is sampled at the
macro step's start.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

# --- Defaults (each with its reason) ----------------------------------------

#: vLLM's default --max-model-len is the model's context; 8192 is Llama-3-8B's
#: and the project's short-pool length (extproc.defaults.SHORT_MAX_MODEL_LEN).
DEFAULT_MAX_MODEL_LEN = 8192

#: vLLM's default --max-num-seqs (running sequences per step) is 256.
DEFAULT_MAX_NUM_SEQS = 256

#: vLLM's default KV block size (--block-size) is 16 tokens.
DEFAULT_BLOCK_SIZE = 16

#: KV cache capacity in tokens. 2^18 = 262,144 tokens is what one 80 GB GPU
#: holds for Llama-3-8B in fp16 (128 KiB of KV per token, ~32 GiB of cache),
#: in the range vLLM logs as "# GPU blocks" for that setup. It is fixed per
#: GPU, not per max_model_len: the same GPU holds 32 full 8K sequences but
#: only 2 full 128K ones, which is what makes a long pool's effective
#: concurrency small. Like vLLM, the engine refuses to start if the cache
#: cannot hold one max_model_len sequence.
DEFAULT_KV_CACHE_TOKENS = 262_144

#: Tokens per step (--max-num-batched-tokens). vLLM V1 uses 8192 for the
#: OpenAI server on large data-center GPUs (2048 on smaller ones).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192

#: Prefill throughput, tokens/s: a Llama-3-8B on one A100/H100-class GPU
#: prefills on the order of 10K tokens/s.
DEFAULT_PREFILL_TPS = 10_000.0

#: Decode rate of a single sequence, tokens/s (1 / base step time): ~50 tok/s
#: is typical for an 8B model on one GPU at batch size 1.
DEFAULT_DECODE_TPS = 50.0

#: Extra step time per running sequence (seconds). With 256 sequences the
#: step takes ~1.5x the batch-1 step, the usual shape of vLLM's
#: throughput-vs-batch curve for an 8B model.
DEFAULT_DECODE_SECONDS_PER_SEQ = 0.00004

#: Extra step time per context token held by decoding sequences (seconds):
#: attention reads the KV cache; 128 KiB per token at ~2 TB/s is ~64 ns.
DEFAULT_DECODE_SECONDS_PER_CTX_TOKEN = 6.4e-8

#: Default bound on the waiting queue: 4 x max_num_seqs. Simulator-specific
#: (vLLM queues without bound); enough to absorb a burst of 4 full batches,
#: beyond which queueing delay exceeds what any client would wait for.
WAITING_PER_SEQ_SLOT = 4

#: Identical decode steps simulated at once (bounded so streamed chunks
#: carry at most this many tokens between notifications).
MAX_STEPS_PER_MACRO = 16

#: vLLM's histogram buckets (vllm/engine/metrics.py) for TTFT and end-to-end
#: latency, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0)

# Sequence states.
WAITING = "waiting"
RUNNING = "running"
FINISHED = "finished"
ABORTED = "aborted"


class QueueFull(Exception):
    """The waiting queue is at its bound; the request is rejected."""


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    prefill_tps: float = DEFAULT_PREFILL_TPS
    decode_tps: float = DEFAULT_DECODE_TPS
    decode_seconds_per_seq: float = DEFAULT_DECODE_SECONDS_PER_SEQ
    decode_seconds_per_ctx_token: float = DEFAULT_DECODE_SECONDS_PER_CTX_TOKEN
    max_waiting: int | None = None  # None: WAITING_PER_SEQ_SLOT * max_num_seqs

    @property
    def waiting_bound(self) -> int:
        if self.max_waiting is None:
            return WAITING_PER_SEQ_SLOT * self.max_num_seqs
        return self.max_waiting

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size

    def validate(self) -> "EngineConfig":
        for name in ("max_model_len", "max_num_seqs", "kv_cache_tokens",
                     "block_size", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("prefill_tps", "decode_tps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        for name in ("decode_seconds_per_seq", "decode_seconds_per_ctx_token"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM refuses this too: a full batch of decodes must fit a step.
            raise ConfigError("max_num_batched_tokens must be >= max_num_seqs")
        if self.waiting_bound < 1:
            # Arrivals always queue until the next step boundary, so a bound
            # of 0 would refuse everything.
            raise ConfigError("max_waiting must be >= 1")
        if self.num_blocks * self.block_size < self.max_model_len:
            # vLLM: "The model's max seq len is larger than the maximum number
            # of tokens that can be stored in KV cache".
            raise ConfigError(
                f"max_model_len ({self.max_model_len}) is larger than the KV "
                f"cache ({self.num_blocks * self.block_size} tokens); raise "
                f"kv_cache_tokens or lower max_model_len")
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
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    rejected: int = 0
    success: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


@dataclass(eq=False)
class Sequence:
    req_id: str
    prompt_tokens: int
    max_tokens: int           # output tokens this sequence will produce
    arrival: float
    finish_reason: str = "length"
    state: str = WAITING
    generated: int = 0        # tokens emitted so far (never decreases)
    ctx_target: int = 0       # tokens to prefill on this admission
    prefilled: int = 0        # of ctx_target
    kv_tokens: int = 0        # tokens whose KV is cached (decode phase)
    blocks: int = 0           # KV blocks held
    first_token_at: float | None = None
    finished_at: float | None = None
    num_preemptions: int = 0

    @property
    def decoding(self) -> bool:
        return self.state == RUNNING and self.prefilled >= self.ctx_target

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, ABORTED)


@dataclass
class _Step:
    start: float
    step_time: float
    steps: int
    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]

    @property
    def end(self) -> float:
        return self.start + self.step_time * self.steps


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Engine:
    """Continuous-batching model of one vLLM replica. Not thread-safe."""

    def __init__(self, config: EngineConfig | None = None, now: float = 0.0) -> None:
        self.config = (config or EngineConfig()).validate()
        self.now = now
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order (newest last)
        self.seqs: dict[str, Sequence] = {}
        self.used_blocks = 0
        self.stats = Stats()
        self._step: _Step | None = None
        # Sequences whose output changed since the last advance() returned.
        self._changed: dict[int, Sequence] = {}

    # -- queries --------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (vLLM's kv_cache_usage_perc is 0-1)."""
        return self.used_blocks / self.config.num_blocks

    def next_event_time(self) -> float | None:
        """Simulated time of the next state change, None when idle."""
        return self._step.end if self._step else None

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
        if len(self.waiting) >= self.config.waiting_bound:
            self.stats.rejected += 1
            raise QueueFull(req_id)
        seq = Sequence(req_id, prompt_tokens, max_tokens, arrival=now,
                       finish_reason=finish_reason)
        self.seqs[req_id] = seq
        self.waiting.append(seq)
        if self._step is None:
            self._schedule(now)
        else:
            self._cut_macro_step(now)
        return seq

    def abort(self, req_id: str, now: float) -> None:
        """Drop a sequence (client went away); frees its slot and KV."""
        self._advance(now)
        seq = self.seqs.pop(req_id, None)
        if seq is None or seq.done:
            return
        if seq.state == WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.used_blocks -= seq.blocks
            seq.blocks = 0
        seq.state = ABORTED
        if self._step is None:
            self._schedule(now)
        else:
            self._cut_macro_step(now)

    def release(self, req_id: str) -> None:
        """Forget a finished sequence (the server has answered it)."""
        seq = self.seqs.get(req_id)
        if seq is not None and seq.done:
            del self.seqs[req_id]

    def advance(self, now: float) -> list[Sequence]:
        """Run every step that ends at or before ``now``; return the
        sequences whose output changed (new tokens or finished) since the
        previous call, including changes made while in submit/abort."""
        self._advance(now)
        changed, self._changed = self._changed, {}
        return list(changed.values())

    def _advance(self, now: float) -> None:
        while self._step is not None and self._step.end <= now:
            step = self._step
            self._finish_step(step, self._changed)
            self._schedule(step.end)
        if now > self.now:
            self.now = now

    def run_until_done(self, req_id: str) -> list[Sequence]:
        """Fast-forward simulated time until ``req_id`` is done (time-scale 0)."""
        seq = self.seqs[req_id]
        while not seq.done and self._step is not None:
            self._advance(self._step.end)
        return self.advance(self.now)

    # -- internals ------------------------------------------------------------

    def _cut_macro_step(self, now: float) -> None:
        """Shorten the current macro step to end at the first step boundary
        at or after ``now`` so a new arrival or free slot is seen promptly."""
        step = self._step
        if step is None or step.steps <= 1:
            return
        done = math.ceil((now - step.start) / step.step_time - 1e-9)
        done = max(1, done)
        if done < step.steps:
            step.steps = done

    def _finish_step(self, step: _Step, changed: dict[int, Sequence]) -> None:
        self._step = None
        end = step.end
        k = step.steps
        stats = self.stats
        for seq, chunk in step.prefills:
            if seq.state != RUNNING:
                continue  # aborted (or preempted) meanwhile
            seq.prefilled += chunk
            if seq.prefilled >= seq.ctx_target:
                seq.kv_tokens = seq.ctx_target
                if seq.first_token_at is None:
                    seq.first_token_at = end
                    stats.prompt_tokens += seq.prompt_tokens
                    stats.ttft.observe(end - seq.arrival)
                seq.generated += 1
                stats.generation_tokens += 1
                changed[id(seq)] = seq
                if seq.generated >= seq.max_tokens:
                    self._finish(seq, end)
        for seq in step.decodes:
            if seq.state != RUNNING:
                continue
            seq.kv_tokens += k
            seq.generated += k
            stats.generation_tokens += k
            changed[id(seq)] = seq
            if seq.generated >= seq.max_tokens:
                self._finish(seq, end)
        # Blocks actually needed now (macro steps reserved ahead of time).
        bs = self.config.block_size
        for seq in step.decodes:
            if seq.state == RUNNING:
                need = _blocks(seq.kv_tokens, bs)
                self.used_blocks += need - seq.blocks
                seq.blocks = need

    def _finish(self, seq: Sequence, now: float) -> None:
        seq.state = FINISHED
        seq.finished_at = now
        self.running.remove(seq)
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        reason = seq.finish_reason
        self.stats.success[reason] = self.stats.success.get(reason, 0) + 1
        self.stats.e2e.observe(now - seq.arrival)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        seq.state = WAITING
        seq.prefilled = 0
        seq.kv_tokens = 0
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _schedule(self, now: float) -> None:
        """Plan the next step starting at ``now`` (or go idle)."""
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens

        # 1. Decoding sequences each need KV for one more token; preempt the
        #    newest running sequence until they fit.
        while True:
            decodes = [s for s in self.running if s.decoding]
            extra = sum(_blocks(s.kv_tokens + 1, bs) - s.blocks for s in decodes)
            if self.used_blocks + extra <= cfg.num_blocks or not self.running:
                break
            self._preempt(self.running[-1])
        budget -= len(decodes)

        # 2. Continue chunked prefills of admitted sequences.
        prefills: list[tuple[Sequence, int]] = []
        for s in self.running:
            if budget <= 0:
                break
            if not s.decoding:
                chunk = min(s.ctx_target - s.prefilled, budget)
                prefills.append((s, chunk))
                budget -= chunk

        # 3. Admit from the waiting queue (FCFS, head-of-line blocking).
        while (self.waiting and budget > 0
               and len(self.running) < cfg.max_num_seqs):
            head = self.waiting[0]
            ctx = head.prompt_tokens + head.generated
            need = _blocks(ctx, bs)
            if self.used_blocks + extra + need > cfg.num_blocks:
                break
            self.waiting.popleft()
            head.state = RUNNING
            head.ctx_target = ctx
            head.prefilled = 0
            head.blocks = need
            self.used_blocks += need
            self.running.append(head)
            chunk = min(ctx, budget)
            prefills.append((head, chunk))
            budget -= chunk

        if not decodes and not prefills:
            self._step = None
            return

        prefill_tokens = sum(c for _, c in prefills)
        ctx_tokens = sum(s.kv_tokens for s in decodes)
        step_time = (1.0 / cfg.decode_tps
                     + cfg.decode_seconds_per_seq * (len(decodes) + len(prefills))
                     + cfg.decode_seconds_per_ctx_token * ctx_tokens
                     + prefill_tokens / cfg.prefill_tps)

        steps = 1
        if not prefills and decodes:
            # Pure decode: nothing changes until a sequence finishes or the KV
            # cache fills, so identical steps can be simulated together.
            steps = min(MAX_STEPS_PER_MACRO,
                        min(s.max_tokens - s.generated for s in decodes))
            free = cfg.num_blocks - self.used_blocks
            while steps > 1 and sum(
                    _blocks(s.kv_tokens + steps, bs) - s.blocks
                    for s in decodes) > free:
                steps -= 1
        # Reserve the blocks the step(s) will fill.
        for s in decodes:
            need = _blocks(s.kv_tokens + steps, bs)
            self.used_blocks += need - s.blocks
            s.blocks = need
        self._step = _Step(now, step_time, steps, decodes, prefills)
