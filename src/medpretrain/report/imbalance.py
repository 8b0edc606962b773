"""The class-imbalance section: balanced accuracy, macro F1 and per-class recall against the imbalance ratio of
the labelled subset, per initialisation and per mitigation, and whether a mitigation raised balanced accuracy.

Shown for data sets whose rows include imbalanced budgets (`imbalance: r`). The ratio on the x axis is the one
each subset actually had (largest / smallest count of the row's `n_per_class`): r for an imbalanced budget, the
natural ratio for a budget without one. Each mitigation is compared with `none` at the same init, protocol,
budget and ratio on test balanced accuracy, seed s paired with seed s, on the report's shared stratified test
resamples (`stats.paired_from_scores`), Holm-adjusted over this section's tests. Artefacts only: rows and
stored predictions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import FixedLocator, NullLocator

from medpretrain.metrics import per_class_recall, weighted_balanced_accuracy
from medpretrain.mitigations import MITIGATIONS
from medpretrain.report.figures import figure, png
from medpretrain.report.run import RESAMPLE_SEED, Run, mean, std
from medpretrain.report.text import fmt
from medpretrain.stats import ALPHA, N_BOOTSTRAP, Estimate, TestResamples, format_p, paired_from_scores
from medpretrain.summary import budget_label

_BLOCK = 100  # resamples scored at once (bounds the (block, n) temporaries on large test sets)
STYLES = ("-", "--", ":", "-.")  # one line style per mitigation, in the registry's order
PANELS = (("balanced_acc", "balanced accuracy"), ("f1_macro", "macro F1"), ("rare_recall", "rarest class recall"))


def _ratio(rec: dict[str, Any], members: list[dict[str, Any]]) -> float:
    """The labelled subset's own largest / smallest class count (the budget's r when `n_per_class` is absent)."""
    counts = [m.get("n_per_class") for m in members if m.get("n_per_class")]
    if counts:
        c = np.asarray(counts[0], dtype=float)
        return float(c.max() / max(c.min(), 1.0))
    return float(rec["imbalance"] or math.nan)


class _Scores:
    """Test balanced accuracy of each cell, on the test set and on the shared stratified resamples."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._resamples: dict[str, TestResamples] = {}
        self._cache: dict[str, tuple[float, np.ndarray] | None] = {}

    def __call__(self, row: dict[str, Any]) -> tuple[float, np.ndarray] | None:
        key = row["cell_key"]
        if key not in self._cache:
            proba = self.run.proba(row)
            y, task, _ = self.run.labels(row)
            if row["dataset"] not in self._resamples:  # the same resamples as the run's other tests
                self._resamples[row["dataset"]] = TestResamples(y, task, n_boot=N_BOOTSTRAP, seed=RESAMPLE_SEED)
            counts = self._resamples[row["dataset"]].counts
            self._cache[key] = (
                None
                if proba is None
                else (
                    float(weighted_balanced_accuracy(y, proba, task, np.ones((1, len(y))))[0]),
                    np.concatenate(
                        [
                            weighted_balanced_accuracy(y, proba, task, counts[i : i + _BLOCK])
                            for i in range(0, len(counts), _BLOCK)
                        ]
                    ),
                )
            )
        return self._cache[key]

    def compare(self, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> Estimate | None:
        """Mean over shared seeds of balanced accuracy of `a` − `b` (rows by seed), with interval and p."""
        by_seed = {m["seed"]: m for m in b}
        pairs = [(self(m), self(by_seed[m["seed"]])) for m in a if m["seed"] in by_seed]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not pairs:
            return None
        return paired_from_scores([x for x, _ in pairs], [y for _, y in pairs], metric="balanced_acc")


def _recall(run: Run, row: dict[str, Any]) -> list[float] | None:
    if row.get("recall_per_class"):
        return list(row["recall_per_class"])
    proba = run.proba(row)  # rows stored before the column existed: from their predictions
    if proba is None:
        return None
    y, task, _ = run.labels(row)
    return per_class_recall(y, proba, task)


def _points(run: Run, dataset: str) -> list[dict[str, Any]]:
    """One point per (protocol, base budget, init, mitigation, ratio): means over seeds."""
    points = []
    for rec in run.records:
        if rec["dataset"] != dataset:
            continue
        members = sorted(run.seeds_of(rec).values(), key=lambda m: m["seed"])
        mitigation = rec.get("mitigation") or "none"
        recalls = [r for r in (_recall(run, m) for m in members) if r is not None]
        points.append(
            {
                "protocol": rec["protocol"],
                "base": budget_label({**rec, "imbalance": None}),
                "init": rec["arm"].removesuffix(f" · {mitigation}"),
                "mitigation": mitigation,
                "ratio": _ratio(rec, members),
                "imbalance": rec["imbalance"],
                "members": members,
                "n_per_class": members[0].get("n_per_class"),
                "n_labeled": rec["n_labeled"],
                "n_requested": members[0].get("n_requested"),
                "balanced_acc": [m["balanced_acc"] for m in members],
                "f1_macro": [m["f1_macro"] for m in members],
                "recall": np.mean(recalls, axis=0).tolist() if recalls else None,
            }
        )
    return sorted(points, key=lambda p: (p["protocol"], p["base"], p["init"], p["mitigation"], p["ratio"]))


def _figure(points: list[dict[str, Any]], panels: tuple[tuple[str, str], ...]) -> str:
    """Balanced accuracy, macro F1 and the subset's rarest class's recall against the ratio (log scale), one
    row of panels per (protocol, base budget), colour per init, line style per mitigation."""
    groups = list(dict.fromkeys((p["protocol"], p["base"]) for p in points))
    inits = list(dict.fromkeys(p["init"] for p in points))
    palette = colormaps["tab10"]
    color = {init: palette(i % palette.N) for i, init in enumerate(inits)}
    order = ["none", *(n for n in MITIGATIONS.names() if n != "none")]  # no mitigation: the solid line
    style = {name: STYLES[i % len(STYLES)] for i, name in enumerate(order)}
    fig = figure(4.2 * len(panels), 3.0 * len(groups) + 0.8)
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    for row_axes, (protocol, base) in zip(axes, groups, strict=True):
        mine = [p for p in points if (p["protocol"], p["base"]) == (protocol, base)]
        for (init, mitigation), line in _lines(mine).items():
            x = [p["ratio"] for p in line]
            for ax, (key, _) in zip(row_axes, panels, strict=True):
                y = [_value(p, key) for p in line]
                ax.plot(x, y, style.get(mitigation, "-"), marker="o", color=color[init], label=f"{init} · {mitigation}")
        ticks = sorted({round(p["ratio"], 2) for p in mine if math.isfinite(p["ratio"])})
        for ax, (_, title) in zip(row_axes, panels, strict=True):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{t:g}" for t in ticks])
            ax.set_xlabel("largest / smallest class in the labels (log scale)")
            ax.set_title(f"{protocol} · {base} · {title}", fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False, fontsize=8,
               handlelength=4)  # fmt: skip
    return png(fig)


def _lines(points: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        lines[(p["init"], p["mitigation"])].append(p)
    return {k: sorted(v, key=lambda p: p["ratio"]) for k, v in lines.items()}


def _value(point: dict[str, Any], key: str) -> float:
    if key == "rare_recall":  # recall of the class with the fewest labels in this subset
        if point["recall"] is None or not point["n_per_class"]:
            return math.nan
        return float(point["recall"][int(np.argmin(point["n_per_class"]))])
    return mean(point[key])


def _imbalanced_datasets(run: Run) -> list[str]:
    return [d for d in run.datasets if any(r.get("imbalance") is not None for r in run.rows if r["dataset"] == d)]


def mitigation_tests(run: Run) -> list[dict[str, Any]]:
    """Each mitigation against `none` at the same protocol, budget, init and ratio, for every data set; their
    Holm adjustment is the report's one family (`Run.family`)."""
    scores = _Scores(run)
    tests = []
    for dataset in _imbalanced_datasets(run):
        points = _points(run, dataset)
        base = {(p["protocol"], p["base"], p["init"], p["imbalance"]): p for p in points if p["mitigation"] == "none"}
        for p in points:
            ref = base.get((p["protocol"], p["base"], p["init"], p["imbalance"]))
            if p["mitigation"] == "none" or ref is None:
                continue
            tests.append({"dataset": dataset, "point": p, "test": scores.compare(p["members"], ref["members"])})
    return tests


def _tests(run: Run, dataset: str) -> list[dict[str, Any]]:
    """This data set's mitigation tests, with the report-wide Holm adjustment."""
    tests = [t for t in run.imbalance_tests() if t["dataset"] == dataset]
    for t in tests:
        t["raised"] = bool(t["significant"] and t["test"].delta > 0)
    return tests


def _verdicts(tests: list[dict[str, Any]]) -> list[str]:
    """At the largest ratio tested: which mitigations raised balanced accuracy significantly, or that none did."""
    if not tests:
        return ["No mitigation was compared with none at the same ratio, so nothing is tested here."]
    top = max(t["point"]["ratio"] for t in tests)
    at_top = [t for t in tests if t["point"]["ratio"] == top]
    raised = [t for t in at_top if t["raised"]]
    if not raised:
        return [
            f"At ratio {top:g}:1 no mitigation raised test balanced accuracy significantly over none "
            f"(Holm-adjusted p < {ALPHA} over all the report's tests): no significant difference."
        ]
    return [
        f"At ratio {top:g}:1, {t['point']['mitigation']} raised test balanced accuracy of {t['point']['init']} "
        f"({t['point']['protocol']}, budget {t['point']['base']}) over none by {t['test'].delta:+.3f} "
        f"(95% interval {t['test'].low:+.3f} to {t['test'].high:+.3f}, Holm {format_p(t['p_adj'])})."
        for t in raised
    ]


def imbalance(run: Run) -> list[dict[str, Any]]:
    """The section's context: per data set with imbalanced budgets, the figure, the table and the tests."""
    out = []
    for dataset in _imbalanced_datasets(run):
        points = _points(run, dataset)
        classes = run.labels(next(r for r in run.rows if r["dataset"] == dataset))[2]
        tests = _tests(run, dataset)
        shrunk = [p for p in points if p["n_requested"] and p["n_labeled"] < p["n_requested"]]
        out.append(
            {
                "dataset": dataset,
                "src": _figure(points, PANELS),
                "classes": classes,
                "table": [_table_row(p) for p in points],
                "tests": [_test_row(t) for t in tests],
                "verdicts": _verdicts(tests),
                "shrunk": sorted(
                    {f"{p['base']} at {p['ratio']:g}:1 ({p['n_labeled']:.0f} of {p['n_requested']})" for p in shrunk}
                ),
            }
        )
    return out


def _table_row(p: dict[str, Any]) -> dict[str, Any]:
    def spread(values: list[float]) -> str:
        return fmt(mean(values)) if len(values) < 2 else f"{fmt(mean(values))} ± {fmt(std(values))}"

    return {
        "protocol": p["protocol"],
        "budget": p["base"],
        "init": p["init"],
        "mitigation": p["mitigation"],
        "ratio": f"{p['ratio']:.3g}" + ("" if p["imbalance"] is not None else " (natural)"),
        "n_per_class": " / ".join(str(c) for c in p["n_per_class"] or []) or "—",
        "seeds": len(p["members"]),
        "balanced_acc": spread(p["balanced_acc"]),
        "f1_macro": spread(p["f1_macro"]),
        "recall": [fmt(v, 2) for v in p["recall"]] if p["recall"] is not None else [],
    }


def _test_row(t: dict[str, Any]) -> dict[str, Any]:
    p, test = t["point"], t["test"]
    row = {"protocol": p["protocol"], "budget": p["base"], "init": p["init"], "mitigation": p["mitigation"],
           "ratio": f"{p['ratio']:.3g}"}  # fmt: skip
    if test is None or not math.isfinite(test.p):
        return {**row, "note": "no seed with predictions of both: no test"}
    n_boot = test.n_boot if test.n_seeds == 1 else None
    return {
        **row,
        "delta": f"{test.delta:+.3f}",
        "interval": f"{test.low:+.3f} to {test.high:+.3f}",
        "p": format_p(test.p, n_boot),
        "p_adj": format_p(t["p_adj"], n_boot),
        "seeds": test.n_seeds,
        "verdict": "significant" if t["significant"] else "no significant difference",
    }


__all__ = ["imbalance"]
