"""Run a whole study: pre-train what the inits need, then every cell of the grid, then the report.

The grid is dataset × init × protocol × budget × seed. It is ordered so each pre-training happens once
(checkpoints are content-addressed and resumable), each init's frozen features are extracted once (the
feature-based protocols of an init run back to back against one disk cache), and every finished cell is
committed to the SQLite store the moment it ends. Killed at any point, the same command skips what is
stored, resumes an interrupted pre-training from its last epoch and runs only the rest.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medpretrain.budgets import Budget
from medpretrain.evaluate import Cell
from medpretrain.pretrain import PretrainRequest
from medpretrain.protocols import get_protocol
from medpretrain.runtime import cache_root, hardware, library_versions
from medpretrain.store import Store
from medpretrain.study import Pretraining, Study

Log = Callable[[str], None]


@dataclass
class PretrainJob:
    """One pre-training the study needs, for the dataset it will be evaluated on."""

    dataset: str
    label: str
    request: PretrainRequest
    replicate: int = 0  # which of the study's `pretrain_seeds` pre-trainings of this init

    @property
    def description(self) -> str:
        return f"pre-train {self.label} on {self.request.dataset}"


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    cells_run: int
    cells_reused: int
    pretrainings: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def budgets_of(study: Study) -> list[Budget]:
    b = study.budgets
    return [Budget(fraction=f, imbalance=b.imbalance) for f in b.fractions] + [
        Budget(shots=k, imbalance=b.imbalance) for k in b.shots
    ]


def pretrain_hflip(study: Study, dataset: str) -> float | None:
    """The study's flip probability; else 0 when the *evaluation* dataset's classes mark left/right (flipped
    pre-training would teach invariance to the side those classes differ by, whatever the source), else None:
    the pre-training source's own policy."""
    if study.hflip is not None:
        return study.hflip
    from medpretrain.data import load_dataset

    return 0.0 if load_dataset(dataset, size=study.size).default_hflip == 0 else None


def pretrain_jobs(study: Study) -> list[PretrainJob]:
    """One job per (dataset, pre-training init, pre-training seed); seed k is the init's seed + k."""
    jobs = []
    for dataset in study.dataset_specs:
        for init in study.inits:
            if not isinstance(init, Pretraining):
                continue
            for k in range(study.pretrain_seeds):
                request = PretrainRequest(
                    dataset=init.unlabeled_from or dataset,
                    method=init.method,
                    backbone=study.backbone,
                    epochs=init.epochs,
                    init=init.init,
                    size=study.size,
                    image_size=study.resolved_image_size,
                    small_stem=study.small_stem,
                    seed=init.seed + k,
                    hparams=dict(init.hparams),
                    hflip=pretrain_hflip(study, dataset),
                )
                jobs.append(PretrainJob(dataset=dataset, label=init.display, request=request, replicate=k))
    return jobs


def plan_cells(study: Study, checkpoints: dict[tuple[str, str], Path]) -> list[Cell]:
    """Every cell, ordered dataset → init → protocol (feature-based first) → budget → seed.

    `checkpoints` maps (dataset, init label, replicate) of each pre-training to its finished file; evaluation
    seed s uses replicate s mod `pretrain_seeds`, so with several pre-trainings their variance is part of the
    seed-to-seed variance that the statistics count.
    """
    protocols = sorted(study.protocols, key=lambda p: not get_protocol(p).uses_features)
    cells = []
    for dataset in study.dataset_specs:
        for init in study.inits:
            label = init.display if isinstance(init, Pretraining) else None
            for protocol in protocols:
                for budget in budgets_of(study):
                    for seed in range(study.seeds):
                        replicate = seed % study.pretrain_seeds
                        text = str(checkpoints[dataset, label, replicate]) if label is not None else str(init)
                        cells.append(
                            Cell(
                                dataset=dataset,
                                size=study.size,
                                image_size=study.resolved_image_size,
                                backbone=study.backbone,
                                small_stem=study.small_stem,
                                init=text,
                                protocol=protocol,
                                budget=budget,
                                seed=seed,
                                params=study.params_for(protocol),
                                validation=study.validation,
                                resize=study.resize,
                                hflip=study.hflip,
                                init_label=label,
                                pretrained_here=isinstance(init, Pretraining),
                            )
                        )
    return cells


def explanation_cells(cells: list[Cell]) -> dict[str, Path]:
    """Which fine-tuned networks to keep for Grad-CAM: per (dataset, init) the cell with the most labels
    (largest fraction, else largest shots) and the lowest seed. Returns cell key → relative model path."""
    best: dict[tuple[str, str], Cell] = {}

    def rank(c: Cell) -> tuple[int, float, int]:
        b = c.budget
        return (1, b.fraction, -c.seed) if b.fraction is not None else (0, float(b.shots or 0), -c.seed)

    for cell in cells:
        if get_protocol(cell.protocol).uses_features:
            continue
        group = (cell.dataset, cell.init_name)
        if group not in best or rank(cell) > rank(best[group]):
            best[group] = cell
    return {c.key: Path("models") / f"{c.key}.pt" for c in best.values()}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


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
    from medpretrain.executors import get_executor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "study.json", study.model_dump(mode="json"))
    store = Store(out)
    engine = get_executor(executor)(address=address, log=log)
    started, wall = datetime.now(timezone.utc), time.perf_counter()
    jobs = pretrain_jobs(study)
    bar = tqdm(total=len(jobs) + study.n_cells, desc="study", unit="step", disable=not progress, dynamic_ncols=True)
    result = RunResult(rows=[], cells_run=0, cells_reused=0)
    completed = False
    try:
        checkpoints: dict[tuple[str, str], Path] = {}

        def pretrained(job: PretrainJob, path: Path, seconds: float) -> None:
            checkpoints[job.dataset, job.label, job.replicate] = path
            result.pretrainings.append({"label": job.label, "path": str(path), "seconds": round(seconds, 1)})
            bar.update()

        engine.pretrain(jobs, cache_root(out) / "pretrain", on_done=pretrained, on_start=bar.set_postfix_str)
        cells = plan_cells(study, checkpoints)
        keep = explanation_cells(cells)
        todo = []
        for cell in cells:
            stored = store.get(cell.key)
            if stored is None:
                todo.append(cell)
            else:
                result.rows.append(stored)
                result.cells_reused += 1
                bar.update()
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
