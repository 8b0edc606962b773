"""Results out of the run directory: one table of cells (pandas), written as CSV, Parquet or JSON, or sent to MLflow.

The table is the results store as it is, one row per cell, with the JSON columns that hold mappings (`config`,
`chosen`, `extra`, `augmentation`, `versions`) expanded into one column per key, nested keys joined by a dot
(`chosen.C`, `augmentation.hflip`, `config.params.bn_adapt`). Columns whose values are lists (`n_per_class`,
`recall_per_class`, `history`) keep them as Python lists in the DataFrame; CSV and Parquet hold those as JSON
text (a list has no column type there), JSON keeps them as lists. Every format has the same columns.

MLflow gets one run per cell, tagged with its cell key: exporting again finds the tag and adds nothing, the way
the results store keys cells.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpretrain.errors import MedpretrainError
from medpretrain.store import COLUMNS
from medpretrain.summary import budget_label

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("csv", "parquet", "json")
EXPANDED = ("augmentation", "config", "chosen", "extra", "versions")  # JSON mappings: one column per key
CELL_TAG = "medpretrain.cell_key"
PARAM_COLUMNS = (
    "dataset", "init", "protocol", "backbone", "fraction", "shots", "imbalance", "mitigation", "seed", "init_kind",
    "size", "image_size", "small_stem", "n_labeled", "n_val", "n_test", "task", "config_hash",
)  # fmt: skip
METRIC_COLUMNS = (
    "auc", "auc_ci_low", "auc_ci_high", "acc", "acc_ci_low", "acc_ci_high", "balanced_acc", "f1_macro", "kappa",
    "ece", "val_auc", "val_acc", "steps", "seconds",
)  # fmt: skip
PARAM_LENGTH = 250  # MLflow limits parameter values (500 characters in older servers); ours are short anyway
ARTEFACTS = ("report.html", "study.json")  # logged with every cell's MLflow run, where the run directory has them


def _flatten(value: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, item in value.items():
        name = f"{prefix}.{key}"
        if isinstance(item, dict) and item:
            _flatten(item, name, out)
        else:
            out[name] = item


def results_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell, the store's columns in its order, mapping-valued JSON columns expanded (`chosen.C`).

    >>> frame = results_frame([{"cell_key": "k", "auc": 0.9, "chosen": {"C": 1.0}, "history": [{"step": 1}]}])
    >>> list(frame.columns), frame.loc[0, "chosen.C"], frame.loc[0, "history"]
    (['cell_key', 'auc', 'chosen.C', 'history'], np.float64(1.0), [{'step': 1}])
    """
    import pandas as pd

    records = []
    for row in rows:
        flat: dict[str, Any] = {}
        for column, value in row.items():
            if column in EXPANDED and isinstance(value, dict):
                _flatten(value, column, flat)
            else:
                flat[column] = value
        records.append(flat)
    if not records:
        return pd.DataFrame(columns=[c for c in COLUMNS if c not in EXPANDED])
    return pd.DataFrame.from_records(records)


