"""Intervals and verdicts: every branch, including equal, chance-level and one-seed figures."""

from __future__ import annotations

import math

import pytest

from frozenvl.eval.verdicts import (
    NOT_DECIDED,
    REFUTED,
    REPRODUCED,
    Scores,
    at_least,
    better,
    beyond,
    estimate,
    t_quantile,
)


def test_t_quantile_table_and_tail():
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(60) == pytest.approx(2.0003, abs=1e-3)  # the expansion beyond the table
    assert t_quantile(10**6) == pytest.approx(1.95997, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0)


def test_estimate_over_seeds_only():
    e = estimate([0.4, 0.5, 0.6])
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert e.mean == pytest.approx(0.5) and e.std == pytest.approx(0.1)
    assert (e.low, e.high) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert estimate([0.7]).low is None  # one seed: no interval


def test_estimate_adds_seed_and_item_noise():
    rows = [[1, 0, 1, 1], [1, 0, 0, 1], [1, 1, 0, 1]]
    e = estimate(Scores.of(rows))
    per_seed = [0.75, 0.5, 0.75]
    item_means = [1, 1 / 3, 1 / 3, 1]
    s_seed = math.sqrt(sum((v - sum(per_seed) / 3) ** 2 for v in per_seed) / 2)
    m = sum(item_means) / 4
    s_item = math.sqrt(sum((v - m) ** 2 for v in item_means) / 3)
    half = math.hypot(4.3027 * s_seed / math.sqrt(3), 3.1824 * s_item / 2)
    assert e.per_seed == pytest.approx(per_seed) and e.n_items == 4
    assert e.high - e.mean == pytest.approx(half) and e.mean - e.low == pytest.approx(half)
    # identical seeds still carry the finite eval set's noise
    same = estimate(Scores.of([[1, 0, 1, 1]] * 3))
    assert same.std == 0 and same.high - same.low > 0.5


def test_one_seed_has_no_interval_unless_seed_free():
    assert estimate(Scores.of([[1, 0, 1]])).low is None
    free = estimate(Scores.of([[1, 0, 1]], seed_free=True))
    assert free.low is not None and free.low < free.mean < free.high and free.std is None


def test_scores_validation():
    with pytest.raises(ValueError, match="same items"):
        Scores.of([[1, 0], [1]])
    with pytest.raises(ValueError, match="finite"):
        Scores.of([[1, float("nan")]])
    with pytest.raises(ValueError, match="same items"):
        Scores.of([[1, 0]]).minus(Scores.of([[1, 0, 1]]))
    with pytest.raises(ValueError, match="same seeds"):
        Scores.of([[1, 0]] * 2).minus(Scores.of([[1, 0]] * 3))


def _pair(a_rows, b_rows, b_free=False):
    a, b = Scores.of(a_rows), Scores.of(b_rows, seed_free=b_free)
    return estimate(a), estimate(b), estimate(a.minus(b))


GOOD = [[1] * 18 + [0] * 2, [1] * 17 + [0] * 3, [1] * 19 + [0] * 1]
POOR = [[1] * 4 + [0] * 16, [1] * 5 + [0] * 15, [1] * 3 + [0] * 17]


def test_better_reproduced_and_refuted():
    assert better(*_pair(GOOD, POOR)).verdict == REPRODUCED
    v = better(*_pair(POOR, GOOD))
    assert v.verdict == REFUTED and "below 0" in v.reason


def test_better_not_decided_when_the_difference_straddles_zero():
    a = [[1, 0] * 10, [0, 1] * 10, [1, 1] + [1, 0] * 9]
    b = [[0, 1] * 10, [1, 0] * 10, [1, 0] * 10]
    assert better(*_pair(a, b)).verdict == NOT_DECIDED


def test_equal_figures_are_never_reproduced():
    # equal means, even with zero-width seed noise
    v = better(*_pair(GOOD, GOOD))
    assert v.verdict == NOT_DECIDED and v.reason == "equal figures"
    zeros = [[0] * 10] * 3
    assert better(*_pair(zeros, zeros)).verdict == NOT_DECIDED  # 0.0% vs 0.0%
    e = estimate(Scores.of(GOOD))
    assert beyond(e, e).verdict == NOT_DECIDED


