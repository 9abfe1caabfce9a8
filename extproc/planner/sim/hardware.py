"""GPU and model profiles, vLLM instance configs and the roofline step-time model.

Every constant cites its public source. Units: bytes, FLOP/s, seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

GIB = 1024**3

# --- vLLM defaults (each with its precedent) ---------------------------------

#: PagedAttention block size in tokens: vLLM's default ``--block-size 16`` on
#: CUDA and ROCm (vllm/config CacheConfig.block_size).
BLOCK_SIZE = 16

#: vLLM's default ``--gpu-memory-utilization``: the fraction of each GPU's memory
#: the engine may use for weights + activations + KV cache. 0.92 in the pinned vLLM
#: 0.32 (vllm/config/cache.py CacheConfig.gpu_memory_utilization; 0.9 before).
GPU_MEMORY_UTILIZATION = 0.92

#: vLLM's default ``--max-num-seqs`` (256 in V0 and for the OpenAI server on
#: GPUs < 70 GB in V1): the cap on concurrently running sequences.
MAX_NUM_SEQS = 256

#: vLLM V1's default ``--max-num-batched-tokens`` for the OpenAI server on GPUs
#: with >= 70 GB (A100-80GB, H100, MI300X): 8192 tokens per step, with chunked
#: prefill always on in V1.
MAX_NUM_BATCHED_TOKENS = 8192

#: vLLM's ``--long-prefill-token-threshold``: 0 = off (its default with one
#: partial prefill). When set, a prompt longer than this is prefilled at most
#: this many tokens per step, leaving the rest of the step's token budget to
#: other (short) prompts. The planner searches it as its own axis, always
#: below the step budget (sizing/space.py).
LONG_PREFILL_TOKEN_THRESHOLD = 0

#: vLLM's ``--max-num-partial-prefills``: 0 here = no cap (the V1 scheduler
#: packs as many partial prefills as the token budget allows); N > 0 caps the
#: requests in partial prefill at once (the V0 knob, default 1 there).
MAX_NUM_PARTIAL_PREFILLS = 0

#: vLLM V1 enables automatic prefix caching by default (--enable-prefix-caching);
#: it only acts on traces that carry block hashes (Mooncake `hash_ids`).
ENABLE_PREFIX_CACHING = True

#: Memory per GPU that vLLM's profiling run keeps out of the KV cache: peak
#: activations of a max_num_batched_tokens forward pass, the NCCL workspace and the
#: runtime (CUDA context, CUDA graphs, allocator). aiconfigurator 0.12's vLLM memory
#: model gives 0.6-0.8 GiB activations at 8,192 tokens + 0.3-0.4 GiB NCCL at TP > 1
#: + 3.5 GiB "others" for Llama-3.1-8B/70B and Qwen3-32B: ~4.5 GiB (3 GiB before).
NON_KV_RESERVE_PER_GPU = 4.5 * GIB

# --- Step-time model (fitted to measured data, see docs/planner.md) -----------

#: Fixed per-step cost: scheduler, input preparation, sampling and kernel-launch
#: gaps that CUDA graphs do not hide. vLLM v0.6.0's performance blog measured
#: CPU-side overheads of a few ms per step; 2 ms is what remains after its async
#: output processing. The reference anchors are kernel sums without it; the fit of
#: the efficiencies below holds it at 2 ms.
STEP_OVERHEAD_S = 0.002


@dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peaks one GPU reaches in vLLM's kernels, and its
    all-reduce. Fitted per GPU by least squares on log step time against the
    reference table (tests/planner/data/reference_steps.json: aiconfigurator 0.12
    silicon vLLM data and vidur's profiles; fit in docs/planner.md), rounded.

    A step is the kernels in sequence (not one roofline over the whole step):
      overhead + all-reduces + max(GEMM FLOPs / F_gemm, weight bytes / B_gemm)
               + max(attention FLOPs / F_attn, KV bytes / B_attn)
    so attention's KV reads at large decode batch add to the weight GEMMs."""

    gemm_flops: float  # dense BF16 GEMM FLOP/s fraction (prefill-sized GEMMs)
    gemm_bw: float  # HBM fraction streaming weights (decode-sized GEMMs)
    attn_flops: float  # FlashAttention prefill FLOP/s fraction
    attn_bw: float  # paged decode attention HBM fraction reading KV
    moe_flops: float  # fused-MoE kernels, relative to gemm_flops
    moe_bw: float  # fused-MoE weight streaming, relative to gemm_bw
    allreduce_bw: float  # bytes/s: one all-reduce of S bytes takes lat + 2(tp-1)/tp * S / bw
    allreduce_latency: float  # s


