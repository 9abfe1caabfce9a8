"""The router's pure core: estimate -> decide -> learn.

One object holds everything learned (prompt estimator and output budgets) and
the config; the ext_proc state machine, the replay command and the planner all
drive the same three calls, so what is measured offline is what runs online:

    d = router.route(path, body)          # Decision (pool, estimate, ...)
    router.want_sample(d, u)              # watch this response? (u ~ U[0,1))
    router.learn(d, prompt_tokens, completion_tokens)
"""

from __future__ import annotations

from typing import Any

from . import errors
from . import media as M
from . import policy as P
from .content_coding import SUPPORTED as SUPPORTED_CODINGS
from ..config.schema import Config
from .estimator import MARGIN_MIN_TOKENS, Estimator, bounded_model_name
from .features import features
from .load import TierLoad
from .spillover import Spillover
from .threshold import Move, Threshold
from .output_budget import OutputBudget
from .port import StreamSettings
from .request import NotRoutable, parse
from .. import defaults as D

#: Near B_short an estimate error decides the pool, so responses of requests
#: whose padded budget lands within this relative band of B_short are sampled
#: this many times more often: the margin learns fastest where it matters.
NEAR_THRESHOLD_BAND = 0.25
NEAR_THRESHOLD_BOOST = 4.0

#: Errors of prompts at least this share of B_short set the margin: a prompt
#: under half of B_short is routed short whatever its error (outputs rarely
#: take the other half), so only longer prompts' errors can flip a decision,
#: and they are smaller than short prompts' (more text, errors average out).
MARGIN_BAND_FRACTION = 0.5