def test_chance_level_comparison_is_never_reproduced():
    # A is reliably a bit above B on every seed and item, yet both sit inside the majority's interval
    a = [[1] * 88 + [0] * 112] * 3
    b = [[1] * 80 + [0] * 120] * 3
    ea, eb, diff = _pair(a, b)
    assert diff.low > 0  # the difference alone would say "reproduced"
    chance = estimate(Scores.of([[1] * 80 + [0] * 120], seed_free=True))
    v = better(ea, eb, diff, chance=chance)
    assert v.verdict == NOT_DECIDED and "chance" in v.reason
    # one side beyond the chance interval: decided by the difference again
    good = [[1] * 150 + [0] * 50] * 3
    assert better(*_pair(good, b), chance=chance).verdict == REPRODUCED


def test_one_seed_is_never_decided():
    ea, eb, diff = _pair(GOOD[:1], POOR[:1])
    v = better(ea, eb, diff)
    assert v.verdict == NOT_DECIDED and "one seed" in v.reason
    base = estimate(Scores.of(POOR[:1], seed_free=True))
    assert beyond(ea, base).verdict == NOT_DECIDED
    assert at_least(estimate(Scores.of([[1] * 20])), 0.95).verdict == NOT_DECIDED


def test_beyond_the_majority_baseline():
    majority = estimate(Scores.of([[1] * 8 + [0] * 12], seed_free=True))
    assert beyond(estimate(Scores.of(GOOD)), majority).verdict == REPRODUCED
    assert beyond(estimate(Scores.of(POOR)), majority).verdict == REFUTED
    near = estimate(Scores.of([[1] * 12 + [0] * 8] * 3))  # above the majority, inside its reach
    assert near.mean > majority.mean
    assert beyond(near, majority).verdict == NOT_DECIDED


def test_at_least_threshold():
    assert at_least(estimate(Scores.of([[1] * 30] * 3)), 0.95).verdict == REPRODUCED
    assert at_least(estimate(Scores.of([[1] * 15 + [0] * 15] * 3)), 0.95).verdict == REFUTED
    v = at_least(estimate(Scores.of([[1] * 29 + [0]] * 3)), 0.95)
    assert v.verdict == NOT_DECIDED and "contains" in v.reason


def test_findings_wrappers():
    from frozenvl.eval.verdicts import beats, learns_to_see, text_kept

    kept = text_kept("mm", Scores.of([[1] * 40] * 3), Scores.of([[1] * 20 + [0] * 20] * 3))
    assert kept.verdict == REFUTED and "as deployed: reproduced" in kept.reason  # the own path decides
    assert kept.line().startswith("[refuted] mm keeps the base's text answers")
    missing = text_kept("mm", Scores.of([[1] * 40] * 3), None)
    assert missing.verdict == NOT_DECIDED and missing.figures["own_path"] is None
    zeros = Scores.of([[0] * 30] * 3)
    tie = beats("IAA g", "frozen prefix", "grounding", zeros, zeros, chance=Scores.of([[0] * 30], seed_free=True))
    assert tie.verdict == NOT_DECIDED and tie.text.startswith("0.0% [0.0, 0.0] vs 0.0%")  # once "reproduced"
    forgot = beats("base", "full", "seen text", Scores.of([[1] * 30], seed_free=True),
                   Scores.of([r + r[:10] for r in POOR]), claim="full forgets")
    assert forgot.verdict == REPRODUCED and forgot.claim == "full forgets"
    seeing = learns_to_see("prefix", Scores.of(GOOD), Scores.of([[1] * 8 + [0] * 12], seed_free=True))
    assert seeing.verdict == REPRODUCED and seeing.figures["vqa"]["per_seed"] == [0.9, 0.85, 0.95]


def test_bounds_clip_the_interval():
    rows = [[1] * 19 + [0], [1] * 20, [1] * 18 + [0] * 2]
    free, clipped = estimate(Scores.of(rows)), estimate(Scores.of(rows, bounds=(0, 1)))
    assert free.high > 1 and clipped.high == 1.0 and clipped.low == free.low
    diff = Scores.of(rows, bounds=(0, 1)).minus(Scores.of([[0] * 20] * 3, bounds=(0, 1)))
    assert diff.bounds == (-1.0, 1.0)
    with pytest.raises(ValueError, match="within bounds"):
        Scores.of([[2.0]], bounds=(0, 1))