#: Per-GPU fits, rounded (`bench/calibrate.py --fit` reproduces them; `--compare` prints
#: every point). A100 reaches a
#: higher fraction of its (lower) peak than H100/H200 in attention; the all-reduce
#: bandwidth grows with NVLink generation (A100 NVLink3 600 GB/s, H100/H200 NVLink4
#: 900 GB/s; vLLM's custom all-reduce/NCCL reach ~20-25% of it in algorithm bandwidth
#: at these message sizes).
EFFICIENCY: dict[str, Efficiency] = {
    "a100": Efficiency(0.825, 0.89, 0.61, 0.70, 0.46, 0.79, 118e9, 56e-6),
    "h100": Efficiency(0.82, 0.92, 0.67, 0.94, 0.50, 0.86, 185e9, 26e-6),
    "h200": Efficiency(0.82, 0.92, 0.65, 0.91, 0.58, 0.78, 211e9, 15e-6),
}
#: B200 and MI300X have no measured anchors here: H100's fractions, an assumption.
EFFICIENCY["b200"] = EFFICIENCY["mi300x"] = EFFICIENCY["h100"]


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    hbm_bandwidth: float  # bytes/s
    peak_flops: float  # dense BF16 FLOP/s
    price_per_hour: float  # USD per GPU-hour (configurable assumption)
    source: str


#: Public datasheet figures. Prices are on-demand list prices per GPU-hour and
#: only a default: pass --price-per-gpu-hour for your own.
GPUS: dict[str, GPU] = {
    "a100": GPU(
        "A100-SXM4-80GB", 80 * GIB, 2.039e12, 312e12, 1.79,
        "NVIDIA A100 datasheet: 80GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS dense; "
        "price: Lambda on-demand A100 $1.79/h"),
    "h100": GPU(
        "H100-SXM5-80GB", 80 * GIB, 3.35e12, 989e12, 2.99,
        "NVIDIA H100 datasheet (SXM): 80GB HBM3, 3.35 TB/s, BF16 989 TFLOPS dense "
        "(1,979 with sparsity); price: Lambda on-demand H100 $2.99/h"),
    # nvidia-smi on an H200 SXM reports 143,771 MiB (~140.4 GiB = 150.8e9 bytes):
    # the "141 GB" of the datasheet is rounded, and 141e9 bytes would understate
    # the KV cache by ~9.8 GB per GPU.
    "h200": GPU(
        "H200-SXM-141GB", 143771 * 1024**2, 4.8e12, 989e12, 3.29,
        "NVIDIA H200 datasheet (SXM): 141GB HBM3e (nvidia-smi: 143,771 MiB), 4.8 TB/s, "
        "BF16 989 TFLOPS dense (1,979 with sparsity); price: Lambda on-demand H200 $3.29/h"),
    # DGX/HGX B200: 1,440 GB HBM3e and 64 TB/s for 8 GPUs (180 GB, 8 TB/s each);
    # HGX B200 FP16/BF16 36 PFLOPS with sparsity for 8 GPUs = 2.25 PFLOPS dense each.
    "b200": GPU(
        "B200-SXM-180GB", 180e9, 8.0e12, 2250e12, 4.99,
        "NVIDIA DGX B200 / HGX B200 datasheets: 180GB HBM3e and 8 TB/s per GPU, BF16 "
        "2.25 PFLOPS dense (4.5 with sparsity); price: Lambda on-demand B200 $4.99/h (assumption)"),
    "mi300x": GPU(
        "MI300X-192GB", 192 * GIB, 5.3e12, 1307.4e12, 2.50,
        "AMD Instinct MI300X datasheet: 192GB HBM3 (rocm-smi: 196,592 MiB usable "
        "~ 192 GiB), 5.3 TB/s, BF16 1,307.4 TFLOPS dense; price: assumption, typical 2025 neocloud MI300X rate"),
}


