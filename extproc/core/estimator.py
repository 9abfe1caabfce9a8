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

import hashlib
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config.schema import EstimatorConfig
from ..defaults import MAX_MODEL_NAME_CHARS
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


# --- Plausibility of a snapshot (physical bounds) ------------------------------
# A snapshot replaces what the router has learned, so one from a file or the
# admin API must describe a tokenizer that can exist. A fit's weights are
# tokens per unit of each feature; the bounds are far outside anything
# learned from real text and far inside what a poisoned fit needs to break
# routing (the root fit A=0, b=1e6 estimates "hello there" at 725M tokens).

#: Tokens per text-feature unit (a letter, a digit, a space run's space, a CJK
#: character...). A unit is at most 3 UTF-8 bytes and a byte-level BPE token
#: covers at least one byte, so a real weight is within [-3, 3] (overlay
#: features such as "upper" or "indents" adjust their base feature and may
#: be negative); 4 leaves room for the regression's noise.
MAX_TOKENS_PER_UNIT = 4.0

#: Chat-template tokens per message and per request: Llama-3.1's default system
#: header is ~25 tokens, the largest templates (tool schemas rendered in the
#: system turn) a few hundred; 4,096 is a whole short context of template.
MAX_TEMPLATE_TOKENS = 4096.0

#: Error averages are relative errors: 100 (10,000%) is far above a prior that
#: is wrong by a factor of 4 on every sample, and bounds the margin a
#: snapshot can impose.
MAX_REL_ERROR = 100.0

#: Text tokens per text byte at most: a byte-level BPE (or byte-fallback
#: SentencePiece) spends at most one token per byte, so a prompt of n text
#: bytes and m messages counts at most n + MAX_TEMPLATE_TOKENS * (m + 1)
#: tokens. (Observed bytes per *prompt* token, template included, has no
#: useful floor: "hi" through a chat template is 2 bytes in 11 tokens.)
MAX_TOKENS_PER_BYTE = 1.0

#: Sample counters are integers a float can hold exactly (2^53): a router
#: learning 10^5 samples/s for a century stays below 2^49.
MAX_SAMPLES = 2 ** 53


#: Bytes of snapshot JSON per (model, category) fit, with its model's share
#: and its output-length sketch: ~1.6 KB measured (a fit is 156 floats; 208 KB
#: for 66 models in tests/test_identity_bounds.py); 4 KiB leaves room for
#: longer float reprs and 128-character names.
SNAPSHOT_BYTES_PER_FIT = 4096

#: Smallest bound on a snapshot's size, whatever the table: gRPC's 4 MiB
#: default message limit times four.
MIN_SNAPSHOT_BOUND_BYTES = 16 * 1024 * 1024


def snapshot_bound_bytes(max_models: int) -> int:
    """Largest snapshot a table of ``max_models`` names can write (with the
    shared bucket, every category and a model fit each): what readers of
    state files and admin messages accept, never less than
    MIN_SNAPSHOT_BOUND_BYTES."""
    fits = (max_models + 1) * (1 + len(CATEGORIES))
    return max(MIN_SNAPSHOT_BOUND_BYTES, fits * SNAPSHOT_BYTES_PER_FIT)


def bounded_model_name(name: str) -> str:
    """``name`` itself up to MAX_MODEL_NAME_CHARS characters; a longer one is
    cut and suffixed with a hash of the whole name (distinct names stay
    distinct, a 1 MiB name costs MAX_MODEL_NAME_CHARS)."""
    if len(name) <= MAX_MODEL_NAME_CHARS:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return name[:MAX_MODEL_NAME_CHARS - 17] + "#" + digest


@dataclass(slots=True)
class Estimate:
    tokens: float          # expected prompt tokens
    rel_error: float       # EMA of |relative error| of this fit
    long_rms: float        # expected RMS relative error of this prompt if it is long
    samples: int           # samples this fit has learned from
    category: str


_FEATURE_BYTES = np.array(FEATURE_BYTES, dtype=float)


def _prior_weights(bytes_per_token: float) -> np.ndarray:
    w = np.array(FEATURE_BYTES, dtype=float) / bytes_per_token
    w[10] = PRIOR_TOKENS_PER_MESSAGE
    w[11] = PRIOR_TOKENS_PER_REQUEST
    return w


