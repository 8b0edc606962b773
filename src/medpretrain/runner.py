"""Run a whole study: pre-train what the inits need, then every cell of the grid, then the report.

The grid is dataset × init × protocol × budget × seed. It is ordered so each pre-training happens once
(checkpoints are content-addressed and resumable), each init's frozen features are extracted once (the
feature-based protocols of an init run back to back against one disk cache), and every finished cell is
committed to the SQLite store the moment it ends. Killed at any point, the same command skips what is
stored, resumes an interrupted pre-training from its last epoch and runs only the rest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medpretrain.atomic import write_json
from medpretrain.cells import Cell
from medpretrain.domain import write_domain_gaps
from medpretrain.executors import get_executor
from medpretrain.plan import (  # re-exported: the runner's planning API before plan.py existed
    PretrainJob,
    budgets_of,
    check_distinct_inits,
    explanation_cells,
    plan_cells,
    pretrain_jobs,
)
from medpretrain.runtime import cache_root, hardware, library_versions
from medpretrain.store import Store
from medpretrain.study import Study

Log = Callable[[str], None]
REUSED_SHOWN = 50

__all__ = ["PretrainJob", "RunResult", "budgets_of", "explanation_cells", "plan_cells", "pretrain_jobs", "run_study"]


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    cells_run: int
    cells_reused: int
    pretrainings: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def run_study(
    study: Study,
    out_dir: str | Path,
    *,
    executor: str = "local",
    address: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> RunResult:
    """Pre-train, evaluate every cell not yet stored, and record this invocation in `run_log.jsonl`."""
    check_distinct_inits(study)  # before the run directory exists: a refused study leaves nothing behind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", study.model_dump(mode="json"))
    store = Store(out)
    engine = get_executor(executor)(address=address, log=log)
    started, wall = datetime.now(timezone.utc), time.perf_counter()
    jobs = pretrain_jobs(study)
    bar = tqdm(total=len(jobs) + study.n_cells, desc="study", unit="step", disable=not progress, dynamic_ncols=True)
    result = RunResult(rows=[], cells_run=0, cells_reused=0)
    completed = False
    try:
        checkpoints: dict[tuple[str, str | None, int], Path] = {}

        def pretrained(job: PretrainJob, path: Path, seconds: float) -> None:
            checkpoints[job.dataset, job.label, job.replicate] = path
            result.pretrainings.append({"label": job.label, "path": str(path), "seconds": round(seconds, 1)})
            bar.update()

        engine.pretrain(jobs, cache_root(out) / "pretrain", on_done=pretrained, on_start=bar.set_postfix_str)
        cells = plan_cells(study, checkpoints)
        keep = explanation_cells(cells)
        todo, reused = [], []
        for cell in cells:
            stored = store.get(cell.key)
            if stored is None:
                todo.append(cell)
            else:
                result.rows.append(stored)
                reused.append(cell)
                bar.update()
        result.cells_reused = len(reused)
        if len(reused) <= REUSED_SHOWN:  # name them when few (an `evaluate` re-run); a resumed study counts them
            for cell in reused:
                log(f"done already: {cell.label}")
        if result.cells_reused:
            log(f"{result.cells_reused} of {len(cells)} cells already in {store.path}; running the other {len(todo)}")

        def finished(cell: Cell, row: dict[str, Any], test_proba: Any) -> None:
            store.put(row, test_proba)  # only the driver writes the store
            result.rows.append(store.get(cell.key) or row)
            result.cells_run += 1
            bar.update()

        engine.evaluate(
            todo,
            out,
            keep={k: out / p for k, p in keep.items()},
            on_done=finished,
            on_start=lambda cell: bar.set_postfix_str(cell.label),
        )
        # Domain-mismatch studies: how far each pre-training source is from each target (the report reads it).
        write_domain_gaps(study, out, progress=progress)
        completed = True
    finally:
        bar.close()
        engine.close()
        result.seconds = time.perf_counter() - wall
        record = {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(result.seconds, 1),
            "completed": completed,
            "executor": executor,
            "cells_run": result.cells_run,
            "cells_reused": result.cells_reused,
            "pretrainings": result.pretrainings,
            "hardware": hardware(),
            "versions": library_versions(),
        }
        with open(out / "run_log.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
    return result
