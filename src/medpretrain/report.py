"""The study report: `<out>/report.html`, one self-contained file built from a run directory.

Everything comes from what the runner left behind — the results store, test-set predictions, the kept
fine-tuned networks, cached frozen features, `study.json` and `run_log.jsonl` — so the report can be rebuilt
at any time, also from a study that is still running or was killed (it shows what exists). Figures are
matplotlib PNGs inlined as data URIs and the CSS is inline; there are no scripts and no external requests.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, multilabel_confusion_matrix
from tqdm.auto import tqdm

from medpretrain.data import load_dataset
from medpretrain.data.base import Dataset, Task
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import kappa_name, predict_labels
from medpretrain.stats import ALPHA, N_BOOTSTRAP, Estimate, TestResamples, combine, format_p, holm, paired_from_scores
from medpretrain.store import Store
from medpretrain.summary import budget_label, summarize

REPORT_NAME = "report.html"
TEMPLATE = "report.html.j2"
SECTIONS: tuple[tuple[str, str], ...] = (
    ("curves", "Label-efficiency curves"),
    ("table", "Results table"),
    ("significance", "Is the best better? Seed-aware paired tests"),
    ("finetune", "Fine-tuning curves and overfitting"),
    ("gradcam", "Grad-CAM"),
    ("embeddings", "Frozen-feature embeddings (UMAP)"),
    ("per_class", "Per-class results of the best initialisation"),
    ("recommendation", "Recommendation"),
    ("config", "Study configuration and provenance"),
)
GRADCAM_CORRECT = 4
GRADCAM_WRONG = 4
UMAP_MAX_POINTS = 2000
UMAP_MIN_POINTS = 10
# Every cell of a data set is scored on the same stratified test resamples: all arms and seeds share one test
# set, so its noise is shared too (stats.TestResamples).
RESAMPLE_SEED = 0
DPI = 96
# The cost model of the recommendation. What it costs to obtain an init: only a self-supervised pre-training of
# your own costs compute before evaluation (ImageNet weights are downloaded; a checkpoint you brought exists).
INIT_COST = {"scratch": 0, "imagenet": 0, "checkpoint": 0, "pretrained": 1}
# What a protocol costs to run, cheapest first: kNN fits nothing, a linear probe fits a head on frozen features,
# fine-tuning trains the whole network. Compute per image also grows with the image size (pixels).
PROTOCOL_COST = {"knn": 0, "linear": 1, "finetune": 2}
PROTOCOL_PHRASES = {"knn": "kNN on frozen features fits nothing", "linear": "a linear probe trains no network"}
INIT_PHRASES = {"ImageNet": "ImageNet transfer", "scratch": "training from scratch"}
ROLES = ("runner-up", "ImageNet transfer", "scratch")  # what the best of a group is compared with


def init_kind(row: dict[str, Any]) -> str:
    """A row's `init_kind`; rows stored before that column existed are told apart by their init key (our own
    pre-training checkpoints are keyed `pre-…`, other files `ckpt-…`)."""
    if row.get("init_kind"):
        return str(row["init_kind"])
    key = str(row.get("init_key", ""))
    return "pretrained" if key.startswith("pre-") else "checkpoint" if key.startswith("ckpt-") else key


# ------------------------------------------------------------------------------------------ run contents


def _finite(values: Iterable[Any]) -> np.ndarray:
    arr = np.array([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def _mean(values: Iterable[Any]) -> float:
    arr = _finite(values)
    return float(arr.mean()) if len(arr) else float("nan")


def _std(values: Iterable[Any]) -> float:
    arr = _finite(values)
    return float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def _sort_value(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _short(text: str, n: int = 14) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut off by a killed writer: the others still count
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _arm_labels(rows: list[dict[str, Any]]) -> dict[tuple, str]:
    """Display label per (dataset, init, backbone, image_size): the init label, plus backbone and/or image
    size only where one init label covers several of them in a data set (otherwise they would merge)."""
    variants: dict[tuple[str, str], set[tuple[str, int]]] = defaultdict(set)
    for r in rows:
        variants[(r["dataset"], r["init"])].add((r["backbone"], r["image_size"]))
    labels = {}
    for (dataset, init), combos in variants.items():
        backbones = {b for b, _ in combos}
        sizes = {s for _, s in combos}
        for backbone, size in combos:
            extra = ([backbone] if len(backbones) > 1 else []) + ([f"{size} px"] if len(sizes) > 1 else [])
            labels[(dataset, init, backbone, size)] = f"{init} ({', '.join(extra)})" if extra else init
    return labels


def _arm_key(r: dict[str, Any]) -> tuple:
    return (r["dataset"], r["init"], r["backbone"], r["image_size"])


class _Run:
    """A run directory's rows, grouped, plus memoised test labels, predictions and bootstrap results."""

    def __init__(self, out_dir: Path, *, progress: bool = False) -> None:
        self.out = out_dir
        self.progress = progress
        if not (out_dir / "results.db").exists():
            raise MedpretrainError(
                f"no results in {out_dir} (results.db is missing)",
                "give the --out directory of a study run with `medpretrain run`",
            )
        self.store = Store(out_dir)
        rows = self.store.rows()
        if not rows:
            raise MedpretrainError(
                f"{out_dir}/results.db holds no finished cells yet", "wait until the first cells of the study finish"
            )
        labels = _arm_labels(rows)
        self.rows = [{**r, "arm": labels[_arm_key(r)], "budget": budget_label(r)} for r in rows]
        self.study = _read_json(out_dir / "study.json")
        self.run_log = _read_jsonl(out_dir / "run_log.jsonl")
        self.arm_order = self._arm_order()
        palette = colormaps["tab10" if len(self.arm_order) <= 10 else "tab20"]
        self.colors = {arm: palette(i % palette.N) for i, arm in enumerate(self.arm_order)}
        # (dataset, protocol, budget, arm) → seed → row; a later row of the same seed replaces an earlier one.
        self.cells: dict[tuple[str, str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in self.rows:
            self.cells[(r["dataset"], r["protocol"], r["budget"], r["arm"])][r["seed"]] = r
        self._datasets: dict[tuple, Dataset] = {}
        self._proba: dict[str, np.ndarray | None] = {}
        self._labels: dict[str, tuple[np.ndarray, Task, list[str]]] = {}
        self._resamples: dict[str, TestResamples] = {}
        self._scores: dict[tuple[str, str], tuple[float, np.ndarray] | None] = {}
        self._family: list[dict[str, Any]] | None = None
        self.notes: list[str] = []
        if any(r.get("val_auc") is None for r in self.rows):
            self.notes.append(
                "Some cells were stored by an older version without validation metrics: they are ranked last, "
                "so no best is chosen from them; re-run them (delete their rows) to rank them on validation."
            )

    def _arm_order(self) -> list[str]:
        """scratch, then ImageNet, then the rest in the order the study ran them (its own init order)."""
        seen: list[str] = []
        for r in self.rows:
            if r["arm"] not in seen:
                seen.append(r["arm"])
        rank = {"scratch": 0, "ImageNet": 1}
        return sorted(seen, key=lambda a: (rank.get(a.split(" (")[0], 2), seen.index(a)))

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        return self._records()

    def _records(self) -> list[dict[str, Any]]:
        """One record per (dataset, protocol, budget, arm): means over seeds, the 95% interval of each mean over
        seeds (seed and test-set variance: stats.combine), and the mean validation AUC that ranks it."""
        labels = _arm_labels(self.rows)
        out = []
        for rec in summarize(self.rows):
            rec["arm"] = labels[_arm_key(rec)]
            members = list(self.cells[(rec["dataset"], rec["protocol"], rec["budget"], rec["arm"])].values())
            for metric in ("auc", "acc"):
                estimate = self.mean_estimate(members, metric)
                rec[f"{metric}_ci_low"] = estimate.low if estimate else math.nan
                rec[f"{metric}_ci_high"] = estimate.high if estimate else math.nan
            val = [m.get("val_auc") for m in members]
            rec["val_auc_mean"] = _mean(val) if all(v is not None for v in val) else math.nan
            rec["seeds"] = sorted(m["seed"] for m in members)
            rec["init_kind"] = init_kind(members[0])
            out.append(rec)
        return out

    # -- grouping helpers

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r["dataset"] for r in self.rows))

    def protocols(self, dataset: str) -> list[str]:
        present = {r["protocol"] for r in self.rows if r["dataset"] == dataset}
        return sorted(present, key=lambda p: (PROTOCOL_COST.get(p, 9), p))

    def budgets(self, dataset: str, protocol: str | None = None) -> list[str]:
        """Budget labels of a data set, fewest labels first."""
        recs = [r for r in self.records if r["dataset"] == dataset and protocol in (None, r["protocol"])]
        sizes: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            sizes[r["budget"]].append(r["n_labeled"])
        return sorted(sizes, key=lambda b: float(np.mean(sizes[b])))

    def group(self, dataset: str, protocol: str | None, budget: str) -> list[dict[str, Any]]:
        """Records of one (dataset, protocol, budget) — all protocols when None — best mean *validation* AUC
        first (the test split never chooses), then cheaper protocols, then the init order."""
        recs = [
            r
            for r in self.records
            if r["dataset"] == dataset and r["budget"] == budget and protocol in (None, r["protocol"])
        ]
        order = {a: i for i, a in enumerate(self.arm_order)}
        return sorted(
            recs,
            key=lambda r: (-_sort_value(r["val_auc_mean"]), PROTOCOL_COST.get(r["protocol"], 9), order[r["arm"]]),
        )

    def seeds_of(self, rec: dict[str, Any]) -> dict[int, dict[str, Any]]:
        return self.cells[(rec["dataset"], rec["protocol"], rec["budget"], rec["arm"])]

    # -- data and predictions

    def dataset(self, row: dict[str, Any], *, image_size: int | None = None) -> Dataset:
        """The row's data set at its own image size (or `image_size`), splits as the study saw them."""
        size = int(image_size or row["image_size"])
        key = (row["config"]["dataset"], row["size"], size)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(
                row["config"]["dataset"], size=row["size"], image_size=size, split_dir=self.out / "splits"
            )
        return self._datasets[key]

    def labels(self, row: dict[str, Any]) -> tuple[np.ndarray, Task, list[str]]:
        """Test labels do not depend on the image size: one load per data set (at its smallest image size in
        the study, the cheapest to hold) serves every arm."""
        if row["dataset"] not in self._labels:
            smallest = min((r for r in self.rows if r["dataset"] == row["dataset"]), key=lambda r: r["image_size"])
            ds = self.dataset(smallest)
            self._labels[row["dataset"]] = (ds.labels["test"], ds.task, ds.classes)
        return self._labels[row["dataset"]]

    def proba(self, row: dict[str, Any]) -> np.ndarray | None:
        key = row["cell_key"]
        if key not in self._proba:
            proba = self.store.predictions(key)
            y, _, _ = self.labels(row)
            if proba is not None and len(proba) != len(y):
                self.notes.append(f"predictions of {row['arm']} ({key}) do not match the test split; left out")
                proba = None
            self._proba[key] = proba
        return self._proba[key]

    def scores(self, row: dict[str, Any], metric: str) -> tuple[float, np.ndarray] | None:
        """(metric on the test set, metric on each shared test resample) of one cell, or None without
        predictions; the table, the tests and the recommendation use the same cells, so each is scored once."""
        key = (row["cell_key"], metric)
        if key not in self._scores:
            proba = self.proba(row)
            y, task, _ = self.labels(row)
            if row["dataset"] not in self._resamples:
                self._resamples[row["dataset"]] = TestResamples(y, task, n_boot=N_BOOTSTRAP, seed=RESAMPLE_SEED)
            self._scores[key] = None if proba is None else self._resamples[row["dataset"]].scores(proba, metric)
        return self._scores[key]

    def mean_estimate(self, members: list[dict[str, Any]], metric: str) -> Estimate | None:
        """The mean over these seeds' cells with its seed-and-test-set interval (None without predictions)."""
        scored = [s for s in (self.scores(m, metric) for m in members) if s is not None]
        if not scored:
            return None
        return combine([p for p, _ in scored], np.stack([b for _, b in scored]), metric=metric)

    def compare(self, a: dict[str, Any], b: dict[str, Any], metric: str = "auc") -> Estimate | None:
        """`stats.paired_from_scores` of record `a` against record `b`, seed s paired with seed s, over the
        seeds both have with predictions."""
        seeds_a, seeds_b = self.seeds_of(a), self.seeds_of(b)
        shared = sorted(set(seeds_a) & set(seeds_b))
        pairs = [(self.scores(seeds_a[s], metric), self.scores(seeds_b[s], metric)) for s in shared]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not pairs:
            return None
        return paired_from_scores([x for x, _ in pairs], [y for _, y in pairs], metric=metric)

    def family(self) -> list[dict[str, Any]]:
        """Every test the report shows, Holm-adjusted together: per (dataset, protocol, budget) the best arm on
        validation against the runner-up, ImageNet transfer and training from scratch (each once, where present)."""
        if self._family is not None:
            return self._family
        family = []
        for dataset in self.datasets:
            for protocol in self.protocols(dataset):
                for budget in self.budgets(dataset, protocol):
                    ranked = [r for r in self.group(dataset, protocol, budget) if math.isfinite(r["val_auc_mean"])]
                    if len(ranked) < 2:
                        continue
                    best, others = ranked[0], ranked[1:]
                    candidates = {
                        "runner-up": others[0],
                        "ImageNet transfer": next((r for r in others if r["init_kind"] == "imagenet"), None),
                        "scratch": next((r for r in others if r["init_kind"] == "scratch"), None),
                    }
                    against: dict[str, dict[str, Any]] = {}
                    roles: dict[str, list[str]] = defaultdict(list)
                    for role in ROLES:
                        rec = candidates[role]
                        if rec is not None:
                            against.setdefault(rec["arm"], rec)
                            roles[rec["arm"]].append(role)
                    for arm, other in against.items():
                        test = self.compare(best, other)
                        family.append(
                            {"dataset": dataset, "protocol": protocol, "budget": budget, "best": best,
                             "other": other, "roles": roles[arm], "test": test}
                        )  # fmt: skip
        adjusted = holm([e["test"].p if e["test"] is not None else math.nan for e in family])
        for entry, p_adj in zip(family, adjusted, strict=True):
            entry["p_adj"] = p_adj
            entry["significant"] = bool(math.isfinite(p_adj) and p_adj < ALPHA)
        self._family = family
        return family

    def tested(self, best: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
        return next((e for e in self.family() if e["best"] is best and e["other"] is other), None)


# ------------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    """The figure as a PNG data URI (no 'Software' text chunk, so equal figures give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _log_ticks(ax: Any, values: Iterable[float]) -> None:
    ticks = sorted({float(v) for v in values if v and math.isfinite(v)})
    ax.set_xscale("log")
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:.0f}" for t in ticks])
        if len(ticks) == 1:
            ax.set_xlim(ticks[0] / 2, ticks[0] * 2)


