"""Learning-curve forecasts: the power-law fit, its bootstrap intervals, ill-posed inputs, and the report/CLI rows.

The synthetic test draws learning curves from a known power law with seed and test-set noise and checks that the
95% interval of the labels-to-target covers the truth in at least 90% of 200 simulated studies. The run-directory
test fits a small real run (PneumoniaMNIST subset, scratch and ImageNet EfficientNet-Lite0, linear probe at five
budgets) and checks that the report and `medpretrain forecast` show the same numbers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medpretrain.budgets import Budget
from medpretrain.cells import Cell, run_cell
from medpretrain.cli import app
from medpretrain.forecast import Measured, crossover, evaluate, fit_curve, fit_power_law, holdout, labels_needed
from medpretrain.report import build_report
from medpretrain.report.forecast import forecasts
from medpretrain.report.run import Run
from medpretrain.runtime import torch_threads
from medpretrain.stats import replicate_means, seed_draws
from medpretrain.store import Store
from medpretrain.study import Study

N_REP = 400
BUDGETS = np.array([40.0, 80.0, 200.0, 400.0, 1000.0])


def _simulated(params: tuple[float, float, float], rng: np.random.Generator, *, seeds: int = 5,
               seed_sd: float = 0.01, test_sd: float = 0.004) -> list[Measured]:  # fmt: skip
    """Per budget: each seed's metric = the curve + its seed noise + the test set's noise; its values on the
    resamples add the resampling noise, shared by every seed (one test set)."""
    curve = evaluate(np.array(params), BUDGETS)
    out = []
    for k, n in enumerate(BUDGETS):
        test_effect, resampled = rng.normal(0, test_sd), rng.normal(0, test_sd, N_REP)
        scored = {}
        for s in range(seeds):
            point = curve[k] + rng.normal(0, seed_sd) + test_effect
            scored[s] = (float(point), point + resampled)
        out.append(Measured(float(n), scored))
    return out


def test_noiseless_points_are_fitted_exactly() -> None:
    truth = np.array([0.95, 0.8, 0.5])
    params = fit_power_law(BUDGETS, evaluate(truth, BUDGETS), np.ones(len(BUDGETS)))[0]
    np.testing.assert_allclose(params, truth, rtol=0.01)
    assert labels_needed(truth, 0.9)[0] == pytest.approx((0.8 / 0.05) ** 2)
    assert math.isinf(labels_needed(truth, 0.96)[0])  # above the asymptote


def test_labels_to_target_interval_covers_the_truth_in_90_percent_of_200_studies() -> None:
    params, target = (0.96, 0.9, 0.45), 0.9
    truth = float(labels_needed(np.array(params), target)[0])
    rng = np.random.default_rng(20261203)
    covered = 0
    for sim in range(200):
        curve = fit_curve(_simulated(params, rng), seed_draws(range(5), N_REP, seed=sim))
        _, low, high = curve.labels_to(target)
        covered += low <= truth <= high
    assert covered / 200 >= 0.90


def test_replicates_are_paired_across_arms_and_count_the_seed_variance() -> None:
    rng = np.random.default_rng(0)
    boots = rng.normal(0, 0.01, N_REP)
    scored = {s: (0.8 + 0.05 * s, 0.8 + 0.05 * s + boots) for s in range(3)}
    draws = seed_draws(range(3), N_REP, seed=1)
    np.testing.assert_array_equal(draws, seed_draws([2, 1, 0], N_REP, seed=1))  # the same draws for every arm
    reps = replicate_means(scored, draws)
    assert reps.std() > 0.02  # the seeds' spread (sd 0.05) dominates the test noise (sd 0.01)
    single = replicate_means({0: scored[0]}, draws)
    np.testing.assert_allclose(single, scored[0][1])  # one seed: the test-set bootstrap alone


def test_ill_posed_curves_are_not_forecast_and_say_why() -> None:
    rng = np.random.default_rng(1)
    draws = seed_draws(range(5), N_REP)
    budgets = _simulated((0.95, 0.8, 0.5), rng)
    assert "at least 3" in fit_curve(budgets[:2], draws).reason
    falling = [Measured(b.n_labeled, {s: (1.5 - p, 1.5 - v) for s, (p, v) in b.scored.items()}) for b in budgets]
    curve = fit_curve(falling, draws)
    assert not curve.ok and "falls" in curve.reason
    assert math.isnan(curve.labels_to(0.9)[0])
    assert holdout(budgets[:3], draws) is None  # nothing left to hold out


def test_leave_last_budget_out_predicts_the_largest_budget() -> None:
    rng = np.random.default_rng(2)
    budgets = _simulated((0.95, 0.8, 0.5), rng)
    check = holdout(budgets, seed_draws(range(5), N_REP))
    assert check is not None and check.budget == 1000
    assert check.low <= check.measured <= check.high


def test_crossover_of_two_curves_is_found_with_its_interval() -> None:
    # fast starter a = 0.85, slow b = 0.97: equal where 0.85 − 0.3 n^−0.5 = 0.97 − 1.2 n^−0.5 → n = 56.25
    rng = np.random.default_rng(3)
    draws = seed_draws(range(5), N_REP)
    fast = fit_curve(_simulated((0.85, 0.3, 0.5), rng, seed_sd=0.002, test_sd=0.001), draws)
    slow = fit_curve(_simulated((0.97, 1.2, 0.5), rng, seed_sd=0.002, test_sd=0.001), draws)
    cross = crossover(fast, slow)
    assert cross is not None and cross.first_leads  # at 40 labels: 0.803 against 0.780
    assert abs(cross.n - 56.25) < 6 and cross.low <= cross.n <= cross.high < 80
    assert crossover(slow, slow).n == math.inf  # a curve never crosses itself


# ------------------------------------------------------------------------------------------ a real run

SPEC = "pneumoniamnist[train=400,val=100,test=300]"
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
INITS = ("scratch", "imagenet")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forecast-run")
    store = Store(out)
    with torch_threads(1):
        for init in INITS:
            for fraction in FRACTIONS:
                for seed in (0, 1, 2):
                    cell = Cell(SPEC, 28, 112, "efficientnet_lite0", False, init, "linear", Budget(fraction=fraction),
                                seed, {"C": [0.01, 0.1, 1.0]})  # fmt: skip
                    store.put(*run_cell(cell, out, progress=False))
    study = Study.model_validate(
        {"name": "forecast-test", "datasets": [SPEC], "backbone": "efficientnet_lite0", "image_size": 112,
         "inits": list(INITS), "protocols": ["linear"], "budgets": {"fractions": list(FRACTIONS)},
         "targets": {"auc": [0.9, 0.999]}}
    )  # fmt: skip
    (out / "study.json").write_text(json.dumps(study.model_dump(mode="json")))
    build_report(out)
    return out


def test_report_and_cli_show_the_same_forecasts(run_dir: Path, tmp_path: Path) -> None:
    rows = forecasts(Run(run_dir))
    assert {(r["init"], r["target"]) for r in rows} == {(i, t) for i in ("scratch", "ImageNet") for t in (0.9, 0.999)}
    keys = {"dataset", "init", "protocol", "metric", "target", "labels_to_target", "labels_to_target_low",
            "labels_to_target_high", "asymptote", "holdout_budget", "holdout_predicted", "holdout_low",
            "holdout_high", "holdout_measured"}  # fmt: skip
    assert all(keys <= set(r) for r in rows)
    assert all(r["holdout_budget"] == 400 for r in rows if r["status"] != "not forecast")
    out = tmp_path / "forecast.json"
    result = CliRunner().invoke(app, ["forecast", str(run_dir), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    section = html[html.index('<section id="forecast">') :]
    for r in rows:
        if r["asymptote"] is not None:
            assert f"{r['asymptote']:.3f}" in section  # the report's asymptote is the command's
    # AUC 0.999 lies beyond what 400 labels show: marked, never silently forecast as measured
    assert all(r["status"] != "forecast" for r in rows if r["target"] == 0.999)
    assert re.search(r"To reach AUC 0\.9 \(linear", html)


def test_a_bad_target_is_a_one_line_error(run_dir: Path) -> None:
    result = CliRunner().invoke(app, ["forecast", str(run_dir), "--target", "auc=1.5"])
    assert result.exit_code == 2 and "bad --target 'auc=1.5'" in result.output
