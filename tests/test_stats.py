"""The statistics module: stratified resampling, the seed-aware paired comparison and its calibration, Holm.

The calibration tests simulate whole studies (a fresh test set, fresh seeds) with a known truth and count how
often the comparison rejects. Everything is seeded, so they are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import auc
from medpretrain.stats import (
    SEED_AND_TEST,
    TEST_ONLY,
    TestResamples,
    combine,
    holm,
    paired_comparison,
    seed_mean_interval,
    stratified_resamples,
)

N_STUDIES = 400
N_BOOT = 100
N_SEEDS = 5
SIGNAL = 1.0  # class separation of the simulated scores: AUC ≈ 0.76


def _study(
    rng: np.random.Generator, *, n_test: int, seed_sd: float, gain: float = 0.0, image_sd: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One simulated study: test labels and two arms' positive-class probabilities, (N_SEEDS, n_test) each.

    score = (SIGNAL + arm gain + seed shift)·y + image difficulty (shared by arms and seeds) + per-seed noise.
    `seed_sd` shifts each seed's separation (a drawn labelled subset that trains better or worse).
    """
    y = rng.integers(0, 2, n_test)
    difficulty = rng.normal(0, image_sd, n_test)
    arms = []
    for arm_gain in (gain, 0.0):
        seeds = []
        for _ in range(N_SEEDS):
            separation = SIGNAL + arm_gain + rng.normal(0, seed_sd)
            seeds.append(expit(separation * y + difficulty + rng.normal(0, 0.5, n_test) - separation / 2))
        arms.append(np.stack(seeds))
    return y, arms[0], arms[1]


def _rejection_rate(
    *, n_test: int, seed_sd: float, gain: float = 0.0, test_only: bool = False, studies: int = N_STUDIES
) -> float:
    rng = np.random.default_rng(20261202)
    rejected = 0
    for study in range(studies):
        y, a, b = _study(rng, n_test=n_test, seed_sd=seed_sd, gain=gain)
        if test_only:  # the report's former test: resample the test set only, seed spread ignored
            resamples = TestResamples(y, Task.BINARY, n_boot=N_BOOT, seed=study)
            boot = [resamples.scores(np.stack([1 - p, p], -1), "auc")[1] for p in (*a, *b)]
            diff = np.mean(boot[:N_SEEDS], axis=0) - np.mean(boot[N_SEEDS:], axis=0)
            p = 2 * min((diff <= 0).mean(), (diff >= 0).mean())
        else:
            p = paired_comparison(y, a, b, task="binary", metric="auc", n_boot=N_BOOT, seed=study).p
        rejected += p < 0.05
    return rejected / studies


def _auc_of_gain(gain: float, seed_sd: float = 0.0) -> float:
    """The true (population) AUC of an arm: the simulation's AUC on a very large test set."""
    rng = np.random.default_rng(1)
    y, a, _ = _study(rng, n_test=200_000, seed_sd=seed_sd, gain=gain)
    return float(np.mean([roc_auc_score(y, p) for p in a]))


def test_simulated_seed_sd_matches_the_measured_regime() -> None:
    """Regime (a) below has a per-seed AUC sd of about 0.03 (as measured between seeds at 1% labels)."""
    rng = np.random.default_rng(2)
    y, a, _ = _study(rng, n_test=100_000, seed_sd=0.35)
    per_seed = [roc_auc_score(y, p) for p in a]
    assert 0.015 < np.std(per_seed, ddof=1) < 0.06


def test_false_positive_rate_with_large_seed_variance_and_little_test_noise() -> None:
    """(a) Equal arms, per-seed AUC sd ≈ 0.03, 600 test images: the seed spread dominates."""
    rate = _rejection_rate(n_test=600, seed_sd=0.35)
    assert rate <= 0.08, rate
    # The simulation has teeth: a test-set-only bootstrap calls the same equal arms different far more often.
    assert _rejection_rate(n_test=600, seed_sd=0.35, test_only=True, studies=100) > 0.15


def test_false_positive_rate_with_no_seed_variance_and_a_small_test_set() -> None:
    """(b) Equal arms, no seed shift, 150 test images: the test sample dominates."""
    assert _rejection_rate(n_test=150, seed_sd=0.0) <= 0.08


def test_power_for_a_true_auc_difference_of_005() -> None:
    """A true AUC gain of 0.05, small seed variance, 5 seeds, 300 test images: detected ≥ 70% of the time."""
    gain = 0.26
    true_delta = _auc_of_gain(gain, seed_sd=0.05) - _auc_of_gain(0.0, seed_sd=0.05)
    assert true_delta == pytest.approx(0.05, abs=0.006)
    assert _rejection_rate(n_test=300, seed_sd=0.05, gain=gain, studies=200) >= 0.7


def test_interval_covers_the_true_difference() -> None:
    """95% intervals of a true gain cover it in about 95% of studies (not much less)."""
    gain = 0.26
    truth = _auc_of_gain(gain, seed_sd=0.35) - _auc_of_gain(0.0, seed_sd=0.35)
    rng = np.random.default_rng(3)
    covered = 0
    n = 150
    for study in range(n):
        y, a, b = _study(rng, n_test=600, seed_sd=0.35, gain=gain)
        r = paired_comparison(y, a, b, task="binary", metric="auc", n_boot=N_BOOT, seed=study)
        covered += r.low <= truth <= r.high
    assert covered / n >= 0.9