class Fit:
    """One exponentially-weighted ridge fit, shrunk toward ``parent``."""

    __slots__ = ("parent", "prior", "A", "b", "w", "wt", "version", "solved_at", "samples", "long_n",
                 "abs_err", "lm", "_ridge", "margin_min")

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
        # (map in C: the same products summed in the same order as a generator)
        return sum(map(operator.mul, self.wt, x))

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

    def bytes_per_token(self) -> float | None:
        """The fitted text bytes per text token over this fit's own
        (decayed) data: b holds sum(x/y), so FEATURE_BYTES . b is the data's
        bytes and w . b over the text features the tokens the fit gives that
        text, both per prompt token. Template tokens are left out, so a
        tiny chat does not drag it down ("hi" is 2 bytes of 11 tokens).
        None without data of its own."""
        if not self.samples:
            return None
        text_bytes = float(_FEATURE_BYTES @ self.b)
        text_tokens = float(self.weights()[:10] @ self.b[:10])
        if text_bytes <= 0.0 or text_tokens <= 0.0:
            return None
        return text_bytes / text_tokens

    def state(self) -> tuple:
        """What ``learn`` changes, to take a sample back (``set_state``).
        ``learn`` replaces A, b and lm rather than writing into them, so the
        state holds the arrays themselves, not copies (a sample's learning
        is on the router's hot path: issue 19)."""
        return self.A, self.b, self.samples, self.long_n, self.abs_err, self.lm

    def set_state(self, st: tuple) -> None:
        self.A, self.b, self.samples, self.long_n, self.abs_err, self.lm = st
        # A new version (never an old one): weights solved from the
        # taken-back state anywhere down the chain are solved again.
        self.version += 1

    def learn(self, x: np.ndarray, y: float, n_bytes: int, forgetting: float, ema: float,
              k_eff: float = 1.0, xt: tuple[float, ...] | None = None) -> float:
        """Learn one sample; returns the relative error it had before.
        ``xt`` is ``x`` as a tuple when the caller has it. A, b and lm are
        replaced, never written into (``state`` keeps the old ones)."""
        pred = self.predict(tuple(x.tolist()) if xt is None else xt)
        rel = (pred - y) / y
        # Running mean over the first 1/ema samples (with the prior counting as
        # PRIOR_ERROR_SAMPLES of them), an EMA after that.
        self.abs_err += max(ema, 1.0 / (self.samples + 1 + PRIOR_ERROR_SAMPLES)) * (abs(rel) - self.abs_err)
        if y >= self.margin_min:
            self.long_n += 1
            wgt = max(ema, 1.0 / (self.long_n + PRIOR_ERROR_SAMPLES))
            u = 1.0 / max(k_eff, 1.0)
            e2 = rel * rel
            self.lm = [m + wgt * (v - m) for m, v in zip(self.lm, (e2, u, e2 * u, u * u))]
        z = x / y
        A = self.A * forgetting
        A += z[:, None] * z  # np.outer(z, z), without its Python wrapper
        self.A = A
        b = self.b * forgetting
        b += z
        self.b = b
        self.samples += 1
        self.version += 1
        return rel


def _finite(name: str, v: Any, low: float = 0.0, high: float = math.inf) -> float:
    v = float(v)
    if not math.isfinite(v) or v < low or v > high:
        raise ValueError(f"snapshot holds an implausible {name}: {v!r} (expected {low:g} to {high:g})")
    return v


# --- The one plausibility rule ---------------------------------------------------
# ``plausible_sample`` says which exchanges ``learn`` takes, ``_check_fit``
# which fits can exist. ``learn`` runs ``_check_fit`` on every fit a sample
# touched and takes the sample back if one fails, and ``restore`` runs the
# same ``_check_fit``: whatever learning produced, a restore accepts
# (tests/core/test_estimator.py checks it as a property over random exchanges).

