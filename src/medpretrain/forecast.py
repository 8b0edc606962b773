"""Learning-curve forecasts: how many labels an init needs to reach a target, and where two inits cross.

A learning curve per (dataset, init, protocol) is the inverse power law metric(n) = a − b·n^(−c) (a: the
asymptote, b > 0: the room to improve, c > 0: the rate), fitted to the measured (labelled images, mean over
seeds) points by weighted nonlinear least squares, each budget weighted by the inverse variance of its mean —
the method of Figueroa et al., *Predicting sample size required for classification performance*, BMC Medical
Informatics and Decision Making 12:8, 2012. The asymptote is capped at 1, the ceiling of AUC and accuracy.

The fit is solved by variable projection (Golub & Pereyra, SIAM J. Numer. Anal. 10(2), 1973): for a fixed c
the model is linear in (a, b), so a and b have closed forms and only c is searched, on a dense log grid. That
makes the fit exact up to the grid step (0.7% in c), free of starting values, and vectorised over the bootstrap
replicates; scipy's `curve_fit` would need one iterative fit per replicate and can stop at a local optimum.

Intervals come from the two-level bootstrap of `medpretrain.stats` (seeds drawn as whole learning curves, test
images resampled once for every arm and budget): each replicate is refitted and the forecast recomputed, and the
95% percentile interval of the replicates is reported. Hand-written because no library fits learning curves
with replicate-level intervals; numpy does the algebra.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medpretrain.stats import combine, replicate_means

FORECAST_METRICS: tuple[str, ...] = ("auc", "acc")
DEFAULT_TARGETS: dict[str, list[float]] = {"auc": [0.9, 0.95]}
MIN_BUDGETS = 3  # three parameters
EXTRAPOLATION_FACTOR = 4.0  # forecasts beyond 4× the largest measured budget are extrapolations
CEILING = 1.0
RATE_GRID = np.geomspace(0.01, 4.0, 900)  # c; neighbouring values differ by 0.7%
_LEVEL = 0.95
_DROP_Z = 1.96  # a fall between budgets larger than this many standard errors is not noise


def _interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of replicates (NaN: failed fits, left out; ±inf kept, so 'never' can bound it)."""
    values = np.sort(values[~np.isnan(values)])
    if len(values) == 0:
        return math.nan, math.nan
    lo = math.floor((1 - _LEVEL) / 2 * (len(values) - 1))
    hi = math.ceil((1 + _LEVEL) / 2 * (len(values) - 1))
    return float(values[lo]), float(values[hi])


def fit_power_law(n: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R, 3) parameters (a, b, c) of the weighted least-squares fit of a − b·n^(−c) to each row of `y` (R, K),
    with b > 0 and a ≤ 1; a row with no increasing fit gets NaN."""
    n = np.asarray(n, dtype=float)
    y = np.atleast_2d(np.asarray(y, dtype=float))
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    x = n[None, :] ** -RATE_GRID[:, None]  # (C, K)
    sw, swx, swxx = w.sum(), x @ w, (x * x) @ w  # scalars / (C,)
    swy = y @ w  # (R,)
    swxy = y @ (w[None, :] * x).T  # (R, C)
    slope = (sw * swxy - swx[None, :] * swy[:, None]) / (sw * swxx - swx**2)[None, :]  # of y on x: −b
    a = (swy[:, None] - slope * swx[None, :]) / sw
    b = -slope
    capped = a > CEILING  # refit b with the asymptote at its ceiling
    b = np.where(capped, (CEILING * swx[None, :] - swxy) / swxx[None, :], b)
    a = np.where(capped, CEILING, a)
    resid = y[:, None, :] - (a[..., None] - b[..., None] * x[None, :, :])
    rss = (resid**2 * w).sum(axis=-1)
    rss = np.where(b > 0, rss, np.inf)
    best = rss.argmin(axis=1)
    rows = np.arange(len(y))
    params = np.stack([a[rows, best], b[rows, best], RATE_GRID[best]], axis=1)
    params[~np.isfinite(rss[rows, best])] = np.nan
    return params


def evaluate(params: np.ndarray, n: np.ndarray | float) -> np.ndarray:
    """The curve(s) at n: params (3,) or (R, 3); n scalar or (M,) → (M,) or (R, M)."""
    params = np.asarray(params, dtype=float)
    a, b, c = (params[..., i, None] for i in range(3))
    return a - b * np.atleast_1d(np.asarray(n, dtype=float)) ** -c


def labels_needed(params: np.ndarray, target: float) -> np.ndarray:
    """Labelled images at which the curve reaches `target`: n = (b / (a − target))^(1/c); inf where the asymptote
    does not exceed the target."""
    params = np.atleast_2d(np.asarray(params, dtype=float))
    a, b, c = params[:, 0], params[:, 1], params[:, 2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n = (b / (a - target)) ** (1.0 / c)
    return np.where(np.isnan(a), np.nan, np.where(a > target, n, np.inf))


@dataclass(frozen=True)
class Measured:
    """One budget of a curve: labelled images, and seed → (test metric, metric on the shared test resamples)."""

    n_labeled: float
    scored: Mapping[int, tuple[float, np.ndarray]]


@dataclass(frozen=True)
class LearningCurve:
    """A fitted curve with its bootstrap replicates; `reason` says why there is none (then params are NaN)."""

    n: np.ndarray  # budgets (labelled images), ascending
    means: np.ndarray  # measured mean over seeds per budget
    params: np.ndarray  # (3,) a, b, c
    replicates: np.ndarray  # (R, 3)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def n_max(self) -> float:
        return float(self.n[-1])

    def predict(self, n: float) -> tuple[float, float, float]:
        point = float(evaluate(self.params, n)[0])
        return (point, *_interval(evaluate(self.replicates, n)[:, 0]))

    def band(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The curve and its 95% band at each n (for the report's figure)."""
        reps = evaluate(self.replicates, n)
        reps = reps[~np.isnan(reps).any(axis=1)]
        if not len(reps):
            nan = np.full(len(n), np.nan)
            return evaluate(self.params, n), nan, nan
        low, high = np.percentile(reps, [100 * (1 - _LEVEL) / 2, 100 * (1 + _LEVEL) / 2], axis=0)
        return evaluate(self.params, n), low, high

    def labels_to(self, target: float) -> tuple[float, float, float]:
        point = float(labels_needed(self.params, target)[0])
        return (point, *_interval(labels_needed(self.replicates, target)))

    def asymptote(self) -> tuple[float, float, float]:
        return (float(self.params[0]), *_interval(self.replicates[:, 0]))