class Router:
    """Implements ``extproc.core.port.RouterPort``, what the stream machine needs."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stream_settings = StreamSettings.from_config(cfg)
        self.max_context = P.largest_context(cfg)
        self.estimator = Estimator(cfg.estimator, self._margin_min(cfg))
        self.outputs = OutputBudget(cfg.policy.default_output_tokens, cfg.policy.output_quantile,
                                    D.OUTPUT_MIN_SAMPLES)
        self.estimator.on_evict = self.outputs.drop_model
        self.spillover = Spillover.from_config(cfg)
        self.threshold = Threshold.from_config(cfg)
        self.loads: tuple[TierLoad, ...] = tuple(TierLoad(t.name) for t in cfg.tiers)

    @staticmethod
    def _margin_min(cfg: Config) -> float:
        return max(MARGIN_MIN_TOKENS, MARGIN_BAND_FRACTION * cfg.b_short)

    def reconfigure(self, cfg: Config) -> None:
        """Take a new config (e.g. a new B_short) without losing what was learned."""
        self.cfg = cfg
        self.stream_settings = StreamSettings.from_config(cfg)
        self.max_context = P.largest_context(cfg)
        self.estimator.set_margin_min_tokens(self._margin_min(cfg))
        self.outputs.reconfigure(cfg.policy.default_output_tokens, cfg.policy.output_quantile)
        if [t.name for t in cfg.tiers] == [t.name for t in self.loads]:
            # Same tiers: keep what the loop has seen and counted; pins stay.
            self.spillover = self.spillover.reconfigured(cfg)
            self.threshold = self.threshold.reconfigured(cfg)
        else:
            self.loads = tuple(TierLoad(t.name) for t in cfg.tiers)
            self.spillover, self.threshold = Spillover.from_config(cfg), Threshold.from_config(cfg)

    # --- closed loop ---------------------------------------------------------
    def observe(self, loads: tuple[TierLoad, ...], now: float) -> list[Move]:
        """Take the tiers' load as the monitor last saw it (one per tier, in
        order; ``now`` on the same clock as the samples). Updates spillover's
        saturation and, when adaptive, the boundaries; returns their moves."""
        self.loads = tuple(loads)
        self.spillover.observe(self.loads)
        return self.threshold.observe(self.loads, now)

    def pin_limit(self, boundary: int, value: int | None, now: float) -> Move | None:
        """Pin boundary ``boundary`` at ``value`` (None: unpin; the adaptive loop takes over again)."""
        if value is not None:
            limits = list(self.limits())
            limits[boundary] = value
            self.cfg.with_limits(limits)  # validates: raises ConfigError
        return self.threshold.pin(boundary, value, now)

    # --- estimate and decide -------------------------------------------------
    def too_large(self, size: int | None) -> P.Decision:
        return P.Decision(
            pool=self.cfg.long.name, reason=P.R_TOO_LARGE, status=P.STATUS_TOO_LARGE,
            error=errors.body_too_large(size, self.cfg.router.max_body_bytes),
        )

    def not_llm(self, why: str) -> P.Decision:
        return P.Decision(pool=self.cfg.long.name, reason=P.R_NOT_LLM, detail=why)

    def _refuse(self, reason: str, status: int, error: bytes, detail: str = "") -> P.Decision:
        return P.Decision(pool=self.cfg.long.name, reason=reason, detail=detail, status=status, error=error)

    def unsupported_encoding(self, coding: str) -> P.Decision:
        return self._refuse(P.R_ENCODING, P.STATUS_UNSUPPORTED_MEDIA_TYPE,
                            errors.unsupported_content_encoding(coding, SUPPORTED_CODINGS), coding)

    def undecodable(self, coding: str, why: str) -> P.Decision:
        return self._refuse(P.R_BAD_BODY, P.STATUS_BAD_REQUEST, errors.undecodable_body(coding, why), why)

    def decoded_too_large(self) -> P.Decision:
        return self._refuse(P.R_TOO_LARGE, P.STATUS_TOO_LARGE,
                            errors.decoded_body_too_large(self.cfg.router.max_body_bytes), "decoded")

    def route(self, path: str, body: bytes) -> P.Decision:
        cfg = self.cfg
        if len(body) > cfg.router.max_body_bytes:
            return self.too_large(len(body))
        req = parse(path, body)
        if isinstance(req, NotRoutable):
            return self.not_llm(req.reason)
        if P.output_never_fits(req.max_output, self.max_context):
            assert req.max_output is not None
            return self._refuse(P.R_MAX_TOKENS, P.STATUS_BAD_REQUEST, errors.max_tokens_too_large(
                req.max_output_param, req.max_output, self.max_context))
        # The name is the client's: bound it before it keys any table, label or span.
        model = bounded_model_name(req.model)
        if req.exact_prompt_tokens is not None:
            category, vector, n_bytes = "tokens", (), 0
            estimate, margin, rel_error, samples = float(req.exact_prompt_tokens), 0.0, 0.0, 0
        else:
            f = features(req.text, req.n_chars, req.n_messages, req.has_tools)
            category, vector, n_bytes = f.category, f.vector, f.n_bytes
            est = self.estimator.estimate(model, category, vector, n_bytes, req.k_eff)
            estimate, rel_error, samples = est.tokens, est.rel_error, est.samples
            margin = P.margin_for(cfg, est.long_rms)
        media = None
        if req.media:  # images, audio, ...: not text the estimator knows
            media = M.estimate(req.media, M.image_rule(cfg.media, model), cfg.media,
                               cfg.estimator.prior_bytes_per_token)
            estimate += media.tokens
        key = (self.estimator.model_key(model), category)
        output, source = self.outputs.budget(key, req.max_output)
        d = P.Decision(
            pool=cfg.long.name, reason=P.R_LONG, model=model, category=category,
            estimate=int(round(estimate)), output=output, output_source=source, margin=margin,
            rel_error=rel_error, samples=samples, n_bytes=n_bytes, vector=vector,
            capped=req.max_output is not None, stream=req.stream, include_usage=req.include_usage,
            exact=req.exact_prompt_tokens is not None, k_eff=req.k_eff,
        )
        if media is not None:
            d.media_tokens, d.media = media.tokens, media.flags
        if P.surely_too_long(cfg, estimate, d.exact):
            d.reason, d.status = P.R_CONTEXT, P.STATUS_BAD_REQUEST
            d.error = errors.context_length_exceeded(int(P.low_estimate(cfg, estimate, d.exact)),
                                                     cfg.long.max_model_len)
            return d
        j, i = self.place(P.padded_budget(estimate, output, margin))
        d.pool, d.reason = cfg.tiers[i].name, P.reason_for(i, len(cfg.tiers))
        if j != i:
            d.from_pool, d.pool, d.reason = d.pool, cfg.tiers[j].name, P.R_SPILLOVER
        return d

    def place(self, padded: float) -> tuple[int, int]:
        """(tier index, the tier the budget alone chose) for a padded budget:
        the smallest tier whose limit it fits, then spillover. The planner's
        fleet simulator calls this very method (planner.sim.closed_loop)."""
        i = P.tier_for(self.limits(), padded)
        j = self.spillover.target(i) if self.cfg.spillover.enabled else i
        return j, i

    def limits(self) -> tuple[int, ...]:
        """The tier boundaries decisions use now (the configured ones unless
        the adaptive threshold moved them or an operator pinned them)."""
        return tuple(self.threshold.limits)

    # --- learning --------------------------------------------------------------
    def want_sample(self, d: P.Decision, u: float) -> bool:
        """Should the response of this request be watched for usage?
        ``u`` is a uniform draw in [0, 1) (injected: the core has no RNG)."""
        if not d.routable or d.status is not None:
            return False
        if d.exact:
            rate = self.cfg.router.sample_rate
        elif d.samples < self.cfg.estimator.min_samples_confident:
            return True
        else:
            rate = self.cfg.router.sample_rate
            padded = P.padded_budget(d.estimate, d.output, d.margin)
            if any(abs(padded - b) <= NEAR_THRESHOLD_BAND * b for b in self.limits()):
                rate *= NEAR_THRESHOLD_BOOST
        return u < rate

    def near_threshold_short(self, d: P.Decision) -> bool:
        """Routed to a tier below the last with a padded budget within
        NEAR_THRESHOLD_BAND of that tier's limit: the only requests that can
        be harmful misroutes, so the only ones whose response status is worth a look."""
        if not d.routable or d.exact:
            return False
        i = self.cfg.tier_index(d.pool)
        limits = self.limits()
        if i >= len(limits):
            return False
        return P.padded_budget(d.estimate, d.output, d.margin) >= (1 - NEAR_THRESHOLD_BAND) * limits[i]

    def truncation_misroute(self, d: P.Decision, prompt_tokens: int | None,
                            completion_tokens: int | None) -> bool:
        """An answer that vLLM (0.32+) cut short at the context of a tier
        below the last: it ended on "length" (checked by the caller), prompt
        + completion reached that tier's max_model_len, and the request's own
        cap, if any, was larger than what it got. Older vLLM refused such a
        request with a 400; now it silently clips max_tokens to
        max_model_len - prompt, so this is what a harmful misroute looks like.
        (The last tier has nowhere larger to send it: not a misroute.)"""
        if prompt_tokens is None or completion_tokens is None:
            return False
        i = self.cfg.tier_index(d.pool)
        if i == len(self.cfg.tiers) - 1:
            return False
        if prompt_tokens + completion_tokens < self.cfg.tiers[i].max_model_len:
            return False
        return not (d.capped and d.output <= completion_tokens)

    def learn(self, d: P.Decision, prompt_tokens: Any, completion_tokens: Any) -> float | None:
        """Learn from a response's usage; returns the estimate's relative error."""
        rel = None
        # usage.prompt_tokens of a request with images (audio, ...) counts
        # their tokens too: it says nothing about the text's bytes per token.
        if d.vector and not d.media and isinstance(prompt_tokens, int) and not isinstance(prompt_tokens, bool):
            rel = self.estimator.learn(d.model, d.category, d.vector, d.n_bytes, prompt_tokens, d.k_eff)
        if d.routable and isinstance(completion_tokens, int) and not isinstance(completion_tokens, bool):
            key = (self.estimator.claim(d.model), d.category)
            self.outputs.learn(key, completion_tokens, d.capped)
        return rel

    # --- persistence -------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"estimator": self.estimator.snapshot(), "outputs": self.outputs.snapshot()}

    def restore(self, snap: dict[str, Any]) -> list[str]:
        """Load a snapshot; returns the parts dropped (a bad fit or sketch
        costs only itself; the caller logs them). ValueError, this router
        unchanged, if the estimator's root or layout is unusable."""
        fresh = Router(self.cfg)
        try:
            if not isinstance(snap, dict):
                raise ValueError("not a JSON object")
            dropped = fresh.estimator.restore(snap["estimator"])
            dropped += fresh.outputs.restore(snap.get("outputs", []),
                                             lambda key: fresh.estimator.model_key(key[0]) == key[0])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed snapshot: {e!r}") from None
        self.estimator, self.outputs = fresh.estimator, fresh.outputs
        self.estimator.on_evict = self.outputs.drop_model
        return dropped

    def samples(self) -> int:
        """Responses learned from in all (the estimator's root fit)."""
        return self.estimator.root.samples
