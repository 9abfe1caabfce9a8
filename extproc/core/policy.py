"""Routing policy: from an estimate to a pool, a rejection, or the safe default.

Pure functions of (estimate, output budget, config). The rules:

* budget with margin = prompt_estimate * (1 + margin) + output_budget;
  the smallest tier whose budget limit it fits (``short`` if it is <= B_short
  with the default two tiers), else the last tier (``long``);
* a prompt that is *surely* above the long pool's max_model_len
  (estimate * (1 - reject_margin) > max_model_len) is answered 400
  ``context_length_exceeded`` without touching vLLM;
* a ``max_tokens`` (or ``max_completion_tokens``) no pool can ever grant
  (>= the largest pool's max_model_len: vLLM needs at least one prompt token)
  is answered 400 with ``param`` naming the key, as vLLM would;
* anything we cannot estimate goes ``long``: the long pool serves any length,
  so a wrong guess there costs efficiency, never a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.schema import Config

# Reasons, as they appear in the decision header, metadata and logs.
R_SHORT = "budget_fits_short"
R_LONG = "budget_over_b_short"
R_TIER = "budget_fits_tier"    # a middle tier of three or more
R_SPILLOVER = "spillover"      # sent up from a saturated tier (+ "from=<tier>" in detail)
R_CONTEXT = "context_length_exceeded"
R_TOO_LARGE = "body_too_large"
R_MAX_TOKENS = "max_tokens_too_large"
R_ENCODING = "unsupported_content_encoding"
R_BAD_BODY = "undecodable_body"    # Content-Encoding given, body does not decode
R_NOT_LLM = "not_llm"          # + ": <why>" in Decision.detail
R_INTERNAL = "internal_error"  # a bug in the router: routed long, logged

#: HTTP status codes of the immediate responses.
STATUS_BAD_REQUEST = 400
STATUS_TOO_LARGE = 413
STATUS_UNSUPPORTED_MEDIA_TYPE = 415


@dataclass(slots=True)
class Decision:
    pool: str
    reason: str
    detail: str = ""
    model: str = ""
    category: str = ""
    estimate: int = 0            # estimated prompt tokens
    output: int = 0              # output budget
    output_source: str = ""      # request | learned | default
    margin: float = 0.0          # relative margin on the estimate
    rel_error: float = 0.0       # the fit's current mean relative error
    samples: int = 0             # samples its fit has learned from
    n_bytes: int = 0
    vector: tuple[float, ...] = field(default=(), repr=False)
    capped: bool = False         # the request gave its own output cap
    stream: bool = False
    include_usage: bool = False
    exact: bool = False          # token-id prompt: estimate is exact
    k_eff: float = 1.0           # effective number of texts in the prompt
    from_pool: str = ""          # spillover: the tier the budget chose
    media_tokens: int = 0        # of the estimate: images, audio, video, files
    media: str = ""              # their flags, "image:2,audio:1" (core.media)
    status: int | None = None    # immediate response status (400/413)
    error: bytes | None = None   # immediate response body

    @property
    def budget(self) -> int:
        return self.estimate + self.output

    @property
    def padded(self) -> int:
        """The budget the tiers' limits were compared with: the estimate
        padded by the margin, plus the output budget."""
        return round(self.estimate * (1.0 + self.margin) + self.output)

    @property
    def routable(self) -> bool:
        return bool(self.vector) or self.exact

    def header_value(self, padded: int | None = None) -> str:
        """Compact form for the decision response header and logs."""
        if padded is None:
            padded = self.padded
        return (f"pool={self.pool}; est={self.estimate}; budget={padded}; margin={self.margin:.3f}; "
                f"cat={self.category or '-'}; reason={self.reason}"
                + (f"; from={self.from_pool}" if self.from_pool else ""))

    def metadata(self) -> dict[str, object]:
        padded = self.padded
        md: dict[str, object] = {
            "pool": self.pool, "reason": self.reason, "estimate": self.estimate,
            "budget": padded, "category": self.category or "-", "model": self.model or "-",
            "margin": round(self.margin, 4), "decision": self.header_value(padded),
            **({"from_pool": self.from_pool} if self.from_pool else {}),
        }
        if self.media:
            md["media"] = self.media
            md["media_tokens"] = self.media_tokens
        return md


def true_budget(prompt_tokens: int, max_output: int | None, completion_tokens: int | None) -> int:
    """The budget a request really needed: its prompt plus its output cap when
    it gives one (what vLLM reserves and checks against max_model_len), else
    plus what it generated. Misroutes are judged against this."""
    out = max_output if max_output is not None else completion_tokens
    return prompt_tokens + (out or 0)


def padded_budget(estimate: float, output: int, margin: float) -> float:
    return estimate * (1.0 + margin) + output


def tier_for(limits: tuple[int, ...] | list[int], padded: float) -> int:
    """Index of the smallest tier whose budget limit ``padded`` fits; the last
    tier (index ``len(limits)``) takes everything above the last limit."""
    for i, limit in enumerate(limits):
        if padded <= limit:
            return i
    return len(limits)


def reason_for(index: int, n_tiers: int) -> str:
    if index == 0:
        return R_SHORT
    return R_LONG if index == n_tiers - 1 else R_TIER


def choose(cfg: Config, estimate: float, output: int, margin: float,
           limits: tuple[int, ...] | None = None) -> tuple[str, str]:
    """Tier name and reason for a prompt estimate, output budget and margin;
    ``limits`` overrides the configured boundaries (the adaptive threshold)."""
    i = tier_for(cfg.limits if limits is None else limits, padded_budget(estimate, output, margin))
    return cfg.tiers[i].name, reason_for(i, len(cfg.tiers))


def low_estimate(cfg: Config, estimate: float, exact: bool) -> float:
    """An optimistic reading of the estimate (exact for token-id prompts)."""
    return estimate if exact else estimate * (1.0 - cfg.policy.reject_margin)


def surely_too_long(cfg: Config, estimate: float, exact: bool) -> bool:
    """True when even an optimistic reading of the estimate exceeds the long
    pool's context (vLLM needs at least one slot for output: prompt >= limit)."""
    return low_estimate(cfg, estimate, exact) >= cfg.long.max_model_len


def largest_context(cfg: Config) -> int:
    """max_model_len of the largest pool: the most any request can use."""
    return max(p.max_model_len for p in cfg.pools)


def output_never_fits(max_output: int | None, largest: int) -> bool:
    """True when the request's own output cap alone reaches ``largest``, the
    largest pool's context: no prompt, however short, leaves room for it."""
    return max_output is not None and max_output >= largest


def margin_for(cfg: Config, long_rms: float) -> float:
    """Relative margin added to an estimate before comparing with B_short:
    ``margin_sigmas`` root-mean-square relative errors of long prompts,
    never below ``min_margin``."""
    p = cfg.policy
    return max(p.min_margin, p.margin_sigmas * long_rms)