def plausible_sample(n_bytes: int, n_messages: float, prompt_tokens: int) -> bool:
    """Can a tokenizer count ``prompt_tokens`` for ``n_bytes`` text bytes in
    ``n_messages`` messages? At most MAX_BYTES_PER_TOKEN bytes per token and
    at most MAX_TOKENS_PER_BYTE tokens per byte plus MAX_TEMPLATE_TOKENS per
    message and per request. Anything else is not this text's count (a
    multimodal placeholder, a proxy that rewrote usage): not learned."""
    if prompt_tokens <= 0 or prompt_tokens * MAX_BYTES_PER_TOKEN < n_bytes:
        return False
    return prompt_tokens <= MAX_TOKENS_PER_BYTE * n_bytes + MAX_TEMPLATE_TOKENS * (max(n_messages, 0.0) + 1.0)


def _check_fit(where: str, f: Fit, parent_samples: int | None) -> None:
    """Raise ValueError unless ``f`` (its parents already checked)
    describes a tokenizer that can exist (see MAX_TOKENS_PER_UNIT) with
    error averages and counters in range."""
    if not 0 <= f.samples <= MAX_SAMPLES:
        raise ValueError(f"{where}: implausible samples {f.samples!r}")
    if parent_samples is not None and f.samples > parent_samples:
        raise ValueError(f"{where}: {f.samples} samples, more than its parent's {parent_samples}")
    if not 0 <= f.long_n <= f.samples:
        raise ValueError(f"{where}: {f.long_n} long-prompt samples, more than its {f.samples} samples")
    if not 0.0 <= f.abs_err <= MAX_REL_ERROR:
        raise ValueError(f"{where}: implausible abs_err {f.abs_err!r} (expected 0 to {MAX_REL_ERROR:g})")
    # [E e2, E u, E e2*u, E u^2]: u = 1/k is in (0, 1].
    for v, high in zip(f.lm, (MAX_REL_ERROR ** 2, 1.0, MAX_REL_ERROR ** 2, 1.0)):
        if not 0.0 <= v <= high:
            raise ValueError(f"{where}: implausible error moment {v!r} (expected 0 to {high:g})")
    # (Python floats, not numpy reductions: each np.any costs ~4 us of
    # wrapper on a 12-vector, and learn runs this on three fits per sample.)
    if min(f.A.diagonal().tolist()) < 0:
        raise ValueError(f"{where}: a negative sum of squares")
    try:
        f.weights()
    except np.linalg.LinAlgError:
        raise ValueError(f"{where}: the fit cannot be solved") from None
    w = f.wt
    if not all(map(math.isfinite, w)):
        raise ValueError(f"{where}: non-finite weights")
    text = max(map(abs, w[:10]))
    if text > MAX_TOKENS_PER_UNIT:
        raise ValueError(f"{where}: implausible tokens per character {text:.4g} (bound {MAX_TOKENS_PER_UNIT:g})")
    template = max(map(abs, w[10:]))
    if template > MAX_TEMPLATE_TOKENS:
        raise ValueError(f"{where}: implausible template tokens {template:.4g} (bound {MAX_TEMPLATE_TOKENS:g})")


def _load_fit(f: Fit, d: dict[str, Any]) -> None:
    """Parse one fit's numbers (shape and finiteness; ``_check_fit`` judges
    them). A "bpt" key of older snapshots (an EMA of observed bytes per
    prompt token, shown to people only) is ignored."""
    try:
        A = np.asarray(d["A"], dtype=float).reshape(N_FEATURES, N_FEATURES)
        b = np.asarray(d["b"], dtype=float).reshape(N_FEATURES)
        lm = d["lm"]
        if not isinstance(lm, list) or len(lm) != 4:
            raise ValueError("snapshot holds a bad error model")
        f.lm = [_finite("error moment", v, low=-math.inf) for v in lm]
        f.samples = int(_finite("samples", d["samples"], low=-math.inf))
        f.abs_err = _finite("abs_err", d["abs_err"], low=-math.inf)
        f.long_n = int(_finite("long_n", d["long_n"], low=-math.inf))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed fit: {e!r}") from None
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(b))):
        raise ValueError("snapshot holds non-finite numbers")
    f.A, f.b = A, b
    f.version += 1


