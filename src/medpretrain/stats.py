"""Every interval and every test that medpretrain reports: the one place that turns predictions into evidence.

What varies between two runs of the same study, and what the numbers here account for:

- **the test sample.** Every init and every seed is scored on the same test images, so their test-set noise is
  shared, not independent; it is estimated by a *stratified* bootstrap of the test images (Efron & Tibshirani,
  *An Introduction to the Bootstrap*, 1993, §3; stratified so that every class keeps its count and a macro AUC is
  defined on every resample), with one set of resamples for all arms and seeds;
- **the seed.** Which labelled subset was drawn, how the head or network trained: independent between seeds,
  estimated by the spread over seeds of the per-seed values (Bouthillier et al., *Accounting for Variance in
  Machine Learning Benchmarks*, MLSys 2021, who show that leaving it out overstates significance).

A mean over S seeds then has variance ``σ²_seed/S + V_test``. ``V_test`` is the bootstrap variance of the seed
mean. ``σ²_seed`` is the seed variance component: the sample variance over seeds of the per-seed values, less
the part of it that is each seed's own test noise (estimated by the same bootstrap, as in a one-way
random-effects analysis of variance: Searle, Casella & McCulloch, *Variance Components*, 1992, §3), never below
zero. The interval and the two-sided p-value use a t distribution with Satterthwaite's degrees of freedom
(Satterthwaite, *Biometrics Bulletin* 2(6), 1946): S − 1 when the seeds dominate, tending to the normal when the
test set does. With one seed there is no seed spread to estimate, so the result is the test-set bootstrap alone
and says so in its ``method``.

Multiplicity: Holm's step-down adjustment (Holm, *Scand. J. Statistics* 6, 1979) over every test a report shows.

Hand-written because none of scipy, statsmodels or scikit-learn combines a shared, paired test-set bootstrap with
seed-level replication; scipy supplies the t distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import predict_labels, weighted_auc

N_BOOTSTRAP = 1000
ALPHA = 0.05
CI_METRICS: tuple[str, ...] = ("auc", "acc")
_BLOCK = 100  # resamples per block: bounds the (block, n) temporaries on large test sets (tissuemnist: 47k)


# ------------------------------------------------------------------------------------------ resampling


def _strata(y: np.ndarray, task: Task) -> np.ndarray:
    """Stratum of each test image: its class; for multi-label its rarest positive label (or 'none', −1).

    Multi-label images cannot all keep every label's count at once (labels co-occur), so each image sits in the
    stratum of its rarest positive label: every label that is some image's rarest keeps at least that many
    positives in every resample, which is what keeps a rare label's AUC defined.
    """
    if task is Task.MULTILABEL:
        prevalence = y.sum(axis=0)
        rank = np.where(y > 0, prevalence[None, :], np.inf)
        rarest = rank.argmin(axis=1)
        return np.where(y.any(axis=1), rarest, -1)
    return np.asarray(y)


def stratified_resamples(y: np.ndarray, task: Task | str, *, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(n_boot, n) multiplicity of each test image in each resample, drawn with replacement within each stratum
    (each class keeps its count). The same y, n_boot and seed give the same resamples."""
    task = Task(task)
    strata = _strata(np.asarray(y), task)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(strata)), dtype=np.float64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=n_boot)
    return counts


def _weighted_acc(y: np.ndarray, proba: np.ndarray, task: Task, weights: np.ndarray) -> np.ndarray:
    pred = predict_labels(proba, task)
    correct = (pred == y).mean(axis=1) if task is Task.MULTILABEL else (pred == y).astype(float)
    return weights @ correct / weights.sum(axis=1)


# metric name → f(y, proba, task, weights (B, n)) → (B,) values under each weighting of the test images
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, Task, np.ndarray], np.ndarray]] = {
    "auc": weighted_auc,
    "acc": _weighted_acc,
}


def _metric_fn(metric: str) -> Callable[[np.ndarray, np.ndarray, Task, np.ndarray], np.ndarray]:
    if metric not in METRICS:
        raise MedpretrainError(f"unknown metric '{metric}'", f"choose one of: {', '.join(METRICS)}")
    return METRICS[metric]