def _failed(n: np.ndarray, means: np.ndarray, reason: str) -> LearningCurve:
    nan = np.full(3, np.nan)
    return LearningCurve(n, means, nan, nan[None, :], reason)


def fit_curve(budgets: Sequence[Measured], draws: np.ndarray) -> LearningCurve:
    """The learning curve through `budgets` (any order); `draws` from `stats.seed_draws` sets the replicates."""
    budgets = sorted(budgets, key=lambda m: m.n_labeled)
    n = np.array([m.n_labeled for m in budgets], dtype=float)
    estimates = [combine([p for p, _ in m.scored.values()], np.stack([b for _, b in m.scored.values()]),
                         metric="curve") for m in budgets]  # fmt: skip
    means = np.array([e.delta for e in estimates])
    if len(np.unique(n)) < MIN_BUDGETS or len(n) != len(np.unique(n)):
        return _failed(n, means, f"{len(np.unique(n))} distinct budgets; a 3-parameter curve needs at least 3")
    se = np.array([e.se if math.isfinite(e.se) else math.nan for e in estimates])
    if np.isnan(means).any() or np.isnan(se).any():
        return _failed(n, means, "a budget has no usable predictions")
    for k in range(len(n) - 1):
        if means[k + 1] - means[k] < -_DROP_Z * math.hypot(se[k], se[k + 1]):
            return _failed(n, means, f"the metric falls from {n[k]:.0f} to {n[k + 1]:.0f} labels by more than its "
                                     "noise: these points are not a learning curve")  # fmt: skip
    weights = 1.0 / np.maximum(se, 1e-4) ** 2  # a floor: one noiseless budget must not take all the weight
    params = fit_power_law(n, means[None, :], weights)[0]
    if np.isnan(params).any():
        return _failed(n, means, "no increasing power law fits these points")
    replicates = np.stack([replicate_means(m.scored, draws) for m in budgets], axis=1)  # (R, K)
    return LearningCurve(n, means, params, fit_power_law(n, replicates, weights))


@dataclass(frozen=True)
class Holdout:
    """Leave-last-budget-out: the curve fitted without the largest budget, predicting it."""

    budget: float
    predicted: float
    low: float
    high: float
    measured: float


def holdout(budgets: Sequence[Measured], draws: np.ndarray) -> Holdout | None:
    """None when fewer than MIN_BUDGETS + 1 budgets leave nothing to hold out, or the smaller ones do not fit."""
    budgets = sorted(budgets, key=lambda m: m.n_labeled)
    if len(budgets) <= MIN_BUDGETS:
        return None
    curve = fit_curve(budgets[:-1], draws)
    if not curve.ok:
        return None
    last = budgets[-1]
    measured = float(np.mean([p for p, _ in last.scored.values()]))
    return Holdout(last.n_labeled, *curve.predict(last.n_labeled), measured)


@dataclass(frozen=True)
class Crossover:
    """Where curve `first` (ahead at the smallest shared budget) stops beating `second`; n is inf where it never
    does up to `n_hi`. low/high: 95% interval over the paired replicates (high may be inf: never)."""

    n: float
    low: float
    high: float
    n_lo: float
    n_hi: float
    first_leads: bool


def crossover(first: LearningCurve, second: LearningCurve, *, points: int = 400) -> Crossover | None:
    """First sign change of first − second from the smallest shared budget to EXTRAPOLATION_FACTOR × the largest;
    replicate r of both curves shares test resample r and seed draw r, so the difference is paired."""
    if not (first.ok and second.ok):
        return None
    n_lo = max(first.n[0], second.n[0])
    n_hi = EXTRAPOLATION_FACTOR * min(first.n_max, second.n_max)
    grid = np.geomspace(n_lo, n_hi, points)

    def crossing(diff: np.ndarray) -> np.ndarray:
        diff = np.atleast_2d(diff)
        flipped = np.sign(diff) != np.sign(diff[:, :1])
        first_flip = np.where(flipped.any(axis=1), flipped.argmax(axis=1), -1)
        out = np.where(first_flip >= 0, grid[np.maximum(first_flip, 0)], np.inf)
        return np.where(np.isnan(diff).any(axis=1), np.nan, out)

    point_diff = evaluate(first.params, grid) - evaluate(second.params, grid)
    n = float(crossing(point_diff)[0])
    low, high = _interval(crossing(evaluate(first.replicates, grid) - evaluate(second.replicates, grid)))
    return Crossover(n, low, high, float(n_lo), float(n_hi), bool(point_diff[0] > 0))
