"""Learning-curve forecasts read from a run: labels to a target, asymptote, crossover, leave-last-budget-out check.

One function, `forecasts`, builds the rows that the report's section, its figure overlay, the recommendation
and `medpretrain forecast` all show, so the command and the report print the same numbers. The curves
(`medpretrain.forecast`) are fitted to the cells' test metrics on the report's shared test resamples
(`Run.scores`), with the seed draws of `stats.seed_draws`: every curve of a data set uses the same replicates,
which pairs the crossover of two inits.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from medpretrain.errors import MedpretrainError
from medpretrain.forecast import (
    DEFAULT_TARGETS,
    EXTRAPOLATION_FACTOR,
    FORECAST_METRICS,
    Holdout,
    LearningCurve,
    Measured,
    crossover,
    fit_curve,
    holdout,
)
from medpretrain.report.run import RESAMPLE_SEED, Run
from medpretrain.report.text import about, fmt
from medpretrain.stats import N_BOOTSTRAP, seed_draws

Curves = dict[tuple[str, str, str], tuple[LearningCurve, list[Measured]]]
_CACHE: weakref.WeakKeyDictionary[Run, dict[str, Curves]] = weakref.WeakKeyDictionary()
# The leave-last-budget-out refits, per run and metric: the report's section and its advice both read them.
_HOLDOUTS: weakref.WeakKeyDictionary[Run, dict[tuple[str, str, str, str], Holdout | None]] = weakref.WeakKeyDictionary()


def study_targets(run: Run) -> dict[str, list[float]]:
    """The study's `targets`, else DEFAULT_TARGETS."""
    targets = (run.study or {}).get("targets") if isinstance(run.study, dict) else None
    return {m: list(v) for m, v in targets.items()} if targets else dict(DEFAULT_TARGETS)


def curves(run: Run, metric: str) -> Curves:
    """(dataset, protocol, arm) → (fitted curve, its measured budgets), for arms measured at balanced budgets."""
    per_run = _CACHE.setdefault(run, {})
    if metric in per_run:
        return per_run[metric]
    out: Curves = {}
    for dataset in run.datasets:
        draws = _draws(run, dataset)
        for protocol in run.protocols(dataset):
            recs = [
                r for r in run.records if r["dataset"] == dataset and r["protocol"] == protocol and not r["imbalance"]
            ]  # fmt: skip  (imbalanced budgets lie on other curves)
            for arm in [a for a in run.arm_order if any(r["arm"] == a for r in recs)]:
                budgets = []
                for rec in sorted((r for r in recs if r["arm"] == arm), key=lambda r: r["n_labeled"]):
                    scored = {s: run.scores(row, metric) for s, row in run.seeds_of(rec).items()}
                    scored = {s: v for s, v in scored.items() if v is not None}
                    if scored and all(b.n_labeled != rec["n_labeled"] for b in budgets):
                        budgets.append(Measured(float(rec["n_labeled"]), scored))
                if budgets:
                    out[(dataset, protocol, arm)] = (fit_curve(budgets, draws), budgets)
    per_run[metric] = out
    return out


