"""The report's figures: matplotlib PNGs inlined as data URIs (no external file, no script).

Label-efficiency curves, fine-tuning curves and the overfitting-gap chart, Grad-CAM panels of the kept
fine-tuned networks, UMAP maps of the cached frozen features, and the confusion matrix. Figures are drawn on
the Agg canvas directly (no pyplot state), so building a report never opens a window or leaks figures.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator
from sklearn.metrics import ConfusionMatrixDisplay

from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import predict_labels
from medpretrain.report.run import Run, sort_value
from medpretrain.report.text import short

DPI = 96
GRADCAM_CORRECT = 4
GRADCAM_WRONG = 4
UMAP_MAX_POINTS = 2000
UMAP_MIN_POINTS = 10


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> str:
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


def _legend(fig: Figure, run: Run, arms: Iterable[str]) -> None:
    handles = [Line2D([], [], color=run.colors[a], marker="o", label=a) for a in arms]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)


def curves(run: Run) -> list[dict[str, Any]]:
    """Section 1: test AUC and accuracy against labels (log scale), per protocol, one line per arm."""
    from medpretrain.report.forecast import curves as fitted_curves

    fitted = {metric: fitted_curves(run, metric) for metric in ("auc", "acc")}
    figures = []
    for dataset in run.datasets:
        protocols = run.protocols(dataset)
        fig = figure(10, 3.0 * len(protocols) + 0.6)
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
                        if not imbalance:
                            _fitted(ax, fitted[metric].get((dataset, protocol, arm)), color)
            for ax, metric in zip(row_axes, ("AUC", "ACC"), strict=True):
                _log_ticks(ax, [r["n_labeled"] for r in recs])
                ax.set_xlabel("labeled training images (log scale)")
                ax.set_ylabel(f"test {metric}")
                ax.set_title(f"{protocol} · {metric}", fontsize=10)
                ax.grid(alpha=0.3)
        _legend(fig, run, dict.fromkeys(a for a in run.arm_order if a in arms_seen))
        imbalanced = any(r["imbalance"] for r in run.records if r["dataset"] == dataset)
        figures.append({"title": dataset, "src": png(fig), "imbalanced": imbalanced})
    return figures


def _fitted(ax: Any, entry: Any, color: Any) -> None:
    """The learning-curve fit (report.forecast) as a dotted line with its 95% band, from the smallest budget to
    EXTRAPOLATION_FACTOR × the largest: the part beyond the measured points is the forecast."""
    from medpretrain.forecast import EXTRAPOLATION_FACTOR

    if entry is None or not entry[0].ok:
        return
    curve = entry[0]
    grid = np.geomspace(curve.n[0], EXTRAPOLATION_FACTOR * curve.n_max, 120)
    line, low, high = curve.band(grid)
    ax.plot(grid, line, ":", color=color, linewidth=1.2)
    ax.fill_between(grid, low, high, color=color, alpha=0.07, linewidth=0)


def finetune_curves(run: Run, rows: list[dict[str, Any]], arms: list[str]) -> tuple[str, list[str]]:
    """Train/validation loss and accuracy at each validation point of each arm's largest budget, lowest seed,
    against optimiser steps (rows of the epoch-based protocol version: epochs); (PNG, what is shown)."""
    fig = figure(10, 3.6)
    ax_loss, ax_acc = fig.subplots(1, 2)
    shown = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        most = max(r["n_labeled"] for r in mine)
        row = min((r for r in mine if r["n_labeled"] == most), key=lambda r: r["seed"])
        shown.append(f"{arm}: {row['budget']} ({row['n_labeled']} labels), seed {row['seed']}")
        hist = row["history"]
        unit = "step" if all("step" in h for h in hist) else "epoch"
        epochs = [h.get(unit) for h in hist]
        best_epoch = (row.get("chosen") or {}).get(unit)
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            for side, style in (("train", "-"), ("val", "--")):
                values = [h.get(f"{side}_{metric}") for h in hist]
                values = [np.nan if v is None else v for v in values]
                ax.plot(epochs, values, style, marker="o", markersize=3, color=run.colors[arm])
            if best_epoch in epochs:
                v = hist[epochs.index(best_epoch)].get(f"val_{metric}")
                if v is not None:
                    ax.plot([best_epoch], [v], marker="*", markersize=12, color=run.colors[arm], linestyle="")
    steps = all("step" in h for r in rows for h in (r.get("history") or []))
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("optimiser step" if steps else "epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{name} (solid: train, dashed: validation, ★: kept weights)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend(fig, run, arms)
    return png(fig), shown


def gap_chart(run: Run, gaps: list[dict[str, Any]]) -> str | None:
    """Bars of the train − validation accuracy gap at the kept epoch per budget and arm (None without gaps)."""
    budgets = list(dict.fromkeys(g["budget"] for g in gaps))
    arms = [a for a in run.arm_order if any(g["arm"] == a for g in gaps)]
    if not any(math.isfinite(g["gap_acc"]) for g in gaps):
        return None
    fig = figure(min(4.0 + 0.5 * len(budgets) * len(arms), 10.0), 3.4)
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
    return png(fig)


def confusion(counts: np.ndarray, classes: list[str], title: str) -> str:
    fig = figure(min(3 + 0.45 * len(classes), 9), min(2.6 + 0.4 * len(classes), 8))
    ax = fig.subplots()
    ConfusionMatrixDisplay(counts, display_labels=[short(c, 16) for c in classes]).plot(
        ax=ax, colorbar=False, xticks_rotation=45, values_format="d", cmap="Blues"
    )
    ax.set_title(title, fontsize=10)
    return png(fig)


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
        return short("+".join(short(n, 8) for n in names) or "none", 16)
    return short(classes[int(labels)])


def gradcam(run: Run) -> list[dict[str, Any]]:
    """Section 5: Grad-CAM of the saved fine-tuned networks (models/*.pt) on the same test images. The networks
    are loaded as saved, never trained; a file that does not load is a note, not a failure."""
    from medpretrain.explain import feature_grid, gradcam_maps, overlay  # pulls in OpenCV: only when needed
    from medpretrain.train import load_classifier

    out = []
    for dataset, models in run.kept_models().items():
        # Mean validation AUC (over seeds) of each kept network's arm and budget decides whose predictions pick cases.
        rec_auc = {
            (r["arm"], r["budget"]): r["val_auc_mean"]
            for r in run.records
            if r["dataset"] == dataset and r["protocol"] == "finetune"
        }
        usable = [(row, path) for row, path in models if run.proba(row) is not None]
        if not usable:
            continue
        best_row, _ = max(usable, key=lambda m: sort_value(rec_auc.get((m[0]["arm"], m[0]["budget"]), math.nan)))
        y, task, classes = run.labels(best_row)
        best_proba = run.proba(best_row)
        assert best_proba is not None
        idx = _pick_cases(y, best_proba, task)
        if not idx:
            continue
        fig = figure(1.3 * len(idx) + 1.2, 1.6 * (len(usable) + 1) + 0.3)
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
            axes[k, 0].set_ylabel(short(row["arm"], 18), fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        best_pred = predict_labels(best_proba[idx], task)
        n_correct = int(sum(bool(np.all(best_pred[j] == y[i])) for j, i in enumerate(idx)))
        out.append(
            {
                "dataset": dataset,
                "src": png(fig),
                "arms": [row["arm"] for row, _ in usable],
                "budget": best_row["budget"],
                "chooser": best_row["arm"],
                "n_correct": n_correct,
                "n_wrong": len(idx) - n_correct,
                "flat": flat,
            }
        )
    return out


def embeddings(run: Run) -> list[dict[str, Any]]:
    """Section 6: UMAP of each arm's frozen test-set features, as the run cached them. Features that were never
    written (a study without linear or kNN cells, a cleared cache) are named as missing, not extracted."""
    out = []
    for dataset in run.datasets:
        arms: dict[str, list[dict[str, Any]]] = {}
        for r in run.rows:
            if r["dataset"] == dataset:
                arms.setdefault(r["arm"], []).append(r)
        y, task, classes = run.labels(next(iter(arms.values()))[0])
        n = len(y)
        subset = np.sort(np.random.default_rng(0).permutation(n)[:UMAP_MAX_POINTS]) if n > UMAP_MAX_POINTS else None
        points = np.arange(n) if subset is None else subset
        if len(points) < UMAP_MIN_POINTS:
            out.append(
                {"dataset": dataset, "note": f"only {len(points)} test images: too few for an embedding", "missing": []}
            )
            continue
        found, missing = [], []
        for arm in run.arm_order:
            if arm not in arms:
                continue
            feats, path, adapted = run.features(arms[arm])
            if feats is None:
                missing.append(
                    f"features for {arm} not found in {path.parent}; re-run the study's linear or kNN cells of "
                    "this initialisation to write them (the report reads features, it never extracts them)"
                )
            elif len(feats) != n:
                missing.append(f"features for {arm} in {path.parent} do not match the test split ({len(feats)} ≠ {n})")
            else:
                found.append((f"{arm} (BN-adapted)" if adapted else arm, feats))
        if not found:
            out.append({"dataset": dataset, "note": "no frozen features available", "missing": missing})
            continue
        from medpretrain.explain import umap_embedding  # umap-learn imports numba: only when there is work

        panels = [(arm, umap_embedding(feats[points], seed=0)) for arm, feats in found]
        if task is Task.MULTILABEL:
            colour = np.where(y.any(axis=1), y.argmax(axis=1), -1)[points]
            names = {-1: "no label", **dict(enumerate(classes))}
        else:
            colour = y[points]
            names = dict(enumerate(classes))
        cols = min(3, len(panels))
        rows_n = math.ceil(len(panels) / cols)
        fig = figure(3.6 * cols, 3.4 * rows_n + 0.5)
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
        handles = [
            Line2D([], [], color=palette(int(c) % palette.N), marker="o", linestyle="", label=short(names[c], 24))
            for c in sorted(names)
            if (colour == c).any()
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
        out.append({"dataset": dataset, "src": png(fig), "n_points": len(points), "n_test": n, "missing": missing})
    return out