@dataclass(frozen=True)
class Model:
    name: str
    params: float  # total parameters
    active_params: float  # parameters touched per token (MoE: shared + top-k experts)
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_context: int
    experts: int = 0  # routed experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    expert_params: float = 0.0  # parameters in routed experts (all of them)
    default_tp: dict = field(default_factory=dict, hash=False)  # out of the hash: configs key the planner's caches
    source: str = ""
    hidden: int = 0  # residual stream width (what a TP all-reduce carries per token)

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V, per layer, per KV head, head_dim values of dtype_bytes each.
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def attn_flops_per_ctx_token(self) -> float:
        # QK^T and AV: 2 matmuls x 2 FLOP/MAC x q_heads x head_dim, per layer.
        return 4.0 * self.layers * self.q_heads * self.head_dim

    def weight_bytes_read(self, tokens: int) -> float:
        """Bytes of weights one step reads for `tokens` tokens in the batch.

        Dense models read every weight. A MoE reads the shared part plus the
        experts touched: with k of E experts per token chosen ~uniformly, the
        expected touched share is 1 - (1 - k/E)^tokens.
        """
        if not self.experts:
            return self.weight_bytes
        shared = self.params - self.expert_params
        frac = 1.0 - (1.0 - self.experts_per_token / self.experts) ** max(tokens, 1)
        return (shared + self.expert_params * frac) * self.dtype_bytes


def _expert_params(total: float, active: float, experts: int, k: int) -> float:
    """Parameters in routed experts from total and active counts:
    active = shared + expert * k/E  and  total = shared + expert."""
    return (total - active) / (1 - k / experts)


_QWEN_TOTAL, _QWEN_ACTIVE, _QWEN_E, _QWEN_K = 235.09e9, 22.2e9, 128, 8
_QWEN_EXPERT = _expert_params(_QWEN_TOTAL, _QWEN_ACTIVE, _QWEN_E, _QWEN_K)
_Q30_TOTAL, _Q30_ACTIVE = 30.5e9, 3.3e9

MODELS: dict[str, Model] = {
    "llama-3-70b": Model(
        "Llama-3.1-70B", 70.55e9, 70.55e9, 80, 64, 8, 128, 2, 131072,
        default_tp={"a100": 4, "h100": 4, "h200": 4, "b200": 2, "mi300x": 2},
        hidden=8192,
        source="meta-llama/Llama-3.1-70B config.json: 80 layers, 64 heads, 8 KV "
               "heads, hidden 8192 (head_dim 128), 131072 max positions; 70.6B params, BF16"),
    "qwen3-235b-a22b": Model(
        "Qwen3-235B-A22B", _QWEN_TOTAL, _QWEN_ACTIVE, 94, 64, 4, 128, 2, 131072,
        experts=_QWEN_E, experts_per_token=_QWEN_K, expert_params=_QWEN_EXPERT,
        default_tp={"a100": 8, "h100": 8, "h200": 8, "b200": 4, "mi300x": 4},
        hidden=4096,
        source="Qwen/Qwen3-235B-A22B model card/config.json: 235B total, 22B "
               "activated, 94 layers, 64 Q / 4 KV heads, head_dim 128, 128 experts "
               "8 active; 32,768 native context, 131,072 with YaRN"),
    "llama-3-8b": Model(
        "Llama-3.1-8B", 8.03e9, 8.03e9, 32, 32, 8, 128, 2, 131072,
        default_tp={"a100": 1, "h100": 1, "h200": 1, "b200": 1, "mi300x": 1},
        hidden=4096,
        source="meta-llama/Llama-3.1-8B config.json: 32 layers, 32 heads, 8 KV heads, "
               "hidden 4096 (head_dim 128), 131072 max positions; 8.03B params, BF16"),
    "qwen3-32b": Model(
        "Qwen3-32B", 32.8e9, 32.8e9, 64, 64, 8, 128, 2, 131072,
        default_tp={"a100": 2, "h100": 2, "h200": 1, "b200": 1, "mi300x": 1},
        hidden=5120,
        source="Qwen/Qwen3-32B model card/config.json: 32.8B params, 64 layers, 64 Q / 8 KV "
               "heads, head_dim 128; 32,768 native context, 131,072 with YaRN"),
    "qwen3-30b-a3b": Model(
        "Qwen3-30B-A3B", _Q30_TOTAL, _Q30_ACTIVE, 48, 32, 4, 128, 2, 131072,
        experts=128, experts_per_token=8,
        expert_params=_expert_params(_Q30_TOTAL, _Q30_ACTIVE, 128, 8),
        default_tp={"a100": 1, "h100": 1, "h200": 1, "b200": 1, "mi300x": 1},
        hidden=2048,
        source="Qwen/Qwen3-30B-A3B model card/config.json: 30.5B total, 3.3B activated, 48 "
               "layers, 32 Q / 4 KV heads, head_dim 128, 128 experts 8 active; 32,768 native "
               "context, 131,072 with YaRN"),
}


class ConfigError(ValueError):
    """An instance configuration vLLM itself would refuse to start."""


