"""The report's tables: results, significance tests, fine-tuning overfitting gaps and per-class results.

Each function turns the run's records and tests into plain strings for the template; all numbers are formatted
here (text.fmt), so the template only lays them out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix

from medpretrain.data.base import Task
from medpretrain.metrics import kappa_name, predict_labels
from medpretrain.report import figures
from medpretrain.report.recommend import SAME_COST, cheaper
from medpretrain.report.run import Run, finite, mean, std
from medpretrain.report.text import fmt
from medpretrain.stats import N_BOOTSTRAP, format_p


def _mean_std(rec: dict[str, Any], metric: str) -> str:
    """'0.912 ± 0.013' over seeds; just the mean for one seed (there is no spread to show)."""
    mean_, std_ = rec[f"{metric}_mean"], rec[f"{metric}_std"]
    return fmt(mean_) if rec["n_seeds"] < 2 else f"{fmt(mean_)} ± {fmt(std_)}"


def results(run: Run) -> list[dict[str, Any]]:
    """Section 2: per data set, protocol and budget, every arm's means, intervals and validation AUC."""
    tables = []
    for dataset in run.datasets:
        groups = []
        for protocol in run.protocols(dataset):
            for budget in run.budgets(dataset, protocol):
                recs = run.group(dataset, protocol, budget)
                best = recs[0]["arm"] if recs and math.isfinite(recs[0]["val_auc_mean"]) else None
                rows = []
                order = {a: i for i, a in enumerate(run.arm_order)}
                for rec in sorted(recs, key=lambda r: order[r["arm"]]):
                    rows.append(
                        {
                            "arm": rec["arm"],
                            "best": rec["arm"] == best and len(recs) > 1,
                            "n_labeled": f"{rec['n_labeled']:.0f}",
                            "n_seeds": rec["n_seeds"],
                            "image_size": rec["image_size"],
                            "val_auc": fmt(rec["val_auc_mean"]),
                            "auc": _mean_std(rec, "auc"),
                            "auc_ci": f"{fmt(rec['auc_ci_low'])}–{fmt(rec['auc_ci_high'])}",
                            "acc": _mean_std(rec, "acc"),
                            "acc_ci": f"{fmt(rec['acc_ci_low'])}–{fmt(rec['acc_ci_high'])}",
                            "balanced_acc": _mean_std(rec, "balanced_acc"),
                            "kappa": _mean_std(rec, "kappa"),
                        }
                    )
                groups.append({"protocol": protocol, "budget": budget, "rows": rows})
        task = next(r["task"] for r in run.rows if r["dataset"] == dataset)
        tables.append({"dataset": dataset, "groups": groups, "kappa": kappa_name(Task(task))})
    return tables


def significance(run: Run) -> list[dict[str, Any]]:
    """Section 3: one row per test of the family (all Holm-adjusted together), plus a note per group with nothing
    to test."""
    out = []
    family = run.family()
    for dataset in run.datasets:
        for protocol in run.protocols(dataset):
            for budget in run.budgets(dataset, protocol):
                entries = [
                    e for e in family if (e["dataset"], e["protocol"], e["budget"]) == (dataset, protocol, budget)
                ]
                base = {"dataset": dataset, "protocol": protocol, "budget": budget}
                if not entries:
                    note = "fewer than two initialisations with validation results: nothing to compare"
                    out.append({**base, "note": note})
                for e in entries:
                    test = e["test"]
                    row = {**base, "best": e["best"]["arm"], "other": e["other"]["arm"], "roles": ", ".join(e["roles"])}
                    if test is None or not math.isfinite(test.p):
                        out.append({**row, "note": "no seed with predictions of both: no test"})
                        continue
                    # A non-significant pair of unequal cost names the cheaper one, as the recommendation does.
                    cost_note = "" if e["significant"] else cheaper(e["best"], e["other"])
                    out.append(
                        {
                            **row,
                            "delta": f"{test.delta:+.3f}",
                            "interval": f"{test.low:+.3f} to {test.high:+.3f}",
                            "p": format_p(test.p, test.n_boot if test.n_seeds == 1 else None),
                            "p_adj": format_p(e["p_adj"], test.n_boot if test.n_seeds == 1 else None),
                            "significant": e["significant"],
                            "seeds": test.n_seeds,
                            "method": test.method,
                            "detectable": f"{test.detectable():.3f}",
                            "cheaper": "" if cost_note == SAME_COST else cost_note,
                        }
                    )
    return out


def method_sentence(run: Run) -> str:
    """What the tests do, in one sentence (plus one where a test had a single seed)."""
    text = (
        "Each test combines the seed-to-seed variation of the per-seed differences with the noise of the shared "
        f"test set ({N_BOOTSTRAP} stratified bootstrap resamples, the same for every initialisation and seed) in a "
        "t test (stats.paired_comparison); with few seeds it has little power."
    )
    if any(e["test"] is not None and e["test"].n_seeds == 1 for e in run.family()):
        text += (
            " With one seed there is no seed-to-seed variation to measure: such tests use the test-set bootstrap "
            "alone, are labelled so, and understate the uncertainty."
        )
    return text


