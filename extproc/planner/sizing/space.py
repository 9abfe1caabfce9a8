"""What the planner may choose: the operator's baseline, the per-pool config
search space, the B_short candidates and the context tiers."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from ..sim.hardware import (GPUS, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS,
                            ConfigError, GPU_MEMORY_UTILIZATION, InstanceConfig, make_config)

#: Candidate B_short values for `--b-short auto`: the 8K-16K range production
#: splits use, plus 4K and 32K to show the trend on both sides.
AUTO_B_SHORT = (4096, 8192, 16384, 32768)

#: Search grid per pool. max_num_seqs: vLLM's 256 default and half of it (less
#: KV pressure, fewer preemptions). max_num_batched_tokens: vLLM's 8192 default,
#: 2048 (vLLM's pre-V1 chunked-prefill default: shorter steps, lower TPOT), 4096
#: between them and 16384 (fewer, larger prefill chunks: the most prefill
#: throughput, the longest mixed steps) -- issue 16 item 2's 2K-16K.
SEARCH_SEQS = (MAX_NUM_SEQS, 128)
SEARCH_MBTS = (MAX_NUM_BATCHED_TOKENS, 2048, 4096, 16384)

#: The single pool's long-prefill mitigation as vLLM V1 (0.32) runs it:
#: ``--long-prefill-token-threshold`` caps one request's chunk per step, and
#: it only takes effect below ``max_num_batched_tokens`` (a chunk is already
#: capped by the step budget), so a threshold is searched only under each
#: step budget. V1's scheduler ignores ``--max-num-partial-prefills`` (running
#: requests first, each chunk capped by the threshold, then waiting requests
#: while the budget lasts), so the mitigation does not set it. 256-4096 spans
#: "a prefill chunk costs about one decode step" to half of vLLM's default budget.
SEARCH_LPTS = (256, 1024, 4096)


@dataclass(frozen=True)
class Baseline:
    """The operator's homogeneous fleet as it runs today."""

    gpu: str = "a100"
    tp: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    instances: int | None = None

    def config(self, model: str) -> InstanceConfig:
        return make_config(self.gpu, model, self.max_model_len, self.tp,
                           max_num_seqs=self.max_num_seqs,
                           max_num_batched_tokens=self.max_num_batched_tokens,
                           gpu_memory_utilization=self.gpu_memory_utilization).validate()


_BASELINE_KEYS = {"gpu": str, "tp": int, "max_model_len": int, "max_num_seqs": int,
                  "max_num_batched_tokens": int, "gpu_memory_utilization": float, "instances": int}


def _baseline_fields(text: str | None) -> dict:
    """The KEY=VALUE pairs of '--baseline', or of its TOML file (top level or [baseline])."""
    raw: dict = {}
    if text and os.path.isfile(text):
        with open(text, "rb") as f:
            doc = tomllib.load(f)
        raw = dict(doc.get("baseline", doc))
    elif text:
        for part in text.split(","):
            if part.strip():
                k, sep, v = part.partition("=")
                if not sep:
                    raise ValueError(f"--baseline {part!r}: expected KEY=VALUE")
                raw[k.strip()] = v.strip()
    return raw


def parse_baseline(text: str | None, gpu: str = "a100") -> Baseline:
    """'gpu=a100,tp=4,...,instances=N' or the path of a TOML file with those keys
    (top level or under [baseline])."""
    raw = _baseline_fields(text)
    unknown = sorted(set(raw) - set(_BASELINE_KEYS))
    if unknown:
        raise ValueError(f"--baseline: unknown key(s) {', '.join(unknown)}; known: {', '.join(_BASELINE_KEYS)}")
    kw = {"gpu": gpu}
    for k, v in raw.items():
        try:
            kw[k] = _BASELINE_KEYS[k](v)
        except ValueError:
            raise ValueError(f"--baseline {k}={v!r}: expected {_BASELINE_KEYS[k].__name__}") from None
    if kw["gpu"] not in GPUS:
        raise ValueError(f"--baseline gpu={kw['gpu']!r}: known {', '.join(GPUS)}")
    if kw.get("instances") is not None and kw["instances"] < 1:
        raise ValueError("--baseline instances must be >= 1")
    return Baseline(**kw)


@dataclass(frozen=True)
class Space:
    """The per-pool config search space."""

    gpus: tuple = ()  # () = the baseline's GPU
    tps: tuple = (None,)  # None = the model's default TP for the GPU
    seqs: tuple = SEARCH_SEQS
    mbts: tuple = SEARCH_MBTS
    lpts: tuple = SEARCH_LPTS  # long_prefill_token_threshold, searched below each mbt

    def configs(self, model: str, base: InstanceConfig, max_model_len: int,
                mitigation: bool = False) -> list[InstanceConfig]:
        """Every valid config of the grid at this max_model_len (GPU, TP,
        max_num_seqs, max_num_batched_tokens, in that nesting order)."""
        out = []
        for g in self.gpus or (base.gpu_key(),):
            for tp in self.tps:
                for s in self.seqs:
                    for m in self.mbts:
                        for lpt in (self.thresholds(m, max_model_len) if mitigation else (0,)):
                            try:
                                out.append(_config(model, base, max_model_len, g, tp, s, m, lpt))
                            except ConfigError:
                                continue
        return out

    def thresholds(self, mbt: int, max_model_len: int) -> list[int]:
        """The thresholds that take effect under step budget mbt: below it
        (and below max_model_len, else no prompt is ever capped)."""
        return [int(x) for x in self.lpts if int(x) < min(int(mbt), max_model_len)]


def _config(model: str, base: InstanceConfig, max_model_len: int, gpu: str, tp, seqs, mbt,
            lpt: int = 0) -> InstanceConfig:
    c = make_config(gpu, model, max_model_len, tp, max_num_seqs=int(seqs), max_num_batched_tokens=int(mbt),
                    gpu_memory_utilization=base.gpu_memory_utilization)
    if base.gpu.name == c.gpu.name:  # keep a custom price
        c = c.with_(gpu=base.gpu)
    if lpt:
        c = c.with_(long_prefill_token_threshold=int(lpt))
    return c.validate()


def cost(cfg: InstanceConfig, n: int) -> float:
    """USD per hour of n instances of cfg."""
    return n * cfg.tp * cfg.gpu.price_per_hour


def check_tiers(tiers, mml: int) -> tuple | None:
    """`--tiers` as a tuple of 2+ increasing context lengths up to mml (None: no tiers)."""
    if not tiers:
        return None
    tiers = tuple(int(t) for t in tiers)
    if len(tiers) < 2 or list(tiers) != sorted(set(tiers)) or tiers[-1] > mml:
        raise ValueError(f"--tiers {','.join(map(str, tiers))}: 2+ increasing context lengths, "
                         f"the last <= the baseline's max_model_len {mml}")
    return tiers


def tier_names(n: int) -> list[str]:
    """Pool names of n context tiers: short, tier1 ... tier(n-2), long (as
    `budget-router simulate --tiers` names them)."""
    return ["short", *(f"tier{i}" for i in range(1, n - 1)), "long"]