@dataclass(frozen=True)
class InstanceConfig:
    """One vLLM server: hardware, model, TP degree and the scheduler knobs."""

    gpu: GPU
    model: Model
    tp: int
    max_model_len: int
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    block_size: int = BLOCK_SIZE
    long_prefill_token_threshold: int = LONG_PREFILL_TOKEN_THRESHOLD
    max_num_partial_prefills: int = MAX_NUM_PARTIAL_PREFILLS
    enable_prefix_caching: bool = ENABLE_PREFIX_CACHING
    #: vLLM's ``--kv-cache-memory-bytes`` (per GPU): a fixed KV cache instead of what
    #: gpu_memory_utilization leaves; 0 = off, vLLM's default. The simulated pools
    #: (``budget-router backend --kv-tokens``) set it; the planner does not.
    kv_cache_memory_bytes: int = 0

    def with_(self, **kw) -> "InstanceConfig":
        return replace(self, **kw)

    @property
    def kv_bytes_total(self) -> float:
        if self.kv_cache_memory_bytes:
            return float(self.kv_cache_memory_bytes * self.tp)
        return (self.gpu.memory_bytes * self.gpu_memory_utilization * self.tp
                - self.model.weight_bytes - NON_KV_RESERVE_PER_GPU * self.tp)

    @property
    def num_blocks(self) -> int:
        per_block = self.model.kv_bytes_per_token * self.block_size
        return max(0, int(self.kv_bytes_total // per_block))

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def validate(self) -> "InstanceConfig":
        if self.kv_bytes_total <= 0:
            raise ConfigError(
                f"{self.model.name} weights ({self.model.weight_bytes / GIB:.0f} GiB) do not "
                f"fit {self.tp} x {self.gpu.name} at gpu_memory_utilization "
                f"{self.gpu_memory_utilization}; raise --tp")
        if self.kv_tokens < self.max_model_len:
            # vLLM refuses to start when one max_model_len sequence cannot fit.
            raise ConfigError(
                f"KV cache holds {self.kv_tokens} tokens < max_model_len "
                f"{self.max_model_len} ({self.model.name}, TP {self.tp}, {self.gpu.name})")
        if self.max_model_len > self.model.max_context:
            raise ConfigError(f"max_model_len {self.max_model_len} > model context "
                              f"{self.model.max_context}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM requires max_num_batched_tokens >= max_num_seqs.
            raise ConfigError("max_num_batched_tokens must be >= max_num_seqs")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        return self

    def label(self) -> str:
        extra = ""
        if self.long_prefill_token_threshold:
            extra += f" lpt={self.long_prefill_token_threshold}"
        if self.max_num_partial_prefills:
            extra += f" mpp={self.max_num_partial_prefills}"
        if self.gpu_memory_utilization != GPU_MEMORY_UTILIZATION:
            extra += f" gmu={self.gpu_memory_utilization}"
        return (f"{self.model.name} TP{self.tp} {self.gpu.name} len={self.max_model_len} "
                f"seqs={self.max_num_seqs} mbt={self.max_num_batched_tokens}{extra}")

    def gpu_key(self) -> str:
        """The GPUS key of this config's GPU (for plan.json and --emit)."""
        return next((k for k, g in GPUS.items() if g.name == self.gpu.name), self.gpu.name)

    def vllm_args(self) -> list[str]:
        """`vllm serve` arguments that reproduce this config."""
        a = [f"--tensor-parallel-size={self.tp}", f"--max-model-len={self.max_model_len}",
             f"--max-num-seqs={self.max_num_seqs}",
             f"--max-num-batched-tokens={self.max_num_batched_tokens}",
             f"--gpu-memory-utilization={self.gpu_memory_utilization}",
             f"--block-size={self.block_size}"]
        if self.kv_cache_memory_bytes:
            a.append(f"--kv-cache-memory-bytes={self.kv_cache_memory_bytes}")
        if self.long_prefill_token_threshold:
            a.append(f"--long-prefill-token-threshold={self.long_prefill_token_threshold}")
        if self.max_num_partial_prefills:
            a.append(f"--max-num-partial-prefills={self.max_num_partial_prefills}")
        return a

    def to_json(self) -> dict:
        return {"gpu": self.gpu_key(), "model": self.model.name, "tp": self.tp,
                "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "long_prefill_token_threshold": self.long_prefill_token_threshold,
                "max_num_partial_prefills": self.max_num_partial_prefills,
                "kv_tokens": self.kv_tokens}

    # -- roofline constants used by the instance model -------------------------
    def step_coeffs(self) -> "StepCoeffs":
        return StepCoeffs.of(self)


@dataclass(frozen=True)
class StepCoeffs:
    """Coefficients of the step-time model, precomputed per config.

    time = fixed + per_token * tokens                      (overhead + TP all-reduces)
         + max(flops_per_token * tokens * inv_flops, weights_read(tokens) * inv_bw)   (GEMMs)
         + max(attn * ctx_attended * inv_attn_flops, kvb * kv_read * inv_attn_bw)     (attention)
    The GEMMs and attention are separate kernels run one after the other: their
    times add (issue 16: one max over the whole step hid KV reads under the GEMMs).
    """

    overhead: float  # s per step: STEP_OVERHEAD_S + all-reduce latencies
    per_token: float  # s per batched token: all-reduce bytes
    inv_flops: float  # s per GEMM FLOP (whole instance, with efficiency)
    inv_bw: float  # s per weight byte
    inv_attn_flops: float  # s per attention FLOP
    inv_attn_bw: float  # s per KV byte read
    flops_per_token: float
    attn_flops_per_ctx: float
    kv_bytes_per_token: float
    model: Model

    @staticmethod
    def of(cfg: InstanceConfig) -> "StepCoeffs":
        m, tp = cfg.model, cfg.tp
        e = EFFICIENCY.get(cfg.gpu_key(), EFFICIENCY["h100"])
        ff, fb = (e.moe_flops, e.moe_bw) if m.experts else (1.0, 1.0)
        n_ar = 0 if tp == 1 else 2 * m.layers  # 2 all-reduces per layer (attention, MLP)
        hidden = m.hidden or m.q_heads * m.head_dim
        ring = 2.0 * (tp - 1) / tp
        return StepCoeffs(
            overhead=STEP_OVERHEAD_S + n_ar * e.allreduce_latency,
            per_token=n_ar * ring * hidden * m.dtype_bytes / e.allreduce_bw,
            inv_flops=1.0 / (cfg.gpu.peak_flops * e.gemm_flops * ff * tp),
            inv_bw=1.0 / (cfg.gpu.hbm_bandwidth * e.gemm_bw * fb * tp),
            inv_attn_flops=1.0 / (cfg.gpu.peak_flops * e.attn_flops * tp),
            inv_attn_bw=1.0 / (cfg.gpu.hbm_bandwidth * e.attn_bw * tp),
            flops_per_token=2.0 * m.active_params,
            attn_flops_per_ctx=m.attn_flops_per_ctx_token,
            kv_bytes_per_token=float(m.kv_bytes_per_token),
            model=m,
        )

    def fixed(self, tokens: int) -> float:
        """The part of a step set by its token count alone: overhead, all-reduces, GEMMs."""
        g = self.flops_per_token * tokens * self.inv_flops
        w = self.model.weight_bytes_read(tokens) * self.inv_bw
        return self.overhead + self.per_token * tokens + (g if g > w else w)

    def step_time(self, tokens: int, attn_ctx: float, kv_read: float) -> float:
        a = self.attn_flops_per_ctx * attn_ctx * self.inv_attn_flops
        k = self.kv_bytes_per_token * kv_read * self.inv_attn_bw
        return self.fixed(tokens) + (a if a > k else k)


def reference_step_ms(cfg: InstanceConfig, kind: str, tokens: int, context: int, batch: int) -> float:
    """The model's time (ms) for one step of the reference table's shapes: a prefill
    of `tokens` after `context` cached tokens (kind prefill/chunk), or a decode step
    of `batch` requests at `context` tokens each."""
    c = cfg.step_coeffs()
    if kind == "decode":
        return 1e3 * c.step_time(batch, batch * context, batch * context)
    return 1e3 * c.step_time(tokens, tokens * context + tokens * tokens / 2, context)


def make_config(gpu: str, model: str, max_model_len: int | None = None, tp: int | None = None,
                **kw) -> InstanceConfig:
    if gpu not in GPUS:
        raise ConfigError(f"unknown gpu {gpu!r}; known: {', '.join(GPUS)}")
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    g, m = GPUS[gpu], MODELS[model]
    tp = tp or m.default_tp.get(gpu, 8)
    return InstanceConfig(g, m, tp, max_model_len or m.max_context, **kw)


def safe_max_num_seqs(cfg: InstanceConfig) -> int:
    """max_num_seqs that can never preempt: every sequence at max_model_len fits."""
    return max(1, min(cfg.max_num_seqs, cfg.num_blocks // math.ceil(cfg.max_model_len / cfg.block_size)))