def finetune(run: Run) -> list[dict[str, Any]]:
    """Section 4: fine-tuning curves, and the train − validation gap at the kept epoch per arm and budget."""
    out = []
    for dataset in run.datasets:
        rows = [r for r in run.rows if r["dataset"] == dataset and r["protocol"] == "finetune" and r.get("history")]
        if not rows:
            continue
        arms = [a for a in run.arm_order if any(r["arm"] == a for r in rows)]
        curves, shown = figures.finetune_curves(run, rows, arms)
        gaps = []
        order = {a: i for i, a in enumerate(run.arm_order)}
        for budget in run.budgets(dataset, "finetune"):
            for rec in sorted(run.group(dataset, "finetune", budget), key=lambda r: order[r["arm"]]):
                members = list(run.seeds_of(rec).values())
                over = [(m.get("extra") or {}).get("overfitting") or {} for m in members]
                gap_acc = [o.get("gap_acc_best") for o in over]
                gap_loss = [o.get("gap_loss_best") for o in over]
                gaps.append(
                    {
                        "arm": rec["arm"],
                        "budget": budget,
                        "n_labeled": rec["n_labeled"],
                        "gap_acc": mean(gap_acc),
                        "gap_acc_std": std(gap_acc),
                        "gap_loss": mean(gap_loss),
                        "gap_loss_std": std(gap_loss),
                        "n": len(finite(gap_acc)),
                    }
                )
        out.append(
            {
                "dataset": dataset,
                "curves": curves,
                "shown": shown,
                "gap_chart": figures.gap_chart(run, gaps),
                "gaps": [
                    {
                        **g,
                        "gap_acc": fmt(g["gap_acc"]),
                        "gap_acc_std": fmt(g["gap_acc_std"]),
                        "gap_loss": fmt(g["gap_loss"]),
                        "gap_loss_std": fmt(g["gap_loss_std"]),
                        "n_labeled": f"{g['n_labeled']:.0f}",
                    }
                    for g in gaps
                ],
            }
        )
    return out


def _class_counts(run: Run, rec: dict[str, Any], y: np.ndarray, task: Task, n_classes: int) -> tuple[Any, int]:
    """Confusion counts of one record summed over its seeds with predictions, and how many seeds that was."""
    total = None
    used = 0
    for row in run.seeds_of(rec).values():
        proba = run.proba(row)
        if proba is None:
            continue
        pred = predict_labels(proba, task)
        if task is Task.MULTILABEL:
            cm = multilabel_confusion_matrix(y, pred)
        else:
            cm = confusion_matrix(y, pred, labels=list(range(n_classes)))
        total = cm if total is None else total + cm
        used += 1
    return total, used


def per_class(run: Run) -> list[dict[str, Any]]:
    """Section 7: per-class recall (per-label recall / specificity when multi-label) of every arm that shares the
    best's protocol and largest budget, with the best's confusion matrix."""
    out = []
    for dataset in run.datasets:
        budgets = run.budgets(dataset)
        candidates = [r for r in run.group(dataset, None, budgets[-1]) if math.isfinite(r["val_auc_mean"])]
        if not candidates:
            continue
        best = candidates[0]
        peers = run.group(dataset, best["protocol"], best["budget"])
        y, task, classes = run.labels(next(iter(run.seeds_of(best).values())))
        counts: dict[str, np.ndarray] = {}
        seeds_used: dict[str, int] = {}
        for rec in peers:
            total, used = _class_counts(run, rec, y, task, len(classes))
            if total is not None:
                counts[rec["arm"]] = total
                seeds_used[rec["arm"]] = used
        if best["arm"] not in counts:
            continue
        arms = [r["arm"] for r in peers if r["arm"] in counts]
        table = []
        for c, name in enumerate(classes):
            entry: dict[str, Any] = {"cls": name, "values": []}
            for arm in arms:
                cm = counts[arm]
                if task is Task.MULTILABEL:
                    tn, fp, fn, tp = cm[c].ravel()
                    recall = tp / (tp + fn) if tp + fn else math.nan
                    spec = tn / (tn + fp) if tn + fp else math.nan
                    entry["values"].append(f"{fmt(recall)} / {fmt(spec)}")
                else:
                    support = cm[c].sum()
                    entry["values"].append(fmt(cm[c, c] / support if support else math.nan))
            entry["support"] = int(y[:, c].sum()) if task is Task.MULTILABEL else int((y == c).sum())
            table.append(entry)
        matrix = None
        if task is not Task.MULTILABEL:
            title = f"{best['arm']} · {best['protocol']} · {best['budget']}"
            matrix = figures.confusion(counts[best["arm"]], classes, title)
        out.append(
            {
                "dataset": dataset,
                "best": best["arm"],
                "protocol": best["protocol"],
                "budget": best["budget"],
                "auc": _mean_std(best, "auc"),
                "seeds": seeds_used[best["arm"]],
                "arms": arms,
                "multilabel": task is Task.MULTILABEL,
                "table": table,
                "matrix": matrix,
            }
        )
    return out