def _name_ok(m: Any) -> bool:
    return isinstance(m, str) and len(m) <= MAX_MODEL_NAME_CHARS


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
        # Logical clock of the model table: root.samples when each name last
        # learned (or claimed a slot), so the least recently learned name can
        # give up its slot once it is idle (cfg.model_idle_samples).
        self.seen: dict[str, int] = {}
        #: Called with a model name the table dropped (the router drops the
        #: name's output budgets with it).
        self.on_evict: Any = None
        #: Counts ``learn`` did not take (see ``plausible_sample``).
        self.refused_samples = 0

    # --- lookup --------------------------------------------------------------
    def model_key(self, model: str) -> str:
        """The bucket a model name learns in: itself while under MAX_MODELS
        names, else the shared ANY_MODEL bucket (bounded memory)."""
        # self.seen holds exactly the named models (not ANY_MODEL).
        if model in self.models or len(self.seen) < self.cfg.max_models:
            return model
        return ANY_MODEL

    def set_margin_min_tokens(self, tokens: float) -> None:
        """Prompts at least this long set the margin (the router passes half
        of B_short): only their errors can flip a routing decision."""
        self.margin_min_tokens = tokens
        for f in (self.root, *self.models.values(), *self.fits.values()):
            f.margin_min = tokens

    def claim(self, model: str) -> str:
        """The bucket of ``model``, taking a slot for it if one is free (or
        idle long enough to be taken back)."""
        key = self._slot(model)
        self._model(key)
        return key

    def _slot(self, model: str) -> str:
        """``model_key`` for learning: marks the name as seen now and, with
        the table full, evicts the least recently learned name if it has been
        idle for cfg.model_idle_samples samples."""
        key = self.model_key(model)
        if key == ANY_MODEL and model != ANY_MODEL and self.seen:
            now = self.root.samples
            lru = min(self.seen, key=self.seen.__getitem__)
            if now - self.seen[lru] >= self.cfg.model_idle_samples:
                self.evict(lru)
                key = model
        if key != ANY_MODEL:
            self.seen[key] = self.root.samples
        return key

    def evict(self, model: str) -> None:
        """Forget everything learned for ``model``; its slot is free."""
        self.models.pop(model, None)
        self.seen.pop(model, None)
        for cat in CATEGORIES:
            self.fits.pop((model, cat), None)
        if self.on_evict is not None:
            self.on_evict(model)

    def _fit(self, model: str, category: str, create: bool) -> Fit:
        key = (self._slot(model) if create else self.model_key(model), category)
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
        had (None for a count it does not take: not a positive integer, not
        ``plausible_sample``, or one that would leave a fit ``_check_fit``
        refuses, which is then taken back: learning never writes what a
        restore would refuse)."""
        if not isinstance(prompt_tokens, int) or prompt_tokens <= 0:
            return None
        if not plausible_sample(n_bytes, x[10] if len(x) > 10 else 0.0, prompt_tokens):
            self.refused_samples += 1
            return None
        xt = tuple(map(float, x))
        xa = np.array(xt)
        fit = self._fit(model, category, create=True)
        chain = (fit, fit.parent, self.root)
        before = [f.state() for f in chain]
        ema = self.cfg.error_ema_weight
        lam = self.cfg.rls_forgetting
        # Learn in the leaf first so the returned error is the leaf's own.
        y = float(prompt_tokens)
        rel = fit.learn(xa, y, n_bytes, lam, ema, k_eff, xt)
        fit.parent.learn(xa, y, n_bytes, lam, ema, k_eff, xt)
        self.root.learn(xa, y, n_bytes, lam, ema, k_eff, xt)
        try:
            _check_fit("root fit", self.root, None)
            _check_fit("model fit", fit.parent, self.root.samples)
            _check_fit("category fit", fit, fit.parent.samples)
        except ValueError:
            for f, st in zip(chain, before):
                f.set_state(st)
            self.refused_samples += 1
            return None
        return rel
    def confident(self, model: str, category: str) -> bool:
        own = self.fits.get((self.model_key(model), category))
        return own is not None and own.samples >= self.cfg.min_samples_confident

    # --- introspection and persistence ---------------------------------------
    def table(self) -> list[dict[str, Any]]:
        rows = []
        for (model, cat), fit in sorted(self.fits.items()):
            w = fit.weights()
            bpt = fit.bytes_per_token()
            rows.append({
                "model": model, "category": cat, "samples": fit.samples,
                "bytes_per_token": None if bpt is None else round(bpt, 3),
                "tokens_per_message": round(float(w[10]), 2), "overhead": round(float(w[11]), 2),
                "rel_error": round(fit.abs_err, 4), "long_rms": round(math.sqrt(fit.lm[0]), 4),
            })
        return rows

    def snapshot(self) -> dict[str, Any]:
        def dump(f: Fit) -> dict[str, Any]:
            return {"A": f.A.ravel().tolist(), "b": f.b.tolist(), "samples": f.samples,
                    "abs_err": f.abs_err, "lm": list(f.lm), "long_n": f.long_n}
        return {
            "version": SNAPSHOT_VERSION,
            "features": N_FEATURES,
            "root": dump(self.root),
            "models": {m: {**dump(f), "seen": self.seen.get(m, 0)} for m, f in self.models.items()},
            "fits": [{"model": m, "category": c, **dump(f)} for (m, c), f in self.fits.items()],
        }

    def restore(self, snap: dict[str, Any]) -> list[str]:
        """Load a snapshot; returns what was dropped, one line each. A bad
        model fit costs that model (its category fits hang off it), a bad
        category fit only itself; a snapshot of another version, a bad root
        fit (every other fit hangs off it) or a malformed layout raises
        ValueError, leaving this estimator unchanged. Every fit passes the
        ``_check_fit`` that ``learn`` keeps to."""
        dropped: list[str] = []
        try:
            if snap.get("version") != SNAPSHOT_VERSION or snap.get("features") != N_FEATURES:
                raise ValueError("snapshot from an incompatible version")
            fresh = Estimator(self.cfg, self.margin_min_tokens)
            _load_fit(fresh.root, snap["root"])
            _check_fit("root fit", fresh.root, None)
            now = fresh.root.samples
            models = snap.get("models", {})
            if not isinstance(models, dict):
                raise ValueError("snapshot's models are not an object")
            for m, d in models.items():
                if not _name_ok(m):
                    dropped.append(f"a model name that is not a string of at most {MAX_MODEL_NAME_CHARS} characters")
                    continue
                if fresh.model_key(m) != m:
                    continue  # over this config's max_models: learned afresh in the shared bucket
                try:
                    f = Fit(fresh.root, None, 0.0, fresh._ridge)
                    _load_fit(f, d)
                    _check_fit(f"fit of model {m!r}", f, now)
                    seen = int(_finite("seen", d.get("seen", now), high=now))
                except (ValueError, TypeError, AttributeError) as e:
                    dropped.append(f"model {m!r} and its categories: {e}")
                    continue
                fresh.models[m] = f
                if m != ANY_MODEL:
                    fresh.seen[m] = seen
            fits = snap.get("fits", [])
            if not isinstance(fits, list):
                raise ValueError("snapshot's fits are not a list")
            for d in fits:
                try:
                    m, c = d["model"], d["category"]
                except (KeyError, TypeError) as e:
                    dropped.append(f"a malformed category fit: {e!r}")
                    continue
                if not _name_ok(m) or c not in CATEGORIES or m not in fresh.models:
                    continue
                try:
                    f = Fit(fresh.models[m], None, 0.0, fresh._ridge)
                    _load_fit(f, d)
                    _check_fit(f"fit of ({m!r}, {c})", f, f.parent.samples)
                except ValueError as e:
                    dropped.append(f"({m!r}, {c}): {e}")
                    continue
                fresh.fits[(m, c)] = f
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed snapshot: {e!r}") from None
        self.root, self.models, self.fits, self.seen = fresh.root, fresh.models, fresh.fits, fresh.seen
        return dropped

    def check_plausible(self) -> None:
        """Raise ValueError unless every fit passes ``_check_fit`` (the
        physical bounds, and sample counts that nest: a model's fit has
        learned at most what every model learned, a category at most what
        its model did)."""
        _check_fit("root fit", self.root, None)
        for m, f in self.models.items():
            _check_fit(f"fit of model {m!r}", f, self.root.samples)
        for (m, c), f in self.fits.items():
            _check_fit(f"fit of ({m!r}, {c})", f, f.parent.samples)

    def _model(self, m: str) -> Fit:
        if m != ANY_MODEL:
            self.seen.setdefault(m, self.root.samples)
        fit = self.models.get(m)
        if fit is None:
            fit = self.models[m] = Fit(self.root, None, 0.0, self._ridge)
        return fit
