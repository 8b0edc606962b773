"""The results store: one SQLite row per finished cell, committed the moment the cell ends.

The cell key is the primary key, so a re-run skips what is done and a result can never be stored twice.
Per-epoch histories and chosen hyper-parameters ride along as JSON; test-set probabilities go to
`predictions/<cell_key>.npz` beside the database (the report's paired tests need them).

The first result stored for a cell is kept, row and predictions together: putting the cell again changes
neither (SQLite's INSERT OR IGNORE, extended to the predictions file).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medpretrain.atomic import write_with
from medpretrain.mitigations import mitigation_of

# Column order of the table and of the exported JSON objects; the first block is the public contract.
COLUMNS: dict[str, str] = {
    "cell_key": "TEXT PRIMARY KEY",
    "dataset": "TEXT",
    "init": "TEXT",
    "backbone": "TEXT",
    "protocol": "TEXT",
    "fraction": "REAL",
    "shots": "INTEGER",
    "imbalance": "REAL",
    "seed": "INTEGER",
    "n_labeled": "INTEGER",
    "n_val": "INTEGER",  # validation images the cell could select on (policy `full` or `matched`)
    "n_per_class": "TEXT",  # JSON list: labelled training images per class (positives per label, multi-label)
    "n_requested": "INTEGER",  # labels the budget asked for; above n_labeled when an r:1 subset had to shrink
    "mitigation": "TEXT",  # imbalance mitigation of linear / finetune (medpretrain.mitigations); none otherwise
    "auc": "REAL",
    "auc_ci_low": "REAL",
    "auc_ci_high": "REAL",
    "acc": "REAL",
    "acc_ci_low": "REAL",
    "acc_ci_high": "REAL",
    "balanced_acc": "REAL",
    "f1_macro": "REAL",
    "kappa": "REAL",
    "ece": "REAL",
    "recall_per_class": "TEXT",  # JSON list: test recall of each class (each label at 0.5, multi-label)
    "val_auc": "REAL",  # of the model chosen on validation: the report ranks inits on it, never on test
    "val_acc": "REAL",
    "steps": "INTEGER",  # optimiser steps actually taken (fine-tuning); NULL for frozen-feature protocols
    "augmentation": "TEXT",  # JSON: the training views, at least {"hflip": flip probability}
    "init_kind": "TEXT",  # scratch | imagenet | checkpoint (a file or timm:) | noise | pretrained (by this study)
    "seconds": "REAL",
    "task": "TEXT",
    "size": "INTEGER",
    "image_size": "INTEGER",
    "small_stem": "INTEGER",
    "init_key": "TEXT",
    "dataset_key": "TEXT",
    "n_test": "INTEGER",
    "config_hash": "TEXT",
    "config": "TEXT",  # JSON: the full cell definition
    "chosen": "TEXT",  # JSON: hyper-parameters selected on the validation split
    "history": "TEXT",  # JSON: per-epoch train/val curves (fine-tuning)
    "extra": "TEXT",  # JSON: overfitting gap, weight-load report, …
    "versions": "TEXT",  # JSON: library versions
    "created_at": "TEXT",
}
JSON_COLUMNS = ("n_per_class", "recall_per_class", "augmentation", "config", "chosen", "history", "extra", "versions")


class Store:
    """SQLite results at `<out>/results.db`."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "results.db"
        self.predictions_dir = self.out_dir / "predictions"
        with self._connect() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS results ({', '.join(f'{k} {v}' for k, v in COLUMNS.items())})")
            # A store written by an older version lacks the newer columns: add them (NULL in its old rows), so
            # resuming that run keeps its finished cells.
            present = {r["name"] for r in db.execute("PRAGMA table_info(results)")}
            for name, kind in COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")  # a killed writer never corrupts rows already committed
        return db

    def done(self, cell_key: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM results WHERE cell_key = ?", (cell_key,)).fetchone() is not None

    def get(self, cell_key: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM results WHERE cell_key = ?", (cell_key,)).fetchone()
        return _decode(row) if row else None

    def put(self, row: dict[str, Any], test_proba: np.ndarray | None = None) -> None:
        """Store one finished cell, unless it is stored already: then row and predictions stay as they were.

        The predictions file is written inside the row's transaction, after the insert and before the commit:
        a cell that is already stored (the insert is ignored) leaves its file alone, and a writer killed in
        between leaves no row, so a stored row always has its file. The insert holds SQLite's write lock until
        the commit, so a concurrent put of the same cell waits, then finds the row and writes nothing.
        """
        values = {k: _encode(k, row.get(k)) for k in COLUMNS}
        placeholders = ", ".join("?" for _ in values)
        with self._connect() as db:  # commits on success, rolls the insert back if the file cannot be written
            inserted = db.execute(
                f"INSERT OR IGNORE INTO results ({', '.join(values)}) VALUES ({placeholders})",
                tuple(values.values()),
            ).rowcount
            if inserted:
                self._save_predictions(row["cell_key"], test_proba)

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        clauses = " AND ".join(f"{k} = ?" for k in where)
        sql = "SELECT * FROM results" + (f" WHERE {clauses}" if where else "") + " ORDER BY rowid"
        with self._connect() as db:
            return [_decode(r) for r in db.execute(sql, tuple(where.values()))]

    def predictions(self, cell_key: str) -> np.ndarray | None:
        path = self._predictions_path(cell_key)
        return np.load(path)["test_proba"] if path.exists() else None

    def _predictions_path(self, cell_key: str) -> Path:
        return self.predictions_dir / f"{cell_key}.npz"

    def _save_predictions(self, cell_key: str, proba: np.ndarray | None) -> None:
        """The predictions of a newly stored cell; None removes a file left by a put that was killed before its
        commit, so the new row is not paired with another run's predictions."""
        path = self._predictions_path(cell_key)
        if proba is None:
            path.unlink(missing_ok=True)
            return
        # The suffix keeps numpy from appending ".npz" to the temporary name.
        write_with(path, lambda tmp: np.savez_compressed(tmp, test_proba=proba.astype(np.float32)), suffix=".npz")


def export_json(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as a JSON list (the `--json` output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=1, default=_json_default))
    return path


def _encode(column: str, value: Any) -> Any:
    if column in JSON_COLUMNS:
        return json.dumps(value, default=_json_default) if value is not None else None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for column in JSON_COLUMNS:
        if out.get(column) is not None:
            out[column] = json.loads(out[column])
    if out.get("mitigation") is None:  # a row stored before the column existed: its params say
        out["mitigation"] = mitigation_of((out.get("config") or {}).get("params") or {})
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
