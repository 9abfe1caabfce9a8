"""Which design to run: the cheapest that meets the targets, a split only
when its saving is larger than the noise of the sizing."""
from __future__ import annotations

from dataclasses import dataclass

from .bisect import SIZE_TOLERANCE
from .design import Judged


@dataclass(frozen=True)
class ClosedFormNote:
    """The closed form beside the simulated verdict, from the best split
    (the cheapest meeting one, else the cheapest)."""

    alpha: float | None = None
    rho: float | None = None
    predicted: float | None = None
    b_short: int | None = None


@dataclass(frozen=True)
class Recommendation:
    design: Judged | None  # None: no design meets the targets
    closed_form: ClosedFormNote
    margin: float | None  # split saving beyond seed spread + tolerance (None: no comparison)
    why: str
    #: the cheapest meeting single pool (under the run's balancer; the oracle
    #: is never a baseline) and the recommended design's saving against it
    best_single_pool: Judged | None = None
    saving_vs_best_single_pool: float | None = None


def _closed_form(designs: list[Judged], best_s: Judged | None) -> ClosedFormNote:
    src = best_s or min((d for d in designs if d.kind == "split"), key=lambda d: d.usd_per_hour, default=None)
    if src is None:
        return ClosedFormNote()
    return ClosedFormNote(src.design.alpha, src.design.rho, src.design.closed_form, src.design.b_short)


def split_noise(split_spread_gpus: int, single_spread_gpus: int, single_gpus: int) -> float:
    """The saving a split must exceed over a single pool to be recommended:
    both designs' seed spreads relative to the single pool, plus twice the
    search tolerance (each count is only known within it)."""
    return (split_spread_gpus + single_spread_gpus) / max(single_gpus, 1) + 2 * SIZE_TOLERANCE


def _split_or_not(best_s: Judged, best_h: Judged) -> tuple[Judged, float, str]:
    """Both a split and a single pool meet: the split only above the noise."""
    saving = 1.0 - best_s.usd_per_hour / best_h.usd_per_hour
    noise = split_noise(best_s.seed_spread_gpus, best_h.seed_spread_gpus, best_h.gpus)
    margin = saving - noise
    if margin > 0:
        return best_s, margin, (f"{best_s.name} costs {saving:.1%} less than the best single pool "
                                f"({best_h.name}) at equal per-class SLOs, {margin:.1%} above seed spread "
                                f"+ search tolerance ({noise:.1%})")
    if saving <= 0:
        more = "as much as" if abs(saving) < 5e-4 else f"{-saving:.1%} more than"
        return best_h, margin, (f"the best split ({best_s.name}) costs {more} {best_h.name} "
                                f"at equal per-class SLOs: keep one pool")
    return best_h, margin, (f"the best split ({best_s.name}) saves {saving:.1%} over {best_h.name}, within "
                            f"seed spread + search tolerance ({noise:.1%}): keep one pool")


def recommend(designs: list[Judged]) -> Recommendation:
    """The cheapest design meeting the (effective) targets; a split only when it
    beats the best homogeneous design by more than seed spread + tolerance.
    designs[0] is the baseline. With a final horizon (`horizon.hold`) only
    designs that hold on it count."""
    good = [d for d in designs if d.recommendable]
    best_h = min((d for d in good if d.kind == "homogeneous"), key=lambda d: d.usd_per_hour, default=None)
    best_s = min((d for d in good if d.kind == "split"), key=lambda d: (d.usd_per_hour, d.preempt_per_1k),
                 default=None)
    closed = _closed_form(designs, best_s)
    if best_h is None and best_s is None:
        return Recommendation(None, closed, None, "no design meets the per-class targets within the search bounds")
    if best_s is not None and best_h is not None:
        d, margin, why = _split_or_not(best_s, best_h)
    elif best_h is not None:
        d, margin = best_h, None
        why = f"no split meets the per-class targets; {best_h.name} is the cheapest that does"
    else:
        d, margin = best_s, None
        why = f"only splits meet the per-class targets; {best_s.name} is the cheapest"
    base = designs[0]
    if base.name == "baseline" and not base.meets_effective:
        why += "; note: the baseline as pinned misses the per-class targets"
    saving = 1.0 - d.usd_per_hour / best_h.usd_per_hour if best_h is not None and best_h.usd_per_hour > 0 else None
    return Recommendation(d, closed, margin, why, best_h, saving)
