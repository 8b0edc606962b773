"""Where a study's work runs: in this process (`local`) or as Ray tasks (`ray`).

An executor only runs things and hands results back; the driver (`runner.run_study`) alone writes the
results store, so a store never sees two writers and a killed worker can never half-write a row.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from medpretrain.cells import Cell, cell_features, run_cell
from medpretrain.errors import MedpretrainError
from medpretrain.plan import PretrainJob
from medpretrain.protocols import get_protocol
from medpretrain.registry import Registry

OnPretrained = Callable[[PretrainJob, Path, float], None]
OnCell = Callable[[Cell, dict[str, Any], Any], None]

# Passed on to Ray workers on other machines; local workers inherit the driver's environment anyway.
FORWARDED_ENV = ("MEDPRETRAIN_DATA", "MEDPRETRAIN_CACHE", "MEDPRETRAIN_OFFLINE", "TORCH_HOME", "HF_HOME")


def _request_key(job: PretrainJob) -> str:
    return json.dumps(asdict(job.request), sort_keys=True, default=str)


def unique_requests(jobs: list[PretrainJob]) -> dict[str, list[PretrainJob]]:
    """Jobs with identical requests (e.g. one `unlabeled_from` source for several datasets) train once."""
    groups: dict[str, list[PretrainJob]] = defaultdict(list)
    for job in jobs:
        groups[_request_key(job)].append(job)
    return groups


def _pretrain(job: PretrainJob, folder: Path) -> tuple[Path, float]:
    from medpretrain.pretrain import pretrain

    started = time.perf_counter()
    # resume=True: a study re-run after a kill continues an interrupted pre-training from its last epoch.
    path = pretrain(job.request, folder, resume=True, progress=False, log=lambda _msg: None)
    return path, time.perf_counter() - started


class Executor(ABC):
    name: ClassVar[str]

    def __init__(self, *, address: str | None = None, log: Callable[[str], None] = print) -> None:
        self.address = address
        self.log = log

    @abstractmethod
    def pretrain(
        self, jobs: list[PretrainJob], folder: Path, *, on_done: OnPretrained, on_start: Callable[[str], Any]
    ) -> None: ...

    @abstractmethod
    def evaluate(
        self,
        cells: list[Cell],
        out_dir: Path,
        *,
        keep: dict[str, Path],
        on_done: OnCell,
        on_start: Callable[[Cell], Any],
    ) -> None: ...

    def close(self) -> None:
        """Release resources (a Ray connection); called even when the run was interrupted."""
        return None

    @classmethod
    def check_available(cls) -> None:
        """Raise MedpretrainError when this executor cannot run here (checked before any work starts)."""
        return None


class LocalExecutor(Executor):
    """Everything in this process, in the runner's order."""

    name = "local"

    def pretrain(
        self, jobs: list[PretrainJob], folder: Path, *, on_done: OnPretrained, on_start: Callable[[str], Any]
    ) -> None:
        for group in unique_requests(jobs).values():
            on_start(group[0].description)
            path, seconds = _pretrain(group[0], folder)
            for job in group:
                on_done(job, path, seconds)

    def evaluate(
        self,
        cells: list[Cell],
        out_dir: Path,
        *,
        keep: dict[str, Path],
        on_done: OnCell,
        on_start: Callable[[Cell], Any],
    ) -> None:
        for cell in cells:
            on_start(cell)
            row, proba = run_cell(cell, out_dir, progress=False, keep_model=keep.get(cell.key))
            on_done(cell, row, proba)


