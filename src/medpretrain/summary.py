"""Mean ± std over seeds per (dataset, init, protocol, budget), for the terminal and the report."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

GROUP_BY = ("dataset", "image_size", "backbone", "protocol", "init", "mitigation", "fraction", "shots", "imbalance")
SUMMARY_METRICS = ("auc", "acc", "balanced_acc", "kappa")


def budget_label(row: dict[str, Any]) -> str:
    base = f"{row['fraction']:g}" if row.get("fraction") is not None else f"{row['shots']}-shot"
    return base + (f" imb{row['imbalance']:g}" if row.get("imbalance") else "")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per group with n_seeds, mean n_labeled and `<metric>_mean` / `<metric>_std`."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in GROUP_BY)].append(row)
    out = []
    for key, members in groups.items():
        record: dict[str, Any] = dict(zip(GROUP_BY, key, strict=True))
        record["budget"] = budget_label(record)
        record["n_seeds"] = len(members)
        record["n_labeled"] = float(np.mean([m["n_labeled"] for m in members]))
        for metric in SUMMARY_METRICS:
            values = np.array([m[metric] for m in members if m.get(metric) is not None], dtype=float)
            record[f"{metric}_mean"] = float(values.mean()) if len(values) else float("nan")
            record[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(record)
    return out


def print_summary(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    if not rows:
        console.print("no results")
        return
    table = Table(title="test metrics, mean ± std over seeds", show_lines=False)
    for column in ("dataset", "px", "init", "protocol", "budget", "labels", "seeds", *SUMMARY_METRICS):
        table.add_column(column, justify="right" if column not in ("dataset", "init", "protocol") else "left")
    records = sorted(
        summarize(rows),
        key=lambda r: (r["dataset"], r["protocol"], r["init"], r["fraction"] or 0, r["shots"] or 0),
    )
    for r in records:
        cells = [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in SUMMARY_METRICS]
        table.add_row(
            r["dataset"],
            str(r["image_size"]),
            r["init"] + (f" · {r['mitigation']}" if r.get("mitigation") not in (None, "none") else ""),
            r["protocol"],
            r["budget"],
            f"{r['n_labeled']:.0f}",
            str(r["n_seeds"]),
            *cells,
        )
    console.print(table)