def _as_text(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return json.dumps(value, default=str)


def file_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as CSV and Parquet hold it: an object column with lists, mappings or mixed types as JSON text."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype != object:
            continue
        kinds = {type(v) for v in out[column] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1 or kinds & {list, dict, tuple}:
            out[column] = out[column].map(_as_text)
    return out


def default_path(run_dir: Path, fmt: str) -> Path:
    return Path(run_dir) / f"results.{fmt}"


def write_results(frame: pd.DataFrame, path: str | Path, fmt: str) -> Path:
    """Write the table as `fmt` (csv, parquet or json: a list of row objects) and return the path."""
    if fmt not in FORMATS:
        raise MedpretrainError(f"unknown export format '{fmt}'", f"choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        frame.to_json(path, orient="records", indent=1)
    elif fmt == "csv":
        file_frame(frame).to_csv(path, index=False)
    else:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise MedpretrainError("Parquet needs pyarrow", "install it with pip install pyarrow") from None
        file_frame(frame).to_parquet(path, index=False)
    return path


# ------------------------------------------------------------------------------------------ MLflow


@contextmanager
def _file_store_allowed(uri: str | None) -> Iterator[None]:
    """MLflow 3 refuses a local file store unless MLFLOW_ALLOW_FILE_STORE is set; one named explicitly is wanted."""
    wanted = uri is not None and (uri.startswith("file:") or "://" not in uri)
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if wanted:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if wanted:
            if before is None:
                os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
            else:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= PARAM_LENGTH else text[: PARAM_LENGTH - 1] + "…"


def _key(name: str) -> str:
    return re.sub(r"[^\w./ :-]", "_", name)


def cell_params(row: dict[str, Any]) -> dict[str, str]:
    """A cell's MLflow parameters: what defines it (dataset, init, protocol, budget, seed…) and the
    hyper-parameters chosen on validation (`chosen.*`) and its training views (`augmentation.*`)."""
    params = {c: row[c] for c in PARAM_COLUMNS if row.get(c) is not None}
    params["budget"] = budget_label(row)
    for column in ("chosen", "augmentation"):
        flat: dict[str, Any] = {}
        _flatten(row.get(column) or {}, column, flat)
        params.update({k: v for k, v in flat.items() if v is not None})
    return {_key(k): _short(v) for k, v in params.items()}


def cell_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A cell's MLflow metrics: test metrics with their 95% intervals, validation metrics, steps and seconds."""
    values = {c: row.get(c) for c in METRIC_COLUMNS}
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}


def _client(tracking_uri: str | None) -> Any:
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MedpretrainError(
            "MLflow is not installed", "install it with pip install -e '.[mlflow]' (or pip install mlflow-skinny)"
        ) from None
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except (MlflowException, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedpretrainError(
            f"MLflow cannot open the tracking store {tracking_uri or '(default)'}: {first}",
            "give --tracking-uri: a folder or file:///… (a local store) or the http(s) address of a server",
        ) from None


def _runs_by_key(client: Any, experiment_id: str) -> dict[str, list[Any]]:
    """The experiment's active runs that carry a cell key, by key (all pages)."""
    found: dict[str, list[Any]] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            key = run.data.tags.get(CELL_TAG)
            if key:
                found.setdefault(key, []).append(run)
        token = page.token
        if not token:
            return found


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_cell(client: Any, experiment_id: str, row: dict[str, Any], artefacts: list[Path]) -> None:
    from mlflow.entities import Metric, Param

    name = f"{row['dataset']} · {row['init']} · {row['protocol']} · {budget_label(row)} · seed {row['seed']}"
    run = client.create_run(experiment_id, tags={CELL_TAG: row["cell_key"], "mlflow.runName": name})
    run_id, now = run.info.run_id, int(time.time() * 1000)
    params = [Param(k, v) for k, v in cell_params(row).items()]
    metrics = [Metric(k, v, now, 0) for k, v in cell_metrics(row).items()]
    for i, point in enumerate(row.get("history") or []):  # fine-tuning curves, one MLflow step per validation
        if isinstance(point, dict):
            step = int(point.get("step", i))
            numbers = {k: v for k, v in point.items() if isinstance(v, int | float) and k != "step"}
            metrics += [Metric(_key(f"history.{k}"), float(v), now, step) for k, v in numbers.items()]
    for part in _chunks(params, 100):  # MLflow's per-call limits: 100 parameters, 1000 metrics
        client.log_batch(run_id, params=part)
    for part in _chunks([m for m in metrics if math.isfinite(m.value)], 1000):
        client.log_batch(run_id, metrics=part)
    for path in artefacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")  # last: an export killed before this is redone next time


def to_mlflow(
    run_dir: str | Path,
    rows: list[dict[str, Any]],
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """One MLflow run per cell, matched by the `medpretrain.cell_key` tag: a cell with a finished run is left
    alone, one whose export was interrupted is replaced. Returns the experiment and how many runs were created,
    kept and replaced."""
    run_dir = Path(run_dir)
    if tracking_uri is not None and "://" not in tracking_uri and not tracking_uri.startswith("file:"):
        tracking_uri = Path(tracking_uri).expanduser().resolve().as_uri()  # a folder: a local file store
    study = _read_json(run_dir / "study.json")
    name = experiment or (study.get("name") if isinstance(study, dict) else None) or run_dir.resolve().name
    artefacts = [run_dir / a for a in ARTEFACTS if (run_dir / a).is_file()]
    with _file_store_allowed(tracking_uri):
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage != "active":
            raise MedpretrainError(
                f"MLflow experiment '{name}' is deleted", "restore it in MLflow or choose another with --experiment"
            )
        experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
        existing = _runs_by_key(client, experiment_id)
        created = kept = replaced = 0
        for row in rows:
            runs = existing.get(row["cell_key"], [])
            if any(r.info.status == "FINISHED" for r in runs):
                kept += 1
                continue
            for stale in runs:
                client.delete_run(stale.info.run_id)
                replaced += 1
            _log_cell(client, experiment_id, row, artefacts)
            created += 1
    return {"experiment": name, "experiment_id": experiment_id, "created": created, "kept": kept, "replaced": replaced}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
