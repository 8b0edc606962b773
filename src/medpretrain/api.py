"""The Python front door (`import medpretrain as mp`): the command line's code paths, called from a notebook.

`mp.run` is `medpretrain run` and `mp.evaluate` is `medpretrain evaluate` — the same study, planner, cell keys,
executors and results store (the command line calls these very functions) — and both hand back a `Run`: the
run directory, read through the store, the report and the statistics module. Nothing is computed twice, and
nothing here has numbers of its own. Expected failures raise `MedpretrainError` with a one-line message.

>>> import medpretrain as mp
>>> study = mp.Study(datasets=["pneumoniamnist[train=60,val=40,test=40]"], inits=["scratch"],
...                  budgets={"fractions": [0.5, 1.0]}, seeds=2, name="doc")
>>> run = mp.run(study, out="runs/doc", progress=False, log=None)
>>> df = run.results()
>>> len(df), sorted(df["fraction"].unique().tolist())
(4, [0.5, 1.0])
>>> bool(df["auc"].between(0, 1).all())
True
>>> mp.open_run("runs/doc").results()["cell_key"].tolist() == df["cell_key"].tolist()
True
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpretrain.errors import MedpretrainError

if TYPE_CHECKING:
    import pandas as pd

    from medpretrain.runner import RunResult
    from medpretrain.study import Study

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    """log=None: the library's progress messages go nowhere."""