def _legend(fig: Figure, run: _Run, arms: Iterable[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=run.colors[a], marker="o", label=a) for a in arms]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)


# ------------------------------------------------------------------------------------------ sections


def _curves(run: _Run) -> list[dict[str, Any]]:
    figures = []
    for dataset in run.datasets:
        protocols = run.protocols(dataset)
        fig = _figure(10, 3.0 * len(protocols) + 0.6)
        axes = fig.subplots(len(protocols), 2, squeeze=False)
        arms_seen = []
        for row_axes, protocol in zip(axes, protocols, strict=True):
            recs = [r for r in run.records if r["dataset"] == dataset and r["protocol"] == protocol]
            for arm in run.arm_order:
                for imbalance in sorted({r["imbalance"] or 0 for r in recs}):
                    line = sorted(
                        (r for r in recs if r["arm"] == arm and (r["imbalance"] or 0) == imbalance),
                        key=lambda r: r["n_labeled"],
                    )
                    if not line:
                        continue
                    arms_seen.append(arm)
                    x = np.array([r["n_labeled"] for r in line])
                    style = "-" if not imbalance else "--"
                    for ax, metric in zip(row_axes, ("auc", "acc"), strict=True):
                        mean = np.array([r[f"{metric}_mean"] for r in line])
                        low = np.array([r[f"{metric}_ci_low"] for r in line])
                        high = np.array([r[f"{metric}_ci_high"] for r in line])
                        color = run.colors[arm]
                        ax.plot(x, mean, style, marker="o", color=color)
                        ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
                        ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="none", ecolor=color, capsize=3)
            for ax, metric in zip(row_axes, ("AUC", "ACC"), strict=True):
                _log_ticks(ax, [r["n_labeled"] for r in recs])
                ax.set_xlabel("labeled training images (log scale)")
                ax.set_ylabel(f"test {metric}")
                ax.set_title(f"{protocol} · {metric}", fontsize=10)
                ax.grid(alpha=0.3)
        _legend(fig, run, dict.fromkeys(a for a in run.arm_order if a in arms_seen))
        imbalanced = any(r["imbalance"] for r in run.records if r["dataset"] == dataset)
        figures.append(
            {
                "title": dataset,
                "src": _png(fig),
                "imbalanced": imbalanced,
            }
        )
    return figures


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{round(x, digits) + 0.0:.{digits}f}"  # + 0.0 turns a rounded -0.0 into 0.0: no "-0.000"