def test_seed_variance_alone_reduces_to_the_paired_t_test() -> None:
    """With a vanishing test-set term the comparison is the paired t-test over seeds (scipy's)."""
    points = np.array([0.152, -0.033, 0.045])
    boots = points[:, None] + np.zeros((3, 50))  # no test-set spread at all
    r = combine(points, boots, metric="auc")
    expected = scipy_stats.ttest_1samp(points, 0.0)
    assert r.p == pytest.approx(expected.pvalue, rel=1e-9)
    assert r.df == pytest.approx(2.0)
    assert r.p > 0.3  # the quick-preset example: p = 0.42 at the seed level, not 0.002
    low, high = expected.confidence_interval()
    assert (r.low, r.high) == pytest.approx((low, high), rel=1e-9)


def test_one_seed_falls_back_to_the_test_set_bootstrap_and_says_so() -> None:
    rng = np.random.default_rng(4)
    y, a, b = _study(rng, n_test=300, seed_sd=0.0, gain=0.5)
    r = paired_comparison(y, a[:1], b[:1], task="binary", metric="auc", n_boot=500, seed=0)
    assert r.method == TEST_ONLY and r.n_seeds == 1
    several = paired_comparison(y, a, b, task="binary", metric="auc", n_boot=500, seed=0)
    assert several.method == SEED_AND_TEST and several.n_seeds == N_SEEDS
    assert r.delta == pytest.approx(auc(y, np.stack([1 - a[0], a[0]], 1), "binary") - roc_auc_score(y, b[0]))


def test_binary_shapes_agree_and_bad_shapes_are_input_errors() -> None:
    rng = np.random.default_rng(5)
    y, a, b = _study(rng, n_test=200, seed_sd=0.1)
    two_column = paired_comparison(y, np.stack([1 - a, a], -1), np.stack([1 - b, b], -1), n_boot=100)
    one_column = paired_comparison(y, a, b, n_boot=100)
    assert (two_column.delta, two_column.p) == pytest.approx((one_column.delta, one_column.p))
    with pytest.raises(MedpretrainError, match="expected"):
        paired_comparison(y, a[:, :100], b, n_boot=10)
    with pytest.raises(MedpretrainError, match="seeds"):
        paired_comparison(y, a[:2], b, n_boot=10)
    with pytest.raises(MedpretrainError, match="unknown metric"):
        paired_comparison(y, a, b, metric="f2", n_boot=10)


def test_multiclass_and_accuracy() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 500)
    good = np.stack([np.eye(4)[y] * 2 + rng.random((500, 4)) for _ in range(3)])
    bad = np.stack([rng.random((500, 4)) for _ in range(3)])
    for metric in ("auc", "acc"):
        r = paired_comparison(y, good, bad, task="multiclass", metric=metric, n_boot=100)
        assert r.delta > 0.2 and r.low > 0 and r.p < 0.01


def test_stratified_resamples_keep_every_class_count() -> None:
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(300, int), np.ones(5, int), np.full(2, 2)]  # a rare class of 2 images
    counts = stratified_resamples(y, "multiclass", n_boot=400, seed=0)
    for c in range(3):
        np.testing.assert_array_equal(counts[:, y == c].sum(axis=1), (y == c).sum())
    assert (counts.sum(axis=1) == len(y)).all()
    proba = rng.dirichlet([1, 1, 1], len(y))
    _, boot = TestResamples(y, "multiclass", n_boot=400, seed=0).scores(proba, "auc")
    assert not np.isnan(boot).any()  # every class present in every resample: the macro AUC never drops one


def test_multilabel_resamples_keep_rare_labels() -> None:
    rng = np.random.default_rng(8)
    y = (rng.random((400, 5)) < [0.3, 0.2, 0.1, 0.05, 0.01]).astype(int)
    y[0, 4] = 1  # at least one positive of the rarest label
    counts = stratified_resamples(y, "multilabel", n_boot=300, seed=1)
    positives = counts @ y
    assert (positives > 0).all()  # every label keeps positives in every resample
    assert (counts.sum(axis=1) == len(y)).all()


def test_seed_mean_interval_contains_the_mean_and_widens_with_seed_spread() -> None:
    rng = np.random.default_rng(9)
    y, tight, _ = _study(rng, n_test=800, seed_sd=0.0)
    _, loose, _ = _study(np.random.default_rng(9), n_test=800, seed_sd=0.6)
    a = seed_mean_interval(y, tight, n_boot=200)
    b = seed_mean_interval(y, loose, n_boot=200)
    per_seed = [roc_auc_score(y, p) for p in tight]
    assert a.delta == pytest.approx(np.mean(per_seed)) and a.low < a.delta < a.high
    assert (b.high - b.low) > (a.high - a.low)


def test_holm_matches_statsmodels() -> None:
    p = [0.01, 0.04, 0.03, 0.005, 0.5, float("nan"), 0.2]
    expected = multipletests([x for x in p if not math.isnan(x)], method="holm")[1]
    adjusted = holm(p)
    assert math.isnan(adjusted[5])
    np.testing.assert_allclose([x for x in adjusted if not math.isnan(x)], expected)


def test_detectable_difference_and_limiting_factor() -> None:
    seeds_noisy = combine([0.1, -0.05, 0.02], np.array([0.1, -0.05, 0.02])[:, None] + np.zeros((3, 20)), metric="auc")
    assert seeds_noisy.limited_by == "seeds" and seeds_noisy.detectable() > abs(seeds_noisy.delta)
    boots = np.random.default_rng(0).normal(0, 0.05, (3, 500))
    test_noisy = combine([0.01, 0.01, 0.01], 0.01 + boots - boots.mean(1, keepdims=True), metric="auc")
    assert test_noisy.limited_by == "test set" and test_noisy.df == math.inf
