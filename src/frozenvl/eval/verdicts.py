"""Intervals over seeds and eval items, and the verdicts a benchmark may draw from them.

Pure Python (no torch): the demo (ShapesWorld, tiny or real bases) feeds it per-item scores.

**The interval.** A metric is a mean of per-item scores (VQA accuracy, Acc@0.5, IoU, CIDEr-D,
answer agreement). It varies with the training seed and with the finite eval set, so the 95%
interval of its mean over ``n`` seeds adds both in quadrature::

    half = sqrt( (t[n-1] * s_seeds / sqrt(n))**2 + (t[N-1] * s_items / sqrt(N))**2 )

``s_seeds``: the sample std of the per-seed means; ``s_items``: the sample std over the ``N`` eval
items of each item's score averaged over the seeds; ``t[df]``: Student's 97.5% quantile. With 3
seeds ``t[2] = 4.30``: wide, and honest about how little 3 seeds say (a bootstrap over 3 seeds
would understate it). The item part double-counts a little seed noise, so the interval errs
wide. A paired comparison (A - B on the same items and seeds) uses the same formula on the
per-item differences. Figures that do not depend on a training seed (the base LLM, the majority
baseline) are ``seed_free``: only the item part. The interval is clipped to the score's range
(``Scores.bounds``). For 0/1 scores the item part is the Wald binomial interval, so a figure at
0% or 100% on every item has no item width (its known limit on small eval sets).

**One seed** gives no estimate of seed-to-seed variation: no interval, and every verdict on it is
"not decided" (run several seeds to decide anything).

**Verdicts.** "reproduced" only when the interval supports the claim, "refuted" when it supports
the opposite, "not decided" otherwise. Equal figures are never "reproduced"; neither is a
comparison where both sides lie within the chance (majority) baseline's interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "NOT_DECIDED", "PRESERVED", "REFUTED", "REPRODUCED", "Estimate", "Finding", "Scores", "Verdict",
    "at_least", "beats", "better", "beyond", "estimate", "learns_to_see", "percent", "t_quantile", "text_kept",
]

REPRODUCED, REFUTED, NOT_DECIDED = "reproduced", "refuted", "not decided"

# Student's t, 97.5% quantile, for 1..30 degrees of freedom.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95%) for `df` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile: < 1e-4 off beyond 30 df
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _std(values: Sequence[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class Scores:
    """Per-item scores of one metric: one row per training seed, the same items in the same order.

    `seed_free`: the figure does not depend on a training seed (one row). `bounds`: the range a
    score can take (``(0, 1)`` for accuracies, IoU, agreement); the interval is clipped to it.
    """

    rows: tuple[tuple[float, ...], ...]
    seed_free: bool = False
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.rows or not self.rows[0]:
            raise ValueError("scores need at least one seed and one item")
        n = len(self.rows[0])
        if any(len(r) != n for r in self.rows):
            raise ValueError(f"every seed must score the same items: row lengths {[len(r) for r in self.rows]}")
        if self.seed_free and len(self.rows) != 1:
            raise ValueError(f"seed-free scores have one row, got {len(self.rows)}")
        if not all(math.isfinite(v) for r in self.rows for v in r):
            raise ValueError("scores must be finite numbers")
        if self.bounds is not None:
            lo, hi = self.bounds
            if not lo < hi or any(v < lo or v > hi for r in self.rows for v in r):
                raise ValueError(f"scores must lie within bounds {self.bounds}")

    @classmethod
    def of(cls, rows: Sequence[Sequence[float]], seed_free: bool = False,
           bounds: tuple[float, float] | None = None) -> Scores:
        return cls(tuple(tuple(float(v) for v in r) for r in rows), seed_free,
                   None if bounds is None else (float(bounds[0]), float(bounds[1])))

    @property
    def n_items(self) -> int:
        return len(self.rows[0])

    def minus(self, other: Scores) -> Scores:
        """Paired per-item differences ``self - other`` (a seed-free side is the same on every seed)."""
        if other.n_items != self.n_items:
            raise ValueError(f"a paired difference needs the same items: {self.n_items} vs {other.n_items}")
        a, b = self.rows, other.rows
        if self.seed_free and not other.seed_free:
            a = a * len(b)
        elif other.seed_free and not self.seed_free:
            b = b * len(a)
        elif len(a) != len(b):
            raise ValueError(f"a paired difference needs the same seeds: {len(a)} vs {len(b)}")
        rows = tuple(tuple(x - y for x, y in zip(ra, rb)) for ra, rb in zip(a, b))
        bounds = None
        if self.bounds is not None and other.bounds is not None:
            bounds = (self.bounds[0] - other.bounds[1], self.bounds[1] - other.bounds[0])
        return Scores(rows, self.seed_free and other.seed_free, bounds)


@dataclass(frozen=True)
class Estimate:
    """A metric's mean over seeds, its per-seed values and its 95% interval (None: no interval)."""

    mean: float
    per_seed: tuple[float, ...]
    low: float | None
    high: float | None
    std: float | None = None  # across seeds (None with one seed, or seed-free)
    n_items: int | None = None
    seed_free: bool = False

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    def contains(self, value: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= value <= self.high

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "low": self.low, "high": self.high,
                "per_seed": list(self.per_seed), "n_items": self.n_items, "seed_free": self.seed_free}