def _mean_std(rec: dict[str, Any], metric: str) -> str:
    """'0.912 ± 0.013' over seeds; just the mean for one seed (there is no spread to show)."""
    mean, std = rec[f"{metric}_mean"], rec[f"{metric}_std"]
    return _fmt(mean) if rec["n_seeds"] < 2 else f"{_fmt(mean)} ± {_fmt(std)}"


def _table(run: _Run) -> list[dict[str, Any]]:
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
                            "val_auc": _fmt(rec["val_auc_mean"]),
                            "auc": _mean_std(rec, "auc"),
                            "auc_ci": f"{_fmt(rec['auc_ci_low'])}–{_fmt(rec['auc_ci_high'])}",
                            "acc": _mean_std(rec, "acc"),
                            "acc_ci": f"{_fmt(rec['acc_ci_low'])}–{_fmt(rec['acc_ci_high'])}",
                            "balanced_acc": _mean_std(rec, "balanced_acc"),
                            "kappa": _mean_std(rec, "kappa"),
                        }
                    )
                groups.append({"protocol": protocol, "budget": budget, "rows": rows})
        task = next(r["task"] for r in run.rows if r["dataset"] == dataset)
        tables.append({"dataset": dataset, "groups": groups, "kappa": kappa_name(Task(task))})
    return tables