def _ray_threads() -> None:
    """Match torch's threads to the CPUs Ray granted this task (oversubscribed cores run many times slower)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


def _ray_pretrain(job: PretrainJob, folder: str) -> tuple[str, float]:
    _ray_threads()
    path, seconds = _pretrain(job, Path(folder))
    return str(path), seconds


def _ray_features(cell: Cell, index: int, out_dir: str) -> None:
    _ray_threads()
    cell_features(cell, Path(out_dir), cell.init_specs[index], progress=False)


def _ray_cell(cell: Cell, out_dir: str, keep_model: str | None, *_after: Any) -> tuple[dict[str, Any], Any]:
    _ray_threads()
    return run_cell(cell, Path(out_dir), progress=False, keep_model=Path(keep_model) if keep_model else None)


class RayExecutor(Executor):
    """Each pre-training and each cell is a Ray task with its CPU/GPU request; results come back to the driver.

    Order is expressed as task dependencies: a cell's checkpoint exists before the cell is planned (all
    pre-training tasks finish first), and the cells that read frozen features wait for one feature-extraction
    task per init, so features are computed once even when cells run in parallel. Workers on other machines
    need the run directory on a shared filesystem (features, splits and kept models are written there).
    """

    name = "ray"
    cpus_per_task: ClassVar[int] = 1

    def __init__(self, *, address: str | None = None, log: Callable[[str], None] = print) -> None:
        super().__init__(address=address, log=log)
        self.ray = self._import_ray()
        ray = self.ray
        self._owns = not ray.is_initialized()
        if self._owns:
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if address:
                kwargs["runtime_env"] = {"env_vars": env}
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as err:
                raise MedpretrainError(
                    f"cannot reach the Ray cluster at '{address}': {err}".splitlines()[0],
                    "start one with `ray start --head`, or drop --address to start a local Ray instance",
                ) from None
        self.gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    @staticmethod
    def _import_ray() -> Any:
        try:
            import ray
        except ImportError:
            raise MedpretrainError("the ray executor needs Ray", "pip install 'medpretrain[ray]'") from None
        return ray

    @classmethod
    def check_available(cls) -> None:
        cls._import_ray()

    def _options(self, trains: bool) -> dict[str, Any]:
        return {"num_cpus": self.cpus_per_task, "num_gpus": self.gpus if trains else 0, "max_retries": 0}

    def _drain(self, pending: dict[Any, Any], handle: Callable[[Any, Any], None]) -> None:
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            ref = done[0]
            handle(pending.pop(ref), self.ray.get(ref))

    def pretrain(
        self, jobs: list[PretrainJob], folder: Path, *, on_done: OnPretrained, on_start: Callable[[str], Any]
    ) -> None:
        task = self.ray.remote(_ray_pretrain).options(**self._options(trains=True))
        pending = {task.remote(group[0], str(folder)): group for group in unique_requests(jobs).values()}
        if pending:
            on_start(f"{len(pending)} pre-trainings on Ray")

        def handle(group: list[PretrainJob], value: tuple[str, float]) -> None:
            for job in group:
                on_done(job, Path(value[0]), value[1])

        self._drain(pending, handle)

    def evaluate(
        self,
        cells: list[Cell],
        out_dir: Path,
        *,
        keep: dict[str, Path],
        on_done: OnCell,
        on_start: Callable[[Cell], Any],
    ) -> None:
        features = self.ray.remote(_ray_features).options(**self._options(trains=False))
        feature_tasks: dict[tuple[str, ...], Any] = {}
        pending: dict[Any, Cell] = {}
        for cell in cells:
            after = []
            for index, key in enumerate(cell.feature_keys):  # each array extracted once, before its cells
                if key not in feature_tasks:
                    feature_tasks[key] = features.remote(cell, index, str(out_dir))
                after.append(feature_tasks[key])
            trains = not get_protocol(cell.protocol).uses_features
            task = self.ray.remote(_ray_cell).options(**self._options(trains=trains))
            keep_model = str(keep[cell.key]) if cell.key in keep else None
            pending[task.remote(cell, str(out_dir), keep_model, *after)] = cell
        if cells:
            on_start(cells[0])
        self._drain(pending, lambda cell, value: on_done(cell, value[0], value[1]))

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


EXECUTORS: Registry[type[Executor]] = Registry("executor")
for _executor in (LocalExecutor, RayExecutor):
    EXECUTORS.add(_executor.name, _executor)


def get_executor(name: str) -> type[Executor]:
    return EXECUTORS.get(name)


def check_executor(name: str) -> None:
    """An unknown executor, or ray without Ray installed, fails before the run directory is written."""
    get_executor(name).check_available()
