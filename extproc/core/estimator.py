"""Prompt-token estimator learned online from vLLM's ``usage.prompt_tokens``.

Model: tokens ~ w . x, where x are the byte-class counts of
``extproc.core.features`` plus the chat-template terms (tokens per message and a
fixed overhead). A bare bytes/token ratio is the special case of one weight;
the intercept and per-message weight learn the template overhead (+10 to +35
tokens for Llama-3, ~+5 per extra turn).

Fitting: exponentially-weighted ridge regression on *relative* error (each
sample is scaled by 1/true_tokens, target 1), so a 100-token prompt and a
100K-token prompt count alike. Fits form a chain, each shrunk toward its
parent instead of toward zero:

    prior (bytes/token) <- any model <- model <- (model, category)

so a new category starts from its model's fit, a new model from what every
model taught, and directions a category never excites (no CJK in a code
category) stay at the parent's value instead of drifting. Ridge toward the
parent also removes the covariance wind-up of classic forgetting-factor RLS.

Uncertainty: per fit, an EMA of |relative error| measured *before* learning
each sample (prequential, so it is an honest out-of-sample error) and the
relative error on prompts over MARGIN_MIN_TOKENS (root mean square, so
outliers weigh in), which the policy turns into its margin.

Pure: no clocks, no I/O; memory is bounded (MAX_MODELS names, fixed categories).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import EstimatorConfig
from .features import CATEGORIES, FEATURE_BYTES, N_FEATURES

ANY_MODEL = "*"

#: Bumped whenever the snapshot layout changes; older snapshots are ignored
#: (with a warning) and the router learns afresh.
SNAPSHOT_VERSION = 2

#: Prior tokens per chat message: Llama-3's turn header
#: ``<|start_header_id|>role<|end_header_id|>\n\n`` plus ``<|eot_id|>`` is 5.
PRIOR_TOKENS_PER_MESSAGE = 5.0

#: Prior fixed tokens per request: ``<|begin_of_text|>`` plus the assistant
#: generation prompt (~5) for Llama-3.0; Llama-3.1's default system header
#: adds ~25 more, which the intercept learns.
PRIOR_TOKENS_PER_REQUEST = 6.0

#: Ridge strength toward the parent fit, in units of "samples": a fit needs
#: about this many samples' worth of evidence to move a weight halfway from
#: its parent. 4 lets a (model, category) follow its own data within a few
#: dozen samples while one odd prompt cannot swing it.
RIDGE_SAMPLES = 4.0

#: Scale of each normalised feature (feature / tokens) in typical text, used
#: so the ridge pulls equally hard on every weight: letters ~3.5 per token in
#: English, CJK characters ~0.7 per token, and the template terms, which are
#: small once divided by the token count.
_FEATURE_SCALE = np.array(
    [3.5, 0.3, 0.5, 0.8, 0.2, 0.2, 0.8, 0.7, 0.7, 0.5, 0.05, 0.02]
)

#: Smallest estimate for a non-empty text, as bytes per token: no BPE
#: vocabulary in use averages more than 16 bytes per token (measured maxima are
#: ~6-8 on long runs of spaces), so this floor only bites on a broken fit.
MAX_BYTES_PER_TOKEN = 16.0

#: Samples' worth of weight the prior error carries in the error averages:
#: the first real samples replace it quickly (after 20 samples it is 10%),
#: but a fit with one lucky sample does not claim to be exact.
PRIOR_ERROR_SAMPLES = 2.0

#: Below this variance of 1/k the samples cannot separate the error of one
#: text from the error of many (all prompts alike): use the plain mean.
ERROR_LINE_MIN_VAR = 1e-4

#: Prompts shorter than this teach the fit but not the margin: relative errors
#: of short texts are large (a 20-token prompt off by 5 tokens is 25%) and
#: irrelevant to routing at B_short >= 4K, while the margin exists for the
#: prompts near B_short. 1,000 tokens is where the issue measures p90 error.
#: The router raises it to half of B_short (see MARGIN_BAND_FRACTION).
MARGIN_MIN_TOKENS = 1000


@dataclass(slots=True)
class Estimate:
    tokens: float          # expected prompt tokens
    rel_error: float       # EMA of |relative error| of this fit
    long_rms: float        # expected RMS relative error of this prompt if it is long
    samples: int           # samples this fit has learned from
    category: str


def _prior_weights(bytes_per_token: float) -> np.ndarray:
    w = np.array(FEATURE_BYTES, dtype=float) / bytes_per_token
    w[10] = PRIOR_TOKENS_PER_MESSAGE
    w[11] = PRIOR_TOKENS_PER_REQUEST
    return w


class Fit:
    """One exponentially-weighted ridge fit, shrunk toward ``parent``."""

    __slots__ = ("parent", "prior", "A", "b", "w", "wt", "version", "solved_at", "samples", "long_n",
                 "abs_err", "lm", "bpt", "_ridge", "margin_min")

    def __init__(self, parent: "Fit | None", prior_w: np.ndarray | None, rel_error: float, ridge: np.ndarray,
                 margin_min_tokens: float = MARGIN_MIN_TOKENS):
        self.parent = parent
        self.prior = prior_w
        self.A = np.zeros((N_FEATURES, N_FEATURES))
        self.b = np.zeros(N_FEATURES)
        self.w = (parent.weights() if parent is not None else prior_w).copy()
        self.wt = tuple(self.w.tolist())
        # Weights are a function of this fit's data and its ancestors'. Each
        # fit counts its updates; the weights are re-solved whenever the sum
        # of the counts along the chain differs from the one they were
        # solved at, so an estimate never depends on when it was asked for.
        self.version = 0
        self.solved_at = -1
        self.samples = 0
        self.abs_err = parent.abs_err if parent is not None else rel_error
        # Squared relative error of long prompts (see MARGIN_MIN_TOKENS) as a
        # function of u = 1/k, k the request's effective number of texts:
        # errors of independent texts partly cancel, so a 12-turn chat is
        # estimated better than one text of the same length. Kept as running
        # moments [E e2, E u, E e2*u, E u^2] of a least-squares line
        # e2 = a + b*u; the prior is one text (u = 1) with the prior error.
        self.lm = list(parent.lm) if parent is not None else [rel_error ** 2, 1.0, rel_error ** 2, 1.0]
        self.long_n = 0
        # EMA of observed bytes per token: for people, not for prediction.
        self.bpt = parent.bpt if parent is not None else 0.0
        self._ridge = ridge
        self.margin_min = parent.margin_min if parent is not None else margin_min_tokens

    def chain_version(self) -> int:
        v, p = self.version, self.parent
        while p is not None:
            v += p.version
            p = p.parent
        return v

    def weights(self) -> np.ndarray:
        cv = self.chain_version()
        if cv != self.solved_at:
            target = self.parent.weights() if self.parent is not None else self.prior
            if self.samples:
                self.w = np.linalg.solve(self.A + self._ridge, self.b + self._ridge @ target)
            else:
                # No data of its own yet: exactly the parent's weights.
                self.w = target.copy()
            self.wt = tuple(self.w.tolist())
            self.solved_at = cv
        return self.w

    def predict(self, x: tuple[float, ...]) -> float:
        self.weights()
        return sum(a * b for a, b in zip(self.wt, x))

    def error_ms(self, k_eff: float = 1.0) -> float:
        """Expected squared relative error of a long prompt made of
        ``k_eff`` effective texts."""
        e2, u, e2u, u2 = self.lm
        var = u2 - u * u
        b = (e2u - e2 * u) / var if var > ERROR_LINE_MIN_VAR else 0.0
        b = max(b, 0.0)
        a = e2 - b * u
        if a < 0.0:
            a, b = 0.0, (e2u / u2 if u2 > 0 else e2)
        return a + b / max(k_eff, 1.0)

    def learn(self, x: np.ndarray, y: float, n_bytes: int, forgetting: float, ema: float,
              k_eff: float = 1.0) -> float:
        """Learn one sample; returns the relative error it had before."""
        pred = self.predict(tuple(x.tolist()))
        rel = (pred - y) / y
        # Running mean over the first 1/ema samples (with the prior counting as
        # PRIOR_ERROR_SAMPLES of them), an EMA after that.
        self.abs_err += max(ema, 1.0 / (self.samples + 1 + PRIOR_ERROR_SAMPLES)) * (abs(rel) - self.abs_err)
        if y >= self.margin_min:
            self.long_n += 1
            wgt = max(ema, 1.0 / (self.long_n + PRIOR_ERROR_SAMPLES))
            u = 1.0 / max(k_eff, 1.0)
            e2 = rel * rel
            for i, v in enumerate((e2, u, e2 * u, u * u)):
                self.lm[i] += wgt * (v - self.lm[i])
        if n_bytes:
            b = n_bytes / y
            self.bpt = b if self.bpt == 0.0 else self.bpt + ema * (b - self.bpt)
        z = x / y
        self.A *= forgetting
        self.b *= forgetting
        self.A += np.outer(z, z)
        self.b += z
        self.samples += 1
        self.version += 1
        return rel


def _finite(name: str, v: Any, low: float = 0.0) -> float:
    v = float(v)
    if not math.isfinite(v) or v < low:
        raise ValueError(f"snapshot holds a bad {name}: {v!r}")
    return v


def _load_fit(f: Fit, d: dict[str, Any]) -> None:
    A = np.asarray(d["A"], dtype=float).reshape(N_FEATURES, N_FEATURES)
    b = np.asarray(d["b"], dtype=float).reshape(N_FEATURES)
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(b))):
        raise ValueError("snapshot holds non-finite numbers")
    f.A, f.b = A, b
    f.samples = int(_finite("samples", d["samples"]))
    f.abs_err = _finite("abs_err", d["abs_err"])
    lm = d["lm"]
    if not isinstance(lm, list) or len(lm) != 4:
        raise ValueError("snapshot holds a bad error model")
    f.lm = [_finite("lm", v) for v in lm]
    f.long_n = int(_finite("long_n", d["long_n"]))
    f.bpt = _finite("bpt", d.get("bpt", 0.0))
    f.version += 1


class Estimator:
    """Per-(model, category) prompt-token estimator with bounded memory."""

    def __init__(self, cfg: EstimatorConfig | None = None, margin_min_tokens: float = MARGIN_MIN_TOKENS):
        self.cfg = cfg or EstimatorConfig()
        self.margin_min_tokens = margin_min_tokens
        scale = _FEATURE_SCALE ** 2 * RIDGE_SAMPLES
        self._ridge = np.diag(scale)
        self._prior = _prior_weights(self.cfg.prior_bytes_per_token)
        self.root = Fit(None, self._prior, self.cfg.prior_rel_error, self._ridge, margin_min_tokens)
        self.models: dict[str, Fit] = {}
        self.fits: dict[tuple[str, str], Fit] = {}

    # --- lookup --------------------------------------------------------------
    def model_key(self, model: str) -> str:
        """The bucket a model name learns in: itself while under MAX_MODELS
        names, else the shared ANY_MODEL bucket (bounded memory)."""
        if model in self.models or len(self.models) < self.cfg.max_models:
            return model
        return ANY_MODEL

    def set_margin_min_tokens(self, tokens: float) -> None:
        """Prompts at least this long set the margin (the router passes half
        of B_short): only their errors can flip a routing decision."""
        self.margin_min_tokens = tokens
        for f in (self.root, *self.models.values(), *self.fits.values()):
            f.margin_min = tokens

    def claim(self, model: str) -> str:
        """The bucket of ``model``, taking a slot for it if one is free."""
        key = self.model_key(model)
        self._model(key)
        return key

    def _fit(self, model: str, category: str, create: bool) -> Fit:
        key = (self.model_key(model), category)
        fit = self.fits.get(key)
        if fit is None:
            mfit = self.models.get(key[0])
            if mfit is None:
                if not create:
                    return self.root
                mfit = Fit(self.root, None, 0.0, self._ridge)
                self.models[key[0]] = mfit
            if not create:
                return mfit
            fit = Fit(mfit, None, 0.0, self._ridge)
            self.fits[key] = fit
        return fit

    # --- the two operations --------------------------------------------------
    def estimate(self, model: str, category: str, x: tuple[float, ...], n_bytes: int,
                 k_eff: float = 1.0) -> Estimate:
        fit = self._fit(model, category, create=False)
        tokens = fit.predict(x)
        floor = max(1.0, n_bytes / MAX_BYTES_PER_TOKEN)
        tokens = max(tokens, floor)
        # Samples of this (model, category) itself: a fallback fit's count
        # would make an unseen category look confident.
        own = self.fits.get((self.model_key(model), category))
        return Estimate(tokens, fit.abs_err, math.sqrt(fit.error_ms(k_eff)), own.samples if own else 0, category)

    def learn(self, model: str, category: str, x: tuple[float, ...], n_bytes: int,
              prompt_tokens: int, k_eff: float = 1.0) -> float | None:
        """Learn from vLLM's count; returns the relative error the estimate
        had (None for an unusable count)."""
        if not isinstance(prompt_tokens, int) or prompt_tokens <= 0:
            return None
        xa = np.asarray(x, dtype=float)
        fit = self._fit(model, category, create=True)
        ema = self.cfg.error_ema_weight
        lam = self.cfg.rls_forgetting
        # Learn in the leaf first so the returned error is the leaf's own.
        y = float(prompt_tokens)
        rel = fit.learn(xa, y, n_bytes, lam, ema, k_eff)
        fit.parent.learn(xa, y, n_bytes, lam, ema, k_eff)
        self.root.learn(xa, y, n_bytes, lam, ema, k_eff)
        return rel

    def confident(self, model: str, category: str) -> bool:
        own = self.fits.get((self.model_key(model), category))
        return own is not None and own.samples >= self.cfg.min_samples_confident

    # --- introspection and persistence ---------------------------------------
    def table(self) -> list[dict[str, Any]]:
        rows = []
        for (model, cat), fit in sorted(self.fits.items()):
            w = fit.weights()
            rows.append({
                "model": model, "category": cat, "samples": fit.samples,
                "bytes_per_token": round(fit.bpt, 3) if fit.bpt else None,
                "tokens_per_message": round(float(w[10]), 2), "overhead": round(float(w[11]), 2),
                "rel_error": round(fit.abs_err, 4), "long_rms": round(math.sqrt(fit.lm[0]), 4),
            })
        return rows

    def snapshot(self) -> dict[str, Any]:
        def dump(f: Fit) -> dict[str, Any]:
            return {"A": f.A.ravel().tolist(), "b": f.b.tolist(), "samples": f.samples,
                    "abs_err": f.abs_err, "lm": list(f.lm), "long_n": f.long_n, "bpt": f.bpt}
        return {
            "version": SNAPSHOT_VERSION,
            "features": N_FEATURES,
            "root": dump(self.root),
            "models": {m: dump(f) for m, f in self.models.items()},
            "fits": [{"model": m, "category": c, **dump(f)} for (m, c), f in self.fits.items()],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Load a snapshot, all or nothing; raises ValueError (leaving this
        estimator unchanged) if it does not fit this build or holds bad numbers."""
        try:
            if snap.get("version") != SNAPSHOT_VERSION or snap.get("features") != N_FEATURES:
                raise ValueError("snapshot from an incompatible version")
            fresh = Estimator(self.cfg, self.margin_min_tokens)
            _load_fit(fresh.root, snap["root"])
            for m, d in snap.get("models", {}).items():
                if fresh.model_key(m) == m:
                    _load_fit(fresh._model(m), d)
            for d in snap.get("fits", []):
                if d.get("category") in CATEGORIES and fresh.model_key(d["model"]) == d["model"]:
                    _load_fit(fresh._fit(d["model"], d["category"], create=True), d)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed snapshot: {e!r}") from None
        self.root, self.models, self.fits = fresh.root, fresh.models, fresh.fits

    def _model(self, m: str) -> Fit:
        fit = self.models.get(m)
        if fit is None:
            fit = self.models[m] = Fit(self.root, None, 0.0, self._ridge)
        return fit