class Run:
    """A run directory (`results.db`, predictions, `study.json`, `report.html`), finished or not, read-only.

    Reading never adds or changes a result; `report()` and `export()` write files beside them, as
    `medpretrain report` and `medpretrain export` do. `result` holds what `mp.run` returned for this
    invocation (cells run and reused); it is None for a run opened with `mp.open_run`.
    """

    def __init__(self, out: str | Path, *, result: RunResult | None = None) -> None:
        self.out = Path(out)
        if not (self.out / "results.db").is_file():
            raise MedpretrainError(
                f"{self.out} has no results.db", "give the --out folder of a `medpretrain run` or of mp.run(...)"
            )
        self.result = result

    def __repr__(self) -> str:
        return f"medpretrain.Run({str(self.out)!r})"

    def rows(self) -> list[dict[str, Any]]:
        """The stored rows as the store decodes them: one dict per cell, JSON columns as Python objects."""
        from medpretrain.store import Store

        return Store(self.out).rows()

    @property
    def study(self) -> dict[str, Any] | None:
        """The study as the run recorded it (`study.json`), or None when missing."""
        try:
            data = json.loads((self.out / "study.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def results(self) -> pd.DataFrame:
        """One row per cell: the store's columns, mapping-valued JSON columns expanded (`chosen.C`,
        `augmentation.hflip`, `config.params.…`), list-valued ones (`history`, `n_per_class`,
        `recall_per_class`) kept as lists. The same table `medpretrain export` writes."""
        from medpretrain.export import results_frame

        return results_frame(self.rows())

    def report(self, *, progress: bool = False) -> Path:
        """(Re)build `report.html` from what is stored, as `medpretrain report DIR`, and return its path."""
        from medpretrain.report import build_report

        return build_report(self.out, progress=progress)

    def compare(
        self, a: str, b: str, *, protocol: str | None = None, dataset: str | None = None, metric: str = "auc"
    ) -> pd.DataFrame:
        """Init `a` against init `b` at every budget both have: the report's seed-paired test
        (`stats.paired_from_scores` on the shared test resamples), Holm-adjusted over the rows returned.

        `a` and `b` name an arm as the report does (`scratch`, `ImageNet`, a pre-training's label), or an init
        kind (`imagenet`); case does not matter. One row per (dataset, protocol, budget): `delta` (mean of
        metric(a) − metric(b) over paired seeds), `ci_low`, `ci_high`, `p`, `p_adj`, `significant`, `n_seeds`,
        `method`. The report adjusts over all of its tests together: where it shows the same test, its `p_adj`
        is at least this one.
        """
        import pandas as pd

        from medpretrain.report.run import Run as Evidence
        from medpretrain.stats import ALPHA, METRICS, holm

        if metric not in METRICS:
            raise MedpretrainError(f"unknown metric '{metric}'", f"choose one of: {', '.join(METRICS)}")
        evidence = Evidence(self.out)
        datasets = _chosen(dataset, evidence.datasets, "dataset")
        present = sorted({p for d in datasets for p in evidence.protocols(d)})
        protocols = _chosen(protocol, present, "protocol")
        out = []
        for ds in datasets:
            for proto in (p for p in evidence.protocols(ds) if p in protocols):
                for budget in evidence.budgets(ds, proto):
                    group = evidence.group(ds, proto, budget)
                    rec_a, rec_b = _arm(group, a), _arm(group, b)
                    if rec_a is None or rec_b is None or rec_a is rec_b:
                        continue
                    test = evidence.compare(rec_a, rec_b, metric)
                    nan = float("nan")
                    out.append(
                        {"dataset": ds, "protocol": proto, "budget": budget, "n_labeled": rec_a["n_labeled"],
                         "a": rec_a["arm"], "b": rec_b["arm"], "metric": metric,
                         "delta": test.delta if test else nan, "ci_low": test.low if test else nan,
                         "ci_high": test.high if test else nan, "p": test.p if test else nan,
                         "n_seeds": test.n_seeds if test else 0, "method": test.method if test else "no predictions"}
                    )  # fmt: skip
        if not out:
            raise MedpretrainError(
                f"no budget of this run has both '{a}' and '{b}'", f"arms in this run: {', '.join(evidence.arm_order)}"
            )
        for row, p_adj in zip(out, holm([r["p"] for r in out]), strict=True):
            row["p_adj"] = p_adj
            row["significant"] = bool(p_adj < ALPHA)  # NaN compares False
        order = ["dataset", "protocol", "budget", "n_labeled", "a", "b", "metric", "delta", "ci_low", "ci_high", "p",
                 "p_adj", "significant", "n_seeds", "method"]  # fmt: skip
        return pd.DataFrame(out, columns=order)

    def export(self, path: str | Path | None = None, *, format: str = "csv") -> Path:
        """Write `results()` as csv, parquet or json (default `<run>/results.<format>`), as `medpretrain export`."""
        from medpretrain.export import default_path, write_results

        return write_results(self.results(), path or default_path(self.out, format), format)

    def to_mlflow(self, *, tracking_uri: str | None = None, experiment: str | None = None) -> dict[str, Any]:
        """One MLflow run per cell (`medpretrain export DIR --to mlflow`); runs already exported are kept."""
        from medpretrain.export import to_mlflow

        return to_mlflow(self.out, self.rows(), tracking_uri=tracking_uri, experiment=experiment)


def _chosen(wanted: str | None, present: list[str], what: str) -> list[str]:
    if wanted is None:
        return present
    if wanted not in present:
        raise MedpretrainError(f"no {what} '{wanted}' in this run", f"choose one of: {', '.join(present)}")
    return [wanted]


def _arm(group: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The record of a budget that `name` means: its arm label exactly, else ignoring case, else its init label
    or init kind ignoring case. More than one match at the first level that has any is an error."""
    folded = name.casefold()
    for test in (
        lambda r: r["arm"] == name,
        lambda r: r["arm"].casefold() == folded,
        lambda r: r["init"].casefold() == folded,
        lambda r: r["init_kind"].casefold() == folded,
    ):
        found = [r for r in group if test(r)]
        if len(found) > 1:
            raise MedpretrainError(
                f"'{name}' matches several arms: {', '.join(r['arm'] for r in found)}", "name one of them exactly"
            )
        if found:
            return found[0]
    return None


def open_run(out: str | Path) -> Run:
    """A finished, interrupted or still running run directory, to read (`mp.open_run("runs/quick").results()`)."""
    return Run(out)


def preset(name: str) -> Study:
    """A shipped study (`medpretrain run --preset NAME`): `mp.preset("quick")`."""
    from medpretrain.study import load_study

    return load_study(preset=name)


def _as_study(study: Study | str | Path) -> Study:
    from medpretrain.study import Study, load_study

    if isinstance(study, Study):
        return study
    if isinstance(study, str | Path):
        return load_study(study)
    raise MedpretrainError(
        f"mp.run needs a Study, not {type(study).__name__}", "give mp.Study(...), mp.preset('quick') or a YAML path"
    )


def run(
    study: Study | str | Path,
    out: str | Path = "runs/study",
    *,
    executor: str = "local",
    address: str | None = None,
    progress: bool = True,
    report: bool = False,
    log: Log | None = print,
) -> Run:
    """Run a study as `medpretrain run` does — pre-train, evaluate every cell not yet in `out` — and return it.

    Resumable: interrupted (or run again), the same call skips the stored cells. `study` is a `Study`, a
    `mp.preset(...)` or the path of a study YAML. `report=True` also writes report.html (the command line's
    default; here `Run.report()` builds it on demand). `log=None` silences the progress messages.
    """
    from medpretrain.executors import check_executor
    from medpretrain.runner import run_study

    study = _as_study(study)
    check_executor(executor)
    result = run_study(study, out, executor=executor, address=address, progress=progress, log=log or _quiet)
    handle = Run(out, result=result)
    if report:
        handle.report()
    return handle


def _listed(value: str | Sequence[Any]) -> list[Any]:
    return [value] if isinstance(value, str | int | float) else list(value)


def evaluate(
    dataset: str,
    *,
    init: str | Sequence[str] = "scratch",
    protocol: str | Sequence[str] = "linear",
    fractions: Sequence[float] = (),
    shots: Sequence[int] = (),
    seeds: int = 1,
    backbone: str = "resnet18",
    out: str | Path = "runs/latest",
    executor: str = "local",
    address: str | None = None,
    progress: bool = True,
    log: Log | None = print,
    **options: Any,
) -> Run:
    """Evaluate inits on one dataset at label budgets, as `medpretrain evaluate` (the same study and cells).

    `options` are the command's other options with underscores: `size`, `image_size`, `small_stem`, `imbalance`,
    `mitigation`, `source`, `epochs`, `min_steps`, `lr`, `batch_size`, `class_weighted`, `bn_adapt`,
    `validation`, `resize`, `hflip`, `input_norm`.

    >>> import medpretrain as mp
    >>> run = mp.evaluate(dataset="pneumoniamnist[train=60,val=40,test=40]", init="scratch", protocol="linear",
    ...                   fractions=[0.5, 1.0], out="runs/doc-evaluate", progress=False, log=None)
    >>> run.results()[["protocol", "fraction", "seed"]].values.tolist()
    [['linear', 0.5, 0], ['linear', 1.0, 0]]
    """
    from medpretrain.adhoc import evaluation_study

    named = {"dataset", "init", "protocol", "fraction", "shots", "seeds", "backbone", "executor"}
    allowed = set(inspect.signature(evaluation_study).parameters) - named
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise MedpretrainError(f"unknown option {', '.join(unknown)}", f"allowed: {', '.join(sorted(allowed))}")
    for name in ("imbalance", "mitigation", "source", "lr"):
        if name in options:
            options[name] = _listed(options[name])
    study = evaluation_study(
        dataset, init=_listed(init), protocol=_listed(protocol), fraction=list(fractions), shots=list(shots),
        seeds=seeds, backbone=backbone, executor=executor, **options,
    )  # fmt: skip
    return run(study, out, executor=executor, address=address, progress=progress, log=log)