def estimate(scores: Scores | Sequence[float]) -> Estimate:
    """The 95% interval of the mean (module docstring). A plain sequence is one value per seed
    with no item scores (e.g. corpus BLEU): the seed part only."""
    if not isinstance(scores, Scores):
        values = [float(v) for v in scores]
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"need one finite value per seed, got {values!r}")
        mean = sum(values) / len(values)
        if len(values) < 2:
            return Estimate(mean, tuple(values), None, None)
        s = _std(values)
        half = t_quantile(len(values) - 1) * s / math.sqrt(len(values))
        return Estimate(mean, tuple(values), mean - half, mean + half, std=s)
    per_seed = tuple(sum(r) / len(r) for r in scores.rows)
    mean = sum(per_seed) / len(per_seed)
    n, n_items = len(per_seed), scores.n_items
    if not scores.seed_free and n < 2:
        return Estimate(mean, per_seed, None, None, n_items=n_items)
    seed_part = 0.0
    std = None
    if not scores.seed_free:
        std = _std(per_seed)
        seed_part = t_quantile(n - 1) * std / math.sqrt(n)
    item_part = 0.0
    if n_items >= 2:
        item_means = [sum(r[i] for r in scores.rows) / n for i in range(n_items)]
        item_part = t_quantile(n_items - 1) * _std(item_means) / math.sqrt(n_items)
    elif scores.seed_free:  # one item and no seeds: nothing to estimate a spread from
        return Estimate(mean, per_seed, None, None, n_items=n_items, seed_free=True)
    half = math.hypot(seed_part, item_part)
    low, high = mean - half, mean + half
    if scores.bounds is not None:  # e.g. no accuracy interval reaches below 0% or above 100%
        low, high = max(low, scores.bounds[0]), min(high, scores.bounds[1])
    return Estimate(mean, per_seed, low, high, std=std, n_items=n_items, seed_free=scores.seed_free)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    details: dict = field(default_factory=dict)


def _no_interval(*ests: Estimate) -> Verdict | None:
    for e in ests:
        if e.low is None:
            why = "one seed" if e.n_seeds < 2 and not e.seed_free else "too few items"
            return Verdict(NOT_DECIDED, f"{why}: no interval")
    return None


def better(a: Estimate, b: Estimate, diff: Estimate, chance: Estimate | None = None) -> Verdict:
    """Claim "A is better than B", given both figures and the interval of the paired difference A - B.

    `chance`: the majority (chance) baseline of this metric; both means inside its interval means
    the comparison is between two chance-level figures, which decides nothing.
    """
    if a.mean == b.mean:
        return Verdict(NOT_DECIDED, "equal figures")
    missing = _no_interval(diff) or (_no_interval(chance) if chance is not None else None)
    if missing:
        return missing
    if chance is not None and chance.contains(a.mean) and chance.contains(b.mean):
        return Verdict(NOT_DECIDED, "both at chance level (within the majority baseline's interval)")
    if diff.low > 0:
        return Verdict(REPRODUCED, "the interval of the difference lies above 0")
    if diff.high < 0:
        return Verdict(REFUTED, "the interval of the difference lies below 0")
    return Verdict(NOT_DECIDED, "the interval of the difference contains 0")


