"""What the command line parses (`--hp key=value`) and the tables of `medpretrain datasets` and `methods`."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table
from rich.text import Text

from medpretrain.errors import MedpretrainError


def parse_hparams(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON when they parse (numbers, booleans, lists), else text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MedpretrainError(f"hyper-parameter '{pair}' is not key=value", "write e.g. --hp temperature=0.2")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def datasets_table(size: int) -> Table:
    """Every known dataset: available here or not, where it was looked for, images per split, task."""
    from medpretrain.data import data_dir, list_datasets

    table = Table(title=f"MedMNIST v2 (2D) at {size} px — data directory {data_dir()}")
    for column in ("dataset", "here", "train", "val", "test", "classes", "task", "looked for"):
        table.add_column(column)
    for info in list_datasets(size=size):
        here = Text("yes", style="green") if info.available else Text("no", style="red")
        task = info.task.value if hasattr(info.task, "value") else info.task
        counts = (info.n_train, info.n_val, info.n_test, info.n_classes)
        table.add_row(info.flag, here, *map(str, counts), str(task), str(info.path))
    return table


def methods_table() -> Table:
    """Every self-supervised pre-training method, one line each, with its default hyper-parameters."""
    from medpretrain.ssl import METHODS

    table = Table(title="pre-training methods (override any default with --hp key=value)")
    for column in ("method", "family", "what it does", "defaults"):
        table.add_column(column, overflow="fold")
    for name, cls in sorted(METHODS.items()):
        defaults = ", ".join(f"{k}={v}" for k, v in cls.config_class().model_dump().items())
        table.add_row(name, cls.family, cls.description, defaults)
    return table
