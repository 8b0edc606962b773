"""`medpretrain export`: a run's results as CSV, Parquet or JSON, or into MLflow (registered by cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medpretrain.errors import MedpretrainError

TARGETS = ("mlflow",)


def export_command(
    out: Annotated[Path, typer.Argument(help="A run directory written by `medpretrain run` or `evaluate`.")],
    format: Annotated[
        str | None,
        typer.Option("--format", help="csv, parquet or json: one row per cell, as mp.open_run(DIR).results()."),
    ] = None,
    file: Annotated[Path | None, typer.Option("--out", help="File to write (default: DIR/results.<format>).")] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="mlflow: one MLflow run per cell (pip install -e '.[mlflow]').")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking store: a folder, file:///…, or a server's http(s) address.")
    ] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the study's name).")] = None,
) -> None:
    """Export the results table (one row per cell, JSON columns expanded), to a file or to MLflow.

    Exporting to MLflow again adds no run for a cell already there (runs are matched by cell key).
    Examples: `medpretrain export runs/quick --format parquet`;
    `medpretrain export runs/quick --to mlflow --tracking-uri mlruns`.
    """
    from medpretrain.api import open_run
    from medpretrain.export import FORMATS, default_path

    if to is not None and to not in TARGETS:
        raise MedpretrainError(f"unknown export target '{to}'", f"choose one of: {', '.join(TARGETS)}")
    if format is not None and format not in FORMATS:
        raise MedpretrainError(f"unknown export format '{format}'", f"choose one of: {', '.join(FORMATS)}")
    if to is None and (tracking_uri is not None or experiment is not None):
        raise MedpretrainError("--tracking-uri and --experiment are MLflow options", "add --to mlflow")
    run = open_run(out)
    if format is not None or to is None:
        fmt = format or (file.suffix.lstrip(".") if file is not None and file.suffix else "csv")
        path = run.export(file or default_path(out, fmt), format=fmt)
        typer.echo(f"rows: {path} ({len(run.rows())} cells)")
    if to == "mlflow":
        done = run.to_mlflow(tracking_uri=tracking_uri, experiment=experiment)
        typer.echo(
            f"mlflow: experiment '{done['experiment']}' ({done['experiment_id']}): {done['created']} runs created, "
            f"{done['kept']} already there" + (f", {done['replaced']} unfinished replaced" if done["replaced"] else "")
        )