def _significance(run: _Run) -> list[dict[str, Any]]:
    """One row per test of the family (all Holm-adjusted together), plus a note per group with nothing to test."""
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
                        }
                    )
    return out


def _finetune(run: _Run) -> list[dict[str, Any]]:
    out = []
    for dataset in run.datasets:
        rows = [r for r in run.rows if r["dataset"] == dataset and r["protocol"] == "finetune" and r.get("history")]
        if not rows:
            continue
        arms = [a for a in run.arm_order if any(r["arm"] == a for r in rows)]
        fig = _figure(10, 3.6)
        ax_loss, ax_acc = fig.subplots(1, 2)
        shown = []
        for arm in arms:
            mine = [r for r in rows if r["arm"] == arm]
            most = max(r["n_labeled"] for r in mine)
            row = min((r for r in mine if r["n_labeled"] == most), key=lambda r: r["seed"])
            shown.append(f"{arm}: {row['budget']} ({row['n_labeled']} labels), seed {row['seed']}")
            hist = row["history"]
            epochs = [h.get("epoch") for h in hist]
            best_epoch = (row.get("chosen") or {}).get("epoch")
            for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
                for side, style in (("train", "-"), ("val", "--")):
                    values = [h.get(f"{side}_{metric}") for h in hist]
                    values = [np.nan if v is None else v for v in values]
                    ax.plot(epochs, values, style, marker="o", markersize=3, color=run.colors[arm])
                if best_epoch in epochs:
                    v = hist[epochs.index(best_epoch)].get(f"val_{metric}")
                    if v is not None:
                        ax.plot([best_epoch], [v], marker="*", markersize=12, color=run.colors[arm], linestyle="")
        for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.set_title(f"{name} (solid: train, dashed: validation, ★: kept epoch)", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        _legend(fig, run, arms)
        curves = _png(fig)

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
                        "gap_acc": _mean(gap_acc),
                        "gap_acc_std": _std(gap_acc),
                        "gap_loss": _mean(gap_loss),
                        "gap_loss_std": _std(gap_loss),
                        "n": len(_finite(gap_acc)),
                    }
                )
        out.append(
            {
                "dataset": dataset,
                "curves": curves,
                "shown": shown,
                "gap_chart": _gap_chart(run, dataset, gaps),
                "gaps": [
                    {
                        **g,
                        "gap_acc": _fmt(g["gap_acc"]),
                        "gap_acc_std": _fmt(g["gap_acc_std"]),
                        "gap_loss": _fmt(g["gap_loss"]),
                        "gap_loss_std": _fmt(g["gap_loss_std"]),
                        "n_labeled": f"{g['n_labeled']:.0f}",
                    }
                    for g in gaps
                ],
            }
        )
    return out