class TestResamples:
    """One set of stratified resamples of a test set, shared by every arm and seed scored on it.

    >>> import numpy as np
    >>> y = np.array([0, 0, 0, 1, 1, 1])
    >>> resamples = TestResamples(y, "binary", n_boot=50, seed=0)
    >>> point, boot = resamples.scores(np.eye(2)[y], "acc")
    >>> point, boot.shape, float(boot.min())
    (1.0, (50,), 1.0)
    """

    __test__ = False  # not a pytest class, whatever its name says

    def __init__(self, y: np.ndarray, task: Task | str, *, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> None:
        self.y = np.asarray(y)
        self.task = Task(task)
        self.n_boot = n_boot
        self.counts = stratified_resamples(self.y, self.task, n_boot=n_boot, seed=seed)

    def scores(self, proba: np.ndarray, metric: str) -> tuple[float, np.ndarray]:
        """(the metric on the test set as it is, the metric on each resample)."""
        fn = _metric_fn(metric)
        proba = np.asarray(proba, dtype=np.float64)
        if len(proba) != len(self.y):
            raise MedpretrainError(
                f"{len(proba)} predictions for {len(self.y)} test images", "score every test image, in order"
            )
        point = float(fn(self.y, proba, self.task, np.ones((1, len(self.y))))[0])
        boot = np.concatenate(
            [fn(self.y, proba, self.task, self.counts[i : i + _BLOCK]) for i in range(0, self.n_boot, _BLOCK)]
        )
        return point, boot


# ------------------------------------------------------------------------------------------ seed + test


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (of a metric, or of a paired difference) with its 95% interval and two-sided p against 0.

    ``seed_var`` and ``test_var`` are the two variance components of the mean (see the module docstring); ``df`` the
    Welch–Satterthwaite degrees of freedom (``inf`` when the seeds do not vary). ``method`` is a short name.
    """

    delta: float
    low: float
    high: float
    p: float
    method: str
    metric: str
    n_seeds: int
    n_boot: int
    seed_var: float
    test_var: float
    df: float

    @property
    def se(self) -> float:
        return math.sqrt(self.seed_var + self.test_var)

    def significant(self, alpha: float = ALPHA) -> bool:
        return bool(self.p < alpha)

    def detectable(self, *, alpha: float = ALPHA, power: float = 0.8) -> float:
        """The smallest true difference this design detects with the given power: (t₁₋α/₂ + t_power)·se."""
        if self.n_seeds < 2:
            z = scipy_stats.norm
            return float((z.ppf(1 - alpha / 2) + z.ppf(power)) * self.se)
        t = scipy_stats.t(self.df)
        return float((t.ppf(1 - alpha / 2) + t.ppf(power)) * self.se)

    @property
    def limited_by(self) -> str:
        """'seeds' when the seed-to-seed variation is the larger share of the variance, else 'test set'."""
        return "seeds" if self.seed_var >= self.test_var else "test set"


SEED_AND_TEST = "seed+test-set t (Welch–Satterthwaite)"
TEST_ONLY = "test-set bootstrap only (1 seed)"


def combine(points: Sequence[float], boots: np.ndarray, *, metric: str, level: float = 0.95) -> Estimate:
    """The mean over seeds of per-seed values `points` (S,), with `boots` (S, B) their values on shared test
    resamples (resample b the same images for every seed): interval and p-value against 0 from both variance
    sources. Resamples on which any seed's value is undefined are dropped."""
    points = np.asarray(points, dtype=float)
    boots = np.atleast_2d(np.asarray(boots, dtype=float))
    if boots.shape[0] != len(points) or len(points) == 0:
        raise ValueError(f"{len(points)} per-seed values but {boots.shape[0]} rows of resamples")
    usable = ~np.isnan(boots).any(axis=0)
    boots = boots[:, usable]
    n_seeds, n_boot = len(points), boots.shape[1]
    mean = float(points.mean())
    if n_boot < 2 or not math.isfinite(mean):
        nan = float("nan")
        return Estimate(mean, nan, nan, nan, "undefined", metric, n_seeds, n_boot, nan, nan, nan)
    seed_mean_boot = boots.mean(axis=0)
    test_var = float(seed_mean_boot.var(ddof=1))
    if n_seeds == 1:
        alpha = 1 - level
        low, high = np.percentile(seed_mean_boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        p = 2.0 * min(float((seed_mean_boot <= 0).mean()), float((seed_mean_boot >= 0).mean()))
        p = min(1.0, max(p, 1.0 / n_boot))
        return Estimate(mean, float(low), float(high), p, TEST_ONLY, metric, 1, n_boot, 0.0, test_var, math.inf)
    spread = float(points.var(ddof=1))
    # The seeds' spread on one test set also holds each seed's own share of the test noise, which test_var
    # already counts: subtract its bootstrap estimate (the method-of-moments variance component), never below 0.
    own_test_noise = float((boots - seed_mean_boot).var(axis=1, ddof=1).sum()) / (n_seeds - 1)
    seed_var = max(spread - own_test_noise, 0.0) / n_seeds
    total = seed_var + test_var
    # Satterthwaite's df with the raw spread in the denominator: the subtracted term comes from many resamples,
    # so the uncertainty of seed_var is that of the (n_seeds − 1)-df spread, also where it was cut to zero (a
    # normal there would be too sure: measured, 8–10% false positives at α = 0.05 with 3 seeds).
    # It is never below n_seeds − 1, the df of its least certain part.
    df = max(total**2 * (n_seeds - 1) / (spread / n_seeds) ** 2, n_seeds - 1) if spread > 0 else math.inf
    if total == 0:  # identical values on every seed and resample
        p = 1.0 if mean == 0 else 0.0
        return Estimate(mean, mean, mean, p, SEED_AND_TEST, metric, n_seeds, n_boot, 0.0, 0.0, df)
    se = math.sqrt(total)
    dist = scipy_stats.t(df) if math.isfinite(df) else scipy_stats.norm
    half = float(dist.ppf(0.5 + level / 2)) * se
    p = float(2 * dist.sf(abs(mean) / se))
    return Estimate(mean, mean - half, mean + half, p, SEED_AND_TEST, metric, n_seeds, n_boot, seed_var, test_var, df)


def _as_seed_stack(proba: np.ndarray, y: np.ndarray, task: Task, name: str) -> np.ndarray:
    """(n_seeds, n, columns) float64; a binary task may give (n_seeds, n) positive-class probabilities."""
    proba = np.asarray(proba, dtype=np.float64)
    if task is Task.BINARY and proba.ndim == 2:
        proba = np.stack([1 - proba, proba], axis=-1)
    if proba.ndim != 3 or proba.shape[1] != len(y):
        raise MedpretrainError(
            f"{name} has shape {proba.shape}, expected (n_seeds, {len(y)}, n_classes)",
            "stack one (n_test, n_classes) probability array per seed; binary tasks may give (n_seeds, n_test)",
        )
    return proba


def paired_comparison(
    y_true: np.ndarray,
    proba_a: np.ndarray,
    proba_b: np.ndarray,
    task: Task | str = "binary",
    metric: str = "auc",
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> Estimate:
    """Is init a better than init b? The mean over seeds of metric(a) − metric(b), with its 95% interval and
    two-sided p-value counting both the shared test sample and the seed-to-seed variation of the difference.

    ``y_true``: (n,) class indices, or (n, labels) for multi-label. ``proba_a``, ``proba_b``: (n_seeds, n,
    n_classes), for binary also (n_seeds, n) positive-class probabilities; seed s of a and of b share the labelled
    subset, every seed is scored on the same test images.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 400)
    >>> a = np.stack([np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.25, 400), 0, 1) for _ in range(3)])
    >>> b = np.stack([np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.25, 400), 0, 1) for _ in range(3)])
    >>> r = paired_comparison(y, a, b, task="binary", metric="auc", n_boot=200, seed=0)
    >>> r.delta > 0 and r.low > 0 and r.p < 0.05, r.method
    (True, 'seed+test-set t (Welch–Satterthwaite)')
    """
    task = Task(task)
    y = np.asarray(y_true)
    a = _as_seed_stack(proba_a, y, task, "proba_a")
    b = _as_seed_stack(proba_b, y, task, "proba_b")
    if a.shape[0] != b.shape[0]:
        raise MedpretrainError(
            f"proba_a has {a.shape[0]} seeds and proba_b {b.shape[0]}", "pair seed s of a with seed s of b"
        )
    resamples = TestResamples(y, task, n_boot=n_boot, seed=seed)
    scored_a = [resamples.scores(p, metric) for p in a]
    scored_b = [resamples.scores(p, metric) for p in b]
    return paired_from_scores(scored_a, scored_b, metric=metric)


def paired_from_scores(
    scored_a: Sequence[tuple[float, np.ndarray]], scored_b: Sequence[tuple[float, np.ndarray]], *, metric: str
) -> Estimate:
    """`paired_comparison` from per-seed (point, resampled) scores of one `TestResamples` (the report caches them)."""
    points = [pa - pb for (pa, _), (pb, _) in zip(scored_a, scored_b, strict=True)]
    boots = np.stack([ba - bb for (_, ba), (_, bb) in zip(scored_a, scored_b, strict=True)])
    return combine(points, boots, metric=metric)


def seed_mean_interval(
    y_true: np.ndarray,
    proba: np.ndarray,
    task: Task | str = "binary",
    metric: str = "auc",
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> Estimate:
    """The mean over seeds of one init's metric with the 95% interval of that mean (seed and test-set variance);
    `delta` holds the mean. Same input shapes as `paired_comparison`."""
    task = Task(task)
    y = np.asarray(y_true)
    resamples = TestResamples(y, task, n_boot=n_boot, seed=seed)
    scored = [resamples.scores(p, metric) for p in _as_seed_stack(proba, y, task, "proba")]
    return combine([s for s, _ in scored], np.stack([b for _, b in scored]), metric=metric)


def cell_intervals(
    y: np.ndarray, proba: np.ndarray, task: Task | str, *, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> dict[str, float]:
    """`<metric>_ci_low` / `_ci_high`: one cell's 95% percentile interval over stratified test resamples (the
    test-set noise of that one seed; the report's intervals of a mean over seeds come from `combine`)."""
    resamples = TestResamples(y, task, n_boot=n_boot, seed=seed)
    out = {}
    for metric in CI_METRICS:
        _, boot = resamples.scores(proba, metric)
        boot = boot[~np.isnan(boot)]
        low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
        out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = float(low), float(high)
    return out


# ------------------------------------------------------------------------------------------ replicates


def seed_draws(seeds: Sequence[int], n_rep: int = N_BOOTSTRAP, *, seed: int = 0) -> np.ndarray:
    """(n_rep, S) seed labels drawn with replacement from `seeds` (S of them): the seed level of a two-level
    bootstrap. The same labels, n_rep and seed give the same draws, so every arm and budget of a study that
    uses them resamples the same seeds together: a seed's whole learning curve is one unit, and seed s of two
    arms (which share its labelled subsets) stays paired."""
    labels = np.asarray(sorted(set(seeds)))
    rng = np.random.default_rng(seed)
    return labels[rng.integers(0, len(labels), size=(n_rep, len(labels)))]


def replicate_means(scored: Mapping[int, tuple[float, np.ndarray]], draws: np.ndarray) -> np.ndarray:
    """(n_rep,) bootstrap replicates of a mean over seeds from both variance sources (a two-level bootstrap:
    Davison & Hinkley, *Bootstrap Methods and their Application*, 1997, §3.8).

    `scored`: seed → (point, values on the shared test resamples) as `TestResamples.scores` gives them;
    `draws`: `seed_draws`. Replicate r = the seed mean on test resample r (mod B) — the test level, shared by
    every arm and budget — plus the deviation of the mean over the seeds drawn for r from the mean over all,
    scaled by √(S/(S−1)) so that its variance is the seed variance of a mean of S (the small-sample correction,
    ibid. §2.4). Drawn seeds that this cell lacks are skipped (none left: all of its seeds). The seed level
    carries each seed's own test noise a second time, which errs on the wide side by that small share.
    """
    labels = sorted(scored)
    points = np.array([scored[s][0] for s in labels], dtype=float)
    boots = np.stack([np.asarray(scored[s][1], dtype=float) for s in labels])
    n_rep = len(draws)
    test_level = boots.mean(axis=0)[np.arange(n_rep) % boots.shape[1]]
    if len(labels) < 2:
        return test_level
    counts = (np.asarray(draws)[:, :, None] == np.asarray(labels)[None, None, :]).sum(axis=1).astype(float)
    empty = counts.sum(axis=1) == 0
    counts[empty] = 1.0
    drawn_mean = counts @ points / counts.sum(axis=1)
    inflation = math.sqrt(len(labels) / (len(labels) - 1))
    return test_level + inflation * (drawn_mean - points.mean())


# ------------------------------------------------------------------------------------------ multiplicity


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (family-wise error control, any dependence), in the input order; NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(len(p), np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def format_p(p: float, n_boot: int | None = None) -> str:
    """'p = 0.034', 'p = 0.42', 'p < 0.001'; a bootstrap p at its resolution floor 1/n_boot is 'p ≤ 0.001'."""
    if not math.isfinite(p):
        return "p undefined"
    if n_boot and p <= 1.0 / n_boot:
        return f"p ≤ {1.0 / n_boot:.2g}"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2g}" if p < 0.1 else f"p = {p:.2f}"
