"""The report rendered: each section's context from the run, one Jinja template, one atomically written file.

The template (`medpretrain/templates/report.html.j2`, package data) holds the layout and inline CSS; the
section modules hold every number and sentence. The file is written through `medpretrain.atomic`, so a browser
or web server reading the old report never sees half a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from tqdm.auto import tqdm

from medpretrain.atomic import write_text
from medpretrain.forecast import EXTRAPOLATION_FACTOR
from medpretrain.report import domain, figures, forecast, fusion, imbalance, provenance, tables
from medpretrain.report.recommend import recommend
from medpretrain.report.run import Run
from medpretrain.report.text import duration
from medpretrain.stats import ALPHA

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
    ("imbalance", "Class imbalance: ratio, mitigations and per-class recall"),
    ("fusion", "Fusion: DVME and concatenation against their sources"),
    ("domain", "Domain mismatch: source-to-target distance against the gain"),
    ("forecast", "How many labels? Learning-curve forecasts"),
)


def _recommendation(run: Run) -> list[dict[str, Any]]:
    """The tested advice per budget, then per data set the labels each init needs to reach each target."""
    blocks = recommend(run.ranked(), run.family())
    forecast_sentences = forecast.advice(run)
    for block in blocks:
        block["sentences"] += [
            {"text": text, "best": "", "significant": False} for text in forecast_sentences.get(block["dataset"], [])
        ]
    return blocks


# In the order of SECTIONS: the template numbers them so.
STEPS: tuple[tuple[str, Callable[[Run], Any]], ...] = (
    ("curves", figures.curves),
    ("table", tables.results),
    ("significance", tables.significance),
    ("finetune", tables.finetune),
    ("gradcam", figures.gradcam),
    ("embeddings", figures.embeddings),
    ("per_class", tables.per_class),
    ("recommendation", _recommendation),
    ("config", provenance.config),
    ("imbalance", imbalance.imbalance),
    ("fusion", fusion.section),
    ("domain", domain.section),
    ("forecast", forecast.section),
)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medpretrain", "templates"),
        autoescape=True,  # labels and paths come from user files
        undefined=jinja2.StrictUndefined,  # a misspelt variable is a bug, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = duration
    return env


def build_report(out_dir: Path, *, progress: bool = False) -> Path:
    """Write `<out_dir>/report.html` from the run directory's artefacts and return its path."""
    out_dir = Path(out_dir)
    run = Run(out_dir)
    context: dict[str, Any] = {}
    bar = tqdm(STEPS, desc="report", unit="section", disable=not progress)
    for name, step in bar:
        bar.set_postfix_str(name, refresh=True)
        context[name] = step(run)
    study = run.study if isinstance(run.study, dict) else {}
    html = (
        environment()
        .get_template(TEMPLATE)
        .render(
            title=f"medpretrain report · {study.get('name') or 'unknown study'}",
            study_name=study.get("name") or "unknown",
            generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            out_dir=str(out_dir.resolve()),
            sections=SECTIONS,
            n_cells=len(run.rows),
            planned=provenance.planned_cells(run.study),
            datasets=run.datasets,
            arms=run.arm_order,
            protocols=sorted({r["protocol"] for r in run.rows}),
            seeds=sorted({r["seed"] for r in run.rows}),
            notes=run.notes,
            alpha=ALPHA,
            extrapolation_factor=EXTRAPOLATION_FACTOR,
            test_sentence=tables.method_sentence(run),
            n_tests=run.n_tests,
            **context,
        )
    )
    path = out_dir / REPORT_NAME
    return write_text(path, html)  # readable as the umask allows: a report is meant to be shared and served