def _gap_chart(run: _Run, dataset: str, gaps: list[dict[str, Any]]) -> str | None:
    budgets = list(dict.fromkeys(g["budget"] for g in gaps))
    arms = [a for a in run.arm_order if any(g["arm"] == a for g in gaps)]
    if not any(math.isfinite(g["gap_acc"]) for g in gaps):
        return None
    fig = _figure(min(4.0 + 0.5 * len(budgets) * len(arms), 10.0), 3.4)
    ax = fig.subplots()
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        heights = [next((g["gap_acc"] for g in gaps if g["arm"] == arm and g["budget"] == b), np.nan) for b in budgets]
        errs = [next((g["gap_acc_std"] for g in gaps if g["arm"] == arm and g["budget"] == b), np.nan) for b in budgets]
        positions = np.arange(len(budgets)) + (i - (len(arms) - 1) / 2) * width
        ax.bar(positions, heights, width, color=run.colors[arm], label=arm)
        ax.errorbar(positions, heights, yerr=np.nan_to_num(errs), fmt="none", ecolor="black", capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(budgets)), budgets)
    ax.set_xlabel("label budget")
    ax.set_ylabel("train − validation accuracy")
    ax.set_title("overfitting gap at the kept epoch (mean ± std over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, run, arms)
    return _png(fig)


def _pick_cases(y: np.ndarray, proba: np.ndarray, task: Task) -> list[int]:
    """Test images to explain: up to 4 correct and 4 wrong per the best network, most confident first,
    taken round-robin over true classes so several classes show."""
    pred = predict_labels(proba, task)
    if task is Task.MULTILABEL:
        correct = (pred == y).all(axis=1)
        confidence = np.abs(proba - 0.5).mean(axis=1)
        group = np.where(y.any(axis=1), y.argmax(axis=1), -1)
    else:
        correct = pred == y
        confidence = proba.max(axis=1)
        group = y
    chosen: list[int] = []
    for want, limit in ((True, GRADCAM_CORRECT), (False, GRADCAM_WRONG)):
        queues = [
            [int(i) for i in sorted(np.flatnonzero((correct == want) & (group == g)), key=lambda i: -confidence[i])]
            for g in np.unique(group)
        ]
        taken: list[int] = []
        while len(taken) < limit and any(queues):
            for q in queues:
                if q and len(taken) < limit:
                    taken.append(q.pop(0))
        chosen.extend(taken)
    return chosen


def _label_text(labels: np.ndarray | int, classes: list[str], task: Task) -> str:
    if task is Task.MULTILABEL:
        names = [classes[j] for j in np.flatnonzero(labels)]
        return _short("+".join(_short(n, 8) for n in names) or "none", 16)
    return _short(classes[int(labels)])


def _models(run: _Run) -> dict[str, list[tuple[dict[str, Any], Path]]]:
    """Kept fine-tuned networks per data set, one per arm (most labels, then lowest seed)."""
    per_arm: dict[tuple[str, str], tuple[dict[str, Any], Path]] = {}
    by_key = {r["cell_key"]: r for r in run.rows}
    for path in sorted((run.out / "models").glob("*.pt")):
        row = by_key.get(path.stem)
        if row is None:
            continue  # the network of a cell killed before its row was committed
        key = (row["dataset"], row["arm"])
        current = per_arm.get(key)
        if current is None or (-row["n_labeled"], row["seed"]) < (-current[0]["n_labeled"], current[0]["seed"]):
            per_arm[key] = (row, path)
    out: dict[str, list[tuple[dict[str, Any], Path]]] = defaultdict(list)
    for arm in run.arm_order:
        for (dataset, a), value in per_arm.items():
            if a == arm:
                out[dataset].append(value)
    return out


def _gradcam(run: _Run) -> list[dict[str, Any]]:
    from medpretrain.explain import feature_grid, gradcam_maps, overlay  # pulls in OpenCV: only when needed
    from medpretrain.train import load_classifier

    out = []
    for dataset, models in _models(run).items():
        # Mean validation AUC (over seeds) of each kept network's arm and budget decides whose predictions pick cases.
        rec_auc = {
            (r["arm"], r["budget"]): r["val_auc_mean"]
            for r in run.records
            if r["dataset"] == dataset and r["protocol"] == "finetune"
        }
        usable = [(row, path) for row, path in models if run.proba(row) is not None]
        if not usable:
            continue
        best_row, _ = max(usable, key=lambda m: _sort_value(rec_auc.get((m[0]["arm"], m[0]["budget"]), math.nan)))
        y, task, classes = run.labels(best_row)
        best_proba = run.proba(best_row)
        assert best_proba is not None
        idx = _pick_cases(y, best_proba, task)
        if not idx:
            continue
        fig = _figure(1.3 * len(idx) + 1.2, 1.6 * (len(usable) + 1) + 0.3)
        axes = fig.subplots(len(usable) + 1, len(idx), squeeze=False)
        flat: list[str] = []  # arms whose last feature map is a single cell: Grad-CAM cannot localise there
        first = run.dataset(usable[0][0]).images["test"][idx].numpy()
        for j, i in enumerate(idx):
            img = first[j]
            # vmin/vmax: show the stored intensities, not a per-image contrast stretch.
            axes[0, j].imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
            axes[0, j].set_title(f"true: {_label_text(y[i], classes, task)}", fontsize=7)
        axes[0, 0].set_ylabel("image", fontsize=8)
        for k, (row, path) in enumerate(usable, start=1):
            try:
                model, meta = load_classifier(path)
            except MedpretrainError as err:
                run.notes.append(f"Grad-CAM: {err}")
                continue
            images = run.dataset(row, image_size=meta["image_size"]).images["test"][idx]
            proba = run.proba(row)
            assert proba is not None
            pred = predict_labels(proba[idx], task)
            targets = proba[idx].argmax(axis=1)  # the class each network itself scored highest
            maps = gradcam_maps(model, images, targets.tolist())
            if feature_grid(model, images[0]) == (1, 1):
                flat.append(f"{row['arm']} ({meta['image_size']} px)")
            for j, i in enumerate(idx):
                ok = bool(np.all(pred[j] == y[i]))
                axes[k, j].imshow(overlay(images[j].numpy(), maps[j]))
                axes[k, j].set_title(
                    f"{_label_text(y[i], classes, task)}\n→ {_label_text(pred[j], classes, task)} {'✓' if ok else '✗'}",
                    fontsize=7,
                    color="#1a7f37" if ok else "#c0392b",
                )
            axes[k, 0].set_ylabel(_short(row["arm"], 18), fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        best_pred = predict_labels(best_proba[idx], task)
        n_correct = int(sum(bool(np.all(best_pred[j] == y[i])) for j, i in enumerate(idx)))
        out.append(
            {
                "dataset": dataset,
                "src": _png(fig),
                "arms": [row["arm"] for row, _ in usable],
                "budget": best_row["budget"],
                "chooser": best_row["arm"],
                "n_correct": n_correct,
                "n_wrong": len(idx) - n_correct,
                "flat": flat,
            }
        )
    return out


def _embeddings(run: _Run) -> list[dict[str, Any]]:
    from medpretrain.explain import umap_embedding  # umap-learn imports numba: only when there is work
    from medpretrain.features import FeatureCache
    from medpretrain.inits import parse_init
    from medpretrain.runtime import cache_root

    cache = FeatureCache(cache_root(run.out))
    out = []
    for dataset in run.datasets:
        arms: dict[str, dict[str, Any]] = {}
        for r in run.rows:
            if r["dataset"] == dataset:
                arms.setdefault(r["arm"], r)
        y, task, classes = run.labels(next(iter(arms.values())))
        n = len(y)
        subset = np.sort(np.random.default_rng(0).permutation(n)[:UMAP_MAX_POINTS]) if n > UMAP_MAX_POINTS else None
        points = np.arange(n) if subset is None else subset
        if len(points) < UMAP_MIN_POINTS:
            out.append(
                {"dataset": dataset, "note": f"only {len(points)} test images: too few for an embedding", "missing": []}
            )
            continue
        panels, missing = [], []
        for arm in run.arm_order:
            if arm not in arms:
                continue
            row = arms[arm]
            try:
                init = parse_init(row["config"]["init"])
                feats = cache.get(
                    init, row["backbone"], bool(row["small_stem"]), run.dataset(row), progress=run.progress
                )
            except MedpretrainError as err:
                missing.append(f"{arm}: {err}")
                continue
            panels.append((arm, umap_embedding(feats["test"][points], seed=0)))
        if not panels:
            out.append({"dataset": dataset, "note": "no frozen features available", "missing": missing})
            continue
        if task is Task.MULTILABEL:
            colour = np.where(y.any(axis=1), y.argmax(axis=1), -1)[points]
            names = {-1: "no label", **dict(enumerate(classes))}
        else:
            colour = y[points]
            names = dict(enumerate(classes))
        cols = min(3, len(panels))
        rows_n = math.ceil(len(panels) / cols)
        fig = _figure(3.6 * cols, 3.4 * rows_n + 0.5)
        axes = fig.subplots(rows_n, cols, squeeze=False)
        palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
        for ax, (arm, emb) in zip(axes.flat, panels, strict=False):
            for c in sorted(names):
                sel = colour == c
                if sel.any():
                    ax.scatter(emb[sel, 0], emb[sel, 1], s=4, alpha=0.7, color=palette(int(c) % palette.N), label=None)
            ax.set_title(arm, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=palette(int(c) % palette.N), marker="o", linestyle="", label=_short(names[c], 24))
            for c in sorted(names)
            if (colour == c).any()
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
        out.append({"dataset": dataset, "src": _png(fig), "n_points": len(points), "n_test": n, "missing": missing})
    return out


def _per_class(run: _Run) -> list[dict[str, Any]]:
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
                    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
                total = cm if total is None else total + cm
                used += 1
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
                    entry["values"].append(f"{_fmt(recall)} / {_fmt(spec)}")
                else:
                    support = cm[c].sum()
                    entry["values"].append(_fmt(cm[c, c] / support if support else math.nan))
            entry["support"] = int(y[:, c].sum()) if task is Task.MULTILABEL else int((y == c).sum())
            table.append(entry)
        matrix = None
        if task is not Task.MULTILABEL:
            fig = _figure(min(3 + 0.45 * len(classes), 9), min(2.6 + 0.4 * len(classes), 8))
            ax = fig.subplots()
            ConfusionMatrixDisplay(counts[best["arm"]], display_labels=[_short(c, 16) for c in classes]).plot(
                ax=ax, colorbar=False, xticks_rotation=45, values_format="d", cmap="Blues"
            )
            ax.set_title(f"{best['arm']} · {best['protocol']} · {best['budget']}", fontsize=10)
            matrix = _png(fig)
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


def _about(x: float) -> str:
    """Two significant digits without scientific notation: 0.42, 7.5, 25, 120, 4500."""
    return f"{float(f'{x:.2g}'):g}"


def _budget_phrase(rec: dict[str, Any]) -> str:
    if rec.get("fraction") is not None:
        text = f"{rec['fraction'] * 100:g}% of the training labels"
    else:
        text = f"{rec['shots']} labeled images per class"
    return text + (f", classes at most {rec['imbalance']:g}:1 imbalanced" if rec.get("imbalance") else "")


def _phrase(arm: str) -> str:
    return INIT_PHRASES.get(arm, arm)


def _cheaper(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The cost model in one sentence: which of two records is cheaper to obtain and run, and why."""
    cost_a, cost_b = INIT_COST.get(a["init_kind"], 1), INIT_COST.get(b["init_kind"], 1)
    if cost_a != cost_b:
        cheap = a if cost_a < cost_b else b
        return f"{_phrase(cheap['arm'])} is the cheaper: it needs no self-supervised pre-training of your own."
    if a["image_size"] != b["image_size"]:
        cheap, dear = (a, b) if a["image_size"] < b["image_size"] else (b, a)
        ratio = (dear["image_size"] / cheap["image_size"]) ** 2
        return (
            f"{_phrase(cheap['arm'])} is the cheaper: it runs at {cheap['image_size']} px instead of "
            f"{dear['image_size']} px, about {_about(ratio)}× less compute per image."
        )
    cost_a, cost_b = PROTOCOL_COST.get(a["protocol"], 9), PROTOCOL_COST.get(b["protocol"], 9)
    if cost_a != cost_b:
        cheap = a if cost_a < cost_b else b
        return f"{_phrase(cheap['arm'])} ({cheap['protocol']}) is the cheaper: {PROTOCOL_PHRASES[cheap['protocol']]}."
    return "Both cost about the same to obtain and run."


def _p_pair(test: Estimate, p_adj: float) -> str:
    floor = test.n_boot if test.n_seeds == 1 else None
    return f"{format_p(test.p, floor)}, Holm-adjusted {format_p(p_adj, floor)}"


def _reference(best: dict[str, Any], same: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the best is measured against: ImageNet transfer, else training from scratch, else the runner-up."""
    others = [r for r in same if r is not best]
    for kind in ("imagenet", "scratch"):
        found = next((r for r in others if r["init_kind"] == kind), None)
        if found is not None:
            return found
    return others[0] if others else None


def _cannot_separate(run: _Run, dataset: str, budget: str, test: Estimate, n_test: int) -> str:
    """The In-short sentence for a budget at which no test of the family is significant after adjustment."""
    n_tests = sum(1 for e in run.family() if e["dataset"] == dataset and e["budget"] == budget)
    remedy, part = ("more seeds", "seed-to-seed") if test.limited_by == "seeds" else ("a larger test set", "test-set")
    return (
        f" At this budget the study cannot separate the initialisations: none of its {n_tests} test"
        f"{'s' if n_tests != 1 else ''} is significant after Holm adjustment. With {test.n_seeds} "
        f"seed{'s' if test.n_seeds != 1 else ''} and {n_test} test images it detects AUC differences of about "
        f"{test.detectable():.3f} (80% power, α = {ALPHA:g}); {remedy} would make smaller ones detectable (the "
        f"{part} variance is the larger part of the uncertainty)."
    )


def _recommendation(run: _Run) -> list[dict[str, Any]]:
    """Per data set and budget: the best (init, protocol) on validation, tested against a reference under the same
    protocol, worded from the Holm-adjusted p-value and the cost model."""
    out = []
    for dataset in run.datasets:
        sentences = []
        for budget in run.budgets(dataset):
            recs = [r for r in run.group(dataset, None, budget) if math.isfinite(r["val_auc_mean"])]
            if not recs:
                continue
            best = recs[0]
            protocol = best["protocol"]
            first_row = next(iter(run.seeds_of(best).values()))
            _, _, classes = run.labels(first_row)
            about = _about(best["n_labeled"] / max(len(classes), 1))
            lead = (
                f"With about {about} label{'' if about == '1' else 's'} per class ({_budget_phrase(best)}, "
                f"{best['n_labeled']:.0f} labeled images)"
            )
            name = f"{_phrase(best['arm'])} ({protocol}, best on validation)"
            reference = _reference(best, [r for r in recs if r["protocol"] == protocol])
            entry = run.tested(best, reference) if reference is not None else None
            if reference is None:
                text = (
                    f"{lead}, {name} reaches test AUC {_fmt(best['auc_mean'])}; no other initialisation was "
                    "evaluated with this protocol, so there is nothing to compare."
                )
                sentences.append({"text": text, "best": best["arm"], "significant": None})
                continue
            ref = _phrase(reference["arm"])
            test = entry["test"] if entry else None
            if test is None or not math.isfinite(test.p):
                text = (
                    f"{lead}, {name} scores {best['auc_mean'] - reference['auc_mean']:+.3f} test AUC against {ref}, "
                    "but no seed has predictions of both, so there is no test."
                )
                sentences.append({"text": text, "best": best["arm"], "significant": None})
                continue
            assert entry is not None
            interval = f"95% interval {test.low:+.3f} to {test.high:+.3f}; {_p_pair(test, entry['p_adj'])}"
            chosen = best["arm"]
            if entry["significant"] and test.delta > 0:
                text = f"{lead}, use {name}: {test.delta:+.3f} test AUC over {ref} ({interval})."
            elif entry["significant"]:
                chosen = reference["arm"]
                text = (
                    f"{lead}, use {ref} ({protocol}): on test it beats {name} by {-test.delta:+.3f} AUC "
                    f"({interval}), so the validation ranking did not hold."
                )
            else:
                text = (
                    f"{lead}, {name}, test AUC {_fmt(best['auc_mean'])}, and {ref}, {_fmt(reference['auc_mean'])}: "
                    f"no significant difference ({test.delta:+.3f} AUC, {interval}). That is not evidence that they "
                    f"are equivalent. {_cheaper(best, reference)}"
                )
            if not any(e["significant"] for e in run.family() if e["dataset"] == dataset and e["budget"] == budget):
                text += _cannot_separate(run, dataset, budget, test, int(first_row["n_test"]))
            sentences.append({"text": text, "best": chosen, "significant": entry["significant"]})
        out.append({"dataset": dataset, "sentences": sentences})
    return out


def _test_sentence(run: _Run) -> str:
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


def _config(run: _Run) -> dict[str, Any]:
    study = run.study
    study_text = (
        yaml.safe_dump(study, sort_keys=False, allow_unicode=True, default_flow_style=False)
        if isinstance(study, dict)
        else None
    )
    last = run.run_log[-1] if run.run_log else {}
    if last.get("versions"):
        versions, versions_source = last["versions"], "recorded by the last `medpretrain run`"
    elif run.rows[-1].get("versions"):
        versions, versions_source = run.rows[-1]["versions"], "recorded with the last finished cell"
    else:
        versions, versions_source = {}, "unknown"
    hardware = [e["hardware"] for e in run.run_log if e.get("hardware")]
    distinct_hw = [json.loads(h) for h in dict.fromkeys(json.dumps(h, sort_keys=True) for h in hardware)]
    seconds = [e.get("seconds") for e in run.run_log]
    invocations = [
        {
            "started": e.get("started", "?"),
            "finished": e.get("finished", "—"),
            "seconds": _fmt(e.get("seconds"), 0),
            "executor": e.get("executor", "?"),
            "completed": {True: "yes", False: "no (stopped)"}.get(e.get("completed"), "?"),
            "cells_run": e.get("cells_run", "?"),
            "cells_reused": e.get("cells_reused", "?"),
            "pretrainings": ", ".join(
                f"{p.get('label', '?')} ({_fmt(p.get('seconds'), 0)} s)" for p in e.get("pretrainings") or []
            ),
        }
        for e in run.run_log
    ]
    return {
        "study": study_text,
        "versions": versions,
        "versions_source": versions_source,
        "hardware": [yaml.safe_dump(h, sort_keys=False, default_flow_style=False) for h in distinct_hw],
        "total_seconds": float(np.sum(_finite(seconds))) if run.run_log else None,
        "cell_seconds": float(np.sum(_finite(r.get("seconds") for r in run.rows))),
        "invocations": invocations,
    }


def _planned_cells(study: Any) -> int | None:
    """datasets × inits × protocols × budgets × seeds of study.json (the runner's own count); None when the
    file is missing or shaped otherwise. `seeds` is a count; budgets are fraction and shot lists."""
    if not isinstance(study, dict):
        return None
    budgets, seeds = study.get("budgets"), study.get("seeds")
    if isinstance(budgets, dict):
        n_budgets = len(budgets.get("fractions") or []) + len(budgets.get("shots") or [])
    elif isinstance(budgets, list):
        n_budgets = len(budgets)
    else:
        return None
    n_seeds = len(seeds) if isinstance(seeds, list) else seeds
    lists = [study.get(k) for k in ("datasets", "inits", "protocols")]
    if not isinstance(n_seeds, int) or not all(isinstance(v, list) for v in lists):
        return None
    return math.prod(len(v) for v in lists) * n_budgets * n_seeds  # type: ignore[arg-type]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


# ------------------------------------------------------------------------------------------ entry point


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medpretrain", "templates"),
        autoescape=True,  # labels and paths come from user files
        undefined=jinja2.StrictUndefined,  # a misspelt variable is a bug, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = _duration
    return env


def _write_atomic(path: Path, text: str) -> None:
    """A browser or web server reading the old report never sees half a new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".report-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared and served
    os.replace(tmp, path)


def build_report(out_dir: Path, *, progress: bool = False) -> Path:
    """Write `<out_dir>/report.html` from the run directory and return its path."""
    out_dir = Path(out_dir)
    run = _Run(out_dir, progress=progress)
    steps: list[tuple[str, Callable[[_Run], Any]]] = [
        ("curves", _curves),
        ("table", _table),
        ("significance", _significance),
        ("finetune", _finetune),
        ("gradcam", _gradcam),
        ("embeddings", _embeddings),
        ("per_class", _per_class),
        ("recommendation", _recommendation),
        ("config", _config),
    ]
    context: dict[str, Any] = {}
    bar = tqdm(steps, desc="report", unit="section", disable=not progress)
    for name, step in bar:
        bar.set_postfix_str(name, refresh=True)
        context[name] = step(run)
    study = run.study if isinstance(run.study, dict) else {}
    html = (
        _environment()
        .get_template(TEMPLATE)
        .render(
            title=f"medpretrain report · {study.get('name') or 'unknown study'}",
            study_name=study.get("name") or "unknown",
            generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            out_dir=str(out_dir.resolve()),
            sections=SECTIONS,
            n_cells=len(run.rows),
            planned=_planned_cells(run.study),
            datasets=run.datasets,
            arms=run.arm_order,
            protocols=sorted({r["protocol"] for r in run.rows}),
            seeds=sorted({r["seed"] for r in run.rows}),
            notes=run.notes,
            alpha=ALPHA,
            test_sentence=_test_sentence(run),
            n_tests=len(run.family()),
            **context,
        )
    )
    path = out_dir / REPORT_NAME
    _write_atomic(path, html)
    return path