def beyond(a: Estimate, baseline: Estimate) -> Verdict:
    """Claim "A is learned": its interval lies above the baseline's interval (a margin beyond it).
    Refuted when A's whole interval lies at or below the baseline's upper limit."""
    if a.mean == baseline.mean:
        return Verdict(NOT_DECIDED, "equal to the baseline")
    missing = _no_interval(a, baseline)
    if missing:
        return missing
    if a.low > baseline.high:
        return Verdict(REPRODUCED, "the interval lies above the baseline's interval")
    if a.high <= baseline.high:
        return Verdict(REFUTED, "the interval does not reach beyond the baseline's interval")
    return Verdict(NOT_DECIDED, "the interval overlaps the baseline's interval")


def at_least(a: Estimate, threshold: float) -> Verdict:
    """Claim "A >= threshold" (e.g. agreement with the base's answers >= 95%)."""
    missing = _no_interval(a)
    if missing:
        return missing
    if a.low >= threshold:
        return Verdict(REPRODUCED, f"the interval lies at or above {threshold:g}")
    if a.high < threshold:
        return Verdict(REFUTED, f"the interval lies below {threshold:g}")
    return Verdict(NOT_DECIDED, f"the interval contains {threshold:g}")


# ----------------------------------------------------------------------------- findings

PRESERVED = 0.95  # "keeps the text answers": at least this share of the base's answers, unchanged


def percent(e: Estimate | None) -> str:
    """An estimate as a percentage with its 95% interval, e.g. "55.1% [46.3, 63.9]" ("n/a" for None)."""
    if e is None:
        return "n/a"
    if e.low is None:
        return f"{100 * e.mean:.1f}%"
    return f"{100 * e.mean:.1f}% [{100 * e.low:.1f}, {100 * e.high:.1f}]"


@dataclass(frozen=True)
class Finding:
    """One claim, its verdict and the figures it was decided on (95% intervals in `figures`)."""

    claim: str
    verdict: str
    reason: str
    figures: dict[str, dict | None] = field(default_factory=dict)
    text: str = ""  # the figures in words

    def line(self) -> str:
        return f"[{self.verdict}] {self.claim}: {self.text} ({self.reason})"

    def to_dict(self) -> dict:
        return {"claim": self.claim, "verdict": self.verdict, "reason": self.reason, "figures": self.figures,
                "line": self.line()}


def _figs(**ests: Estimate | None) -> dict[str, dict | None]:
    return {k: (e.to_dict() if e is not None else None) for k, e in ests.items()}


def text_kept(name: str, deployed: Scores, own: Scores | None, threshold: float = PRESERVED) -> Finding:
    """"`name` keeps the base's text answers": decided on the workflow's own path (text_fallback
    off), the figure that tells families apart. As deployed, a workflow with text_fallback sends
    image-free prompts to the base, so that figure is 100% by construction; it is shown beside."""
    dep = estimate(deployed)
    own_e = estimate(own) if own is not None else None
    dep_v = at_least(dep, threshold)
    if own_e is None:
        v = Verdict(NOT_DECIDED, "no own-path figure (text_fallback off could not be measured)")
    else:
        v = at_least(own_e, threshold)
    return Finding(f"{name} keeps the base's text answers (>= {100 * threshold:.0f}% identical)", v.verdict,
                   f"own path: {v.reason}; as deployed: {dep_v.verdict}",
                   _figs(deployed=dep, own_path=own_e), f"own path {percent(own_e)}, as deployed {percent(dep)}")


def beats(a_name: str, b_name: str, what: str, a: Scores, b: Scores, chance: Scores | None = None,
          claim: str | None = None) -> Finding:
    """"`a_name` beats `b_name` on `what`" (or `claim`, worded otherwise), decided on the paired
    difference (same items, same seeds)."""
    ea, eb, diff = estimate(a), estimate(b), estimate(a.minus(b))
    ec = estimate(chance) if chance is not None else None
    v = better(ea, eb, diff, ec)
    text = f"{percent(ea)} vs {percent(eb)}, difference {percent(diff)}"
    if ec is not None:
        text += f", chance {percent(ec)}"
    return Finding(claim or f"{a_name} beats {b_name} on {what}", v.verdict, v.reason,
                   _figs(a=ea, b=eb, difference=diff, chance=ec), text)


def learns_to_see(name: str, vqa: Scores, majority: Scores) -> Finding:
    """"`name` learns to see": VQA accuracy beyond the per-type majority baseline's interval."""
    e, m = estimate(vqa), estimate(majority)
    v = beyond(e, m)
    return Finding(f"{name} learns to see (VQA beyond the majority baseline)", v.verdict, v.reason,
                   _figs(vqa=e, majority=m), f"VQA {percent(e)} vs majority {percent(m)}")
