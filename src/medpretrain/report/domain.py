"""The domain-mismatch section: each pre-training source's distance to each target against what it gained there.

The distances come from `domain_gap.json`, which the run wrote (`medpretrain.domain`: Fréchet distance and
RBF-MMD of the two data sets' features through one fixed ImageNet backbone); the gains are differences of
records this report already holds: a pre-training's mean test AUC on a target minus that of training from
scratch, and minus that of ImageNet transfer, under the same protocol and budget. The intervals are the paired
seed-and-test-set intervals of `Run.compare`, shown unadjusted and marked so: this section describes a trend, the
claims of the report are the Holm-adjusted tests of the significance section.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib import colormaps

from medpretrain.domain import read_domain_gaps
from medpretrain.report.figures import figure, png
from medpretrain.report.run import Run


def _gain(run: Run, rec: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    if reference is None:
        return {"delta": math.nan, "text": "—"}
    test = run.compare(rec, reference)
    if test is None or not math.isfinite(test.delta):
        delta = rec["auc_mean"] - reference["auc_mean"]
        return {"delta": delta, "text": f"{delta:+.3f}"}
    return {"delta": test.delta, "text": f"{test.delta:+.3f} [{test.low:+.3f}, {test.high:+.3f}]"}


def _points(run: Run, gaps: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per (pre-training, target, protocol, budget) whose source/target pair was measured."""
    by_pair = {(g["source"], g["target"]): g for g in gaps.get("pairs", [])}
    sources: dict[str, str] = gaps.get("sources", {})
    points = []
    for rec in run.records:
        if rec["init_kind"] != "pretrained":
            continue
        first = next(iter(run.seeds_of(rec).values()))
        if first["init"] not in sources:  # the row's own init label: the pre-training's display name
            continue
        source, target = sources[first["init"]], first["config"]["dataset"]
        gap = by_pair.get((source or target, target))
        if gap is None:
            continue
        same = [r for r in run.records if (r["dataset"], r["protocol"], r["budget"]) ==
                (rec["dataset"], rec["protocol"], rec["budget"])]  # fmt: skip
        scratch = next((r for r in same if r["init_kind"] == "scratch"), None)
        imagenet = next((r for r in same if r["init_kind"] == "imagenet"), None)
        points.append(
            {
                "source": source or target,
                "target": rec["dataset"],
                "arm": rec["arm"],
                "protocol": rec["protocol"],
                "budget": rec["budget"],
                "frechet": gap["frechet"],
                "mmd": gap["mmd"],
                "auc": rec["auc_mean"],
                "over_scratch": _gain(run, rec, scratch),
                "over_imagenet": _gain(run, rec, imagenet),
            }
        )
    return points


def _figure(points: list[dict[str, Any]]) -> str:
    fig = figure(10, 3.6)
    targets = sorted({p["target"] for p in points})
    palette = colormaps["tab10"]
    for i, (key, title) in enumerate((("over_scratch", "gain over scratch"), ("over_imagenet", "gain over ImageNet"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, target in enumerate(targets):
            mine = [p for p in points if p["target"] == target and math.isfinite(p[key]["delta"])]
            ax.scatter([p["frechet"] for p in mine], [p[key]["delta"] for p in mine], color=palette(j % 10),
                       label=f"target {target}", s=28)  # fmt: skip
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("Fréchet distance, source to target (ImageNet features)")
        ax.set_ylabel(f"test AUC {title}")
        ax.set_title(title)
        if i == 0 and targets:
            ax.legend(fontsize=8)
    return png(fig)


def section(run: Run) -> dict[str, Any] | None:
    """The table and the figure, or None when the run measured no domain gap."""
    gaps = read_domain_gaps(run.out)
    if gaps is None:
        return None
    points = _points(run, gaps)
    return {
        "backbone": gaps.get("backbone"),
        "image_size": gaps.get("image_size"),
        "pairs": [{**g, "frechet": f"{g['frechet']:.1f}", "mmd": f"{g['mmd']:.4f}"} for g in gaps.get("pairs", [])],
        "points": [
            {
                **p,
                "frechet": f"{p['frechet']:.1f}",
                "auc": f"{p['auc']:.3f}",
                "over_scratch": p["over_scratch"]["text"],
                "over_imagenet": p["over_imagenet"]["text"],
            }
            for p in points
        ],
        "src": _figure(points) if points else None,
    }


__all__ = ["section"]