def _number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def forecasts(run: Run, targets: Mapping[str, list[float]] | None = None) -> list[dict[str, Any]]:
    """One row per (dataset, init, protocol, metric, target): labels to the target with its 95% interval, the
    asymptote, the leave-last-budget-out check, and `status`: forecast, extrapolation (beyond
    EXTRAPOLATION_FACTOR × the largest budget), not reached (the asymptote's interval lies below the target;
    `labels_to_target` is then null), or not forecast (`reason` says why)."""
    targets = dict(targets) if targets else study_targets(run)
    rows = []
    for metric, levels in targets.items():
        if metric not in FORECAST_METRICS:
            continue
        for (dataset, protocol, arm), (curve, budgets) in curves(run, metric).items():
            checks = _HOLDOUTS.setdefault(run, {})
            if (metric, dataset, protocol, arm) not in checks:
                checks[(metric, dataset, protocol, arm)] = holdout(budgets, _draws(run, dataset))
            check = checks[(metric, dataset, protocol, arm)]
            a, a_low, a_high = curve.asymptote()
            base = {
                "dataset": dataset, "init": arm, "protocol": protocol, "metric": metric,
                "budgets": [b.n_labeled for b in budgets], "asymptote": _number(a),
                "asymptote_low": _number(a_low), "asymptote_high": _number(a_high), "reason": curve.reason,
                "holdout_budget": check.budget if check else None,
                "holdout_predicted": _number(check.predicted) if check else None,
                "holdout_low": _number(check.low) if check else None,
                "holdout_high": _number(check.high) if check else None,
                "holdout_measured": _number(check.measured) if check else None,
            }  # fmt: skip
            for target in levels:
                n, low, high = curve.labels_to(target) if curve.ok else (math.nan,) * 3
                if not curve.ok:
                    status = "not forecast"
                elif not math.isfinite(n):
                    status = "not reached"
                elif n > EXTRAPOLATION_FACTOR * curve.n_max:
                    status = "extrapolation"
                else:
                    status = "forecast"
                rows.append({**base, "target": target, "labels_to_target": _number(n),
                             "labels_to_target_low": _number(low), "labels_to_target_high": _number(high),
                             "status": status})  # fmt: skip
    return rows


def _draws(run: Run, dataset: str) -> np.ndarray:
    return seed_draws([r["seed"] for r in run.rows if r["dataset"] == dataset], N_BOOTSTRAP, seed=RESAMPLE_SEED)


def crossovers(run: Run, metric: str = "auc") -> list[dict[str, Any]]:
    """Per (dataset, protocol), each pair of fitted arms: where the one ahead at the smallest budget stops being
    ahead, with its interval, or that it does not up to EXTRAPOLATION_FACTOR × the largest budget."""
    fitted = curves(run, metric)
    out = []
    keys = list(fitted)
    for i, (dataset, protocol, arm_a) in enumerate(keys):
        for dataset_b, protocol_b, arm_b in keys[i + 1 :]:
            if (dataset_b, protocol_b) != (dataset, protocol):
                continue
            cross = crossover(fitted[(dataset, protocol, arm_a)][0], fitted[(dataset, protocol, arm_b)][0])
            if cross is None:
                continue
            ahead, behind = (arm_a, arm_b) if cross.first_leads else (arm_b, arm_a)
            out.append({"dataset": dataset, "protocol": protocol, "metric": metric, "ahead": ahead,
                        "behind": behind, "crossover": _number(cross.n), "crossover_low": _number(cross.low),
                        "crossover_high": _number(cross.high), "searched_to": cross.n_hi})  # fmt: skip
    return out


def labels_text(n: float | None, low: float | None, high: float | None) -> str:
    if n is None:
        return "—"
    upper = "never" if high is None else about(high)
    return f"{about(n)} [{about(low) if low is not None else '—'}, {upper}]"


def _status_text(row: dict[str, Any]) -> str:
    if row["status"] == "not forecast":
        return f"not forecast: {row['reason']}"
    if row["status"] == "not reached":
        return f"not reached: the fitted asymptote {fmt(row['asymptote'])} is below the target"
    if row["status"] == "extrapolation":
        return f"extrapolation: beyond {EXTRAPOLATION_FACTOR:g}× the largest budget ({about(max(row['budgets']))})"
    return "within 4× the largest budget"


def section(run: Run) -> list[dict[str, Any]]:
    """The forecast section: per data set a table of forecasts and one of crossovers."""
    rows = forecasts(run)
    out = []
    for dataset in run.datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        table = []
        for r in mine:
            holdout_text = "—"
            if r["holdout_budget"] is not None:
                holdout_text = (f"at {about(r['holdout_budget'])}: predicted {fmt(r['holdout_predicted'])} "
                                f"[{fmt(r['holdout_low'])}, {fmt(r['holdout_high'])}], measured "
                                f"{fmt(r['holdout_measured'])}")  # fmt: skip
            table.append({"init": r["init"], "protocol": r["protocol"], "target": f"{r['metric'].upper()} "
                          f"{r['target']:g}", "labels": labels_text(r["labels_to_target"], r["labels_to_target_low"],
                          r["labels_to_target_high"]), "asymptote": f"{fmt(r['asymptote'])} [{fmt(r['asymptote_low'])}"
                          f", {fmt(r['asymptote_high'])}]", "holdout": holdout_text, "status": _status_text(r),
                          "extrapolated": r["status"] == "extrapolation"})  # fmt: skip
        cross = []
        for c in crossovers(run):
            if c["dataset"] != dataset:
                continue
            if c["crossover"] is None:
                reach = f"{EXTRAPOLATION_FACTOR:g}× the largest budget"
                text = f"no crossover up to {about(c['searched_to'])} labels ({reach})"
            else:
                text = f"about {labels_text(c['crossover'], c['crossover_low'], c['crossover_high'])} labels"
            cross.append({**c, "text": text})
        out.append({"dataset": dataset, "rows": table, "crossovers": cross})
    return out


def advice(run: Run) -> dict[str, list[str]]:
    """Per data set, one sentence per (protocol, target) for the recommendation: labels needed with each init."""
    out: dict[str, list[str]] = {d: [] for d in run.datasets}
    grouped: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in forecasts(run):
        grouped.setdefault((r["dataset"], r["protocol"], r["metric"], r["target"]), []).append(r)
    for (dataset, protocol, metric, target), rows in grouped.items():
        parts = []
        for r in rows:
            if r["status"] in ("forecast", "extrapolation"):
                mark = " (extrapolated)" if r["status"] == "extrapolation" else ""
                parts.append(f"about {about(r['labels_to_target'])} labels with {r['init']}{mark}")
            elif r["status"] == "not reached":
                parts.append(f"not within reach with {r['init']} (asymptote {fmt(r['asymptote'])})")
        if parts:
            out[dataset].append(f"To reach {metric.upper()} {target:g} ({protocol}, learning-curve forecast, "
                                f"95% intervals in the forecast section): {'; '.join(parts)}.")  # fmt: skip
    return out


def parse_targets(pairs: list[str]) -> dict[str, list[float]]:
    """`["auc=0.95", "acc=0.8"]` → `{"auc": [0.95], "acc": [0.8]}`; a bad pair is a one-line MedpretrainError."""
    out: dict[str, list[float]] = {}
    for pair in pairs:
        metric, _, level = pair.partition("=")
        metric = metric.strip().lower()
        try:
            value = float(level)
        except ValueError:
            value = math.nan
        if metric not in FORECAST_METRICS or not 0 < value < 1:
            raise MedpretrainError(
                f"bad --target '{pair}'", f"give metric=level with metric one of {', '.join(FORECAST_METRICS)} and "
                "0 < level < 1, e.g. --target auc=0.95",
            )  # fmt: skip
        out.setdefault(metric, []).append(value)
    return out


def print_table(rows: list[dict[str, Any]], console: Any) -> None:
    """The forecast rows as one rich table (the same numbers as the report's section)."""
    from rich.table import Table

    table = Table(title="learning-curve forecasts (95% intervals)")
    for column in ("dataset", "init", "protocol", "target", "labels to target", "asymptote", "leave-last-out",
                   "status"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for r in rows:
        check = "—"
        if r["holdout_budget"] is not None:
            check = (f"{about(r['holdout_budget'])}: {fmt(r['holdout_predicted'])} [{fmt(r['holdout_low'])}, "
                     f"{fmt(r['holdout_high'])}] vs {fmt(r['holdout_measured'])}")  # fmt: skip
        table.add_row(
            r["dataset"], r["init"], r["protocol"], f"{r['metric']} {r['target']:g}",
            labels_text(r["labels_to_target"], r["labels_to_target_low"], r["labels_to_target_high"]),
            f"{fmt(r['asymptote'])} [{fmt(r['asymptote_low'])}, {fmt(r['asymptote_high'])}]", check,
            _status_text(r),
        )  # fmt: skip
    console.print(table)
