"""The Python API (`import medpretrain as mp`), `medpretrain export` and the MLflow export, on real MedMNIST files.

One tiny study (pneumoniamnist subset, scratch against the noise control, linear probe, 2 budgets × 2 seeds) is
run once through `mp.run` and once through `medpretrain run`; the other tests read those run directories.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import os
import re
import runpy
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import medpretrain as mp
from medpretrain.cli import app
from medpretrain.runtime import torch_threads
from medpretrain.store import JSON_COLUMNS

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
STUDY: dict[str, Any] = {
    "name": "api-test",
    "datasets": ["pneumoniamnist[train=60,val=40,test=40]"],
    "inits": ["scratch", "noise"],
    "protocols": ["linear"],
    "budgets": {"fractions": [0.5, 1.0]},
    "seeds": 2,
}
N_CELLS = 2 * 2 * 2
VARYING = {"seconds", "created_at"}  # wall-clock facts: differ between two runs of the same cell


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same study into two directories: `api` through mp.run, `cli` through `medpretrain run`."""
    root = tmp_path_factory.mktemp("api")
    study_file = root / "study.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    with torch_threads(1):
        run = mp.run(mp.Study(**STUDY), out=root / "api", progress=False, log=None)
        assert run.result is not None and run.result.cells_run == N_CELLS
        result = invoke("run", study_file, "--out", root / "cli", "--no-report", "--no-progress")
    assert result.exit_code == 0, result.output
    return {"api": root / "api", "cli": root / "cli", "study_file": study_file}


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(a: Any, b: Any) -> bool:
    return (_missing(a) and _missing(b)) or bool(a == b)


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """A stored JSON mapping as the column names the API promises: nested keys joined by dots."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}.{key}").items()}
    return {prefix: value}


def test_the_names_import_lazily() -> None:
    code = "import sys, medpretrain; print([m for m in ('torch', 'pandas', 'medpretrain.api') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # `import medpretrain` stays cheap
    importlib.import_module("medpretrain.cells")  # the cell evaluator, under another name than mp.evaluate
    assert mp.evaluate.__module__ == mp.run.__module__ == "medpretrain.api"
    assert mp.Study.__name__ == "Study"
    assert set(mp.__all__) <= set(dir(mp)) and mp.open_run.__name__ == "open_run"
    with pytest.raises(AttributeError):
        mp.no_such_name  # noqa: B018


def test_results_are_the_rows_medpretrain_run_stores(runs: dict[str, Path]) -> None:
    assert mp.Study.from_yaml(runs["study_file"]) == mp.Study(**STUDY)
    df = mp.open_run(runs["api"]).results()
    with sqlite3.connect(runs["cli"] / "results.db") as db:
        db.row_factory = sqlite3.Row
        stored = [dict(r) for r in db.execute("SELECT * FROM results")]
    assert len(df) == len(stored) == N_CELLS
    assert set(df["cell_key"]) == {r["cell_key"] for r in stored}
    expected_columns: set[str] = set()
    by_key = df.set_index("cell_key")
    for raw in stored:
        got = by_key.loc[raw["cell_key"]]
        for column, value in raw.items():
            decoded = json.loads(value) if column in JSON_COLUMNS and value is not None else value
            leaves = _leaves(decoded, column) if isinstance(decoded, dict) else {column: decoded}
            expected_columns |= leaves.keys()
            for name, want in leaves.items():
                if column in VARYING or name == "cell_key":
                    continue
                assert _same(got[name], want), (raw["cell_key"], name, got[name], want)
    assert set(df.columns) == expected_columns
    assert isinstance(df.loc[0, "n_per_class"], list) and "chosen.C" in df and "augmentation.hflip" in df
    assert set(df["init"]) == {"scratch", "noise"} and df["auc"].between(0, 1).all()


def test_compare_is_the_reports_paired_test_per_budget(runs: dict[str, Path]) -> None:
    from medpretrain.report.run import Run as Evidence

    run = mp.open_run(runs["api"])
    table = run.compare("Scratch", "noise", protocol="linear")
    assert list(table["budget"]) == ["0.5", "1"] and set(table["a"]) == {"scratch"} and set(table["b"]) == {"noise"}
    assert (table["n_seeds"] == 2).all() and (table["p_adj"] >= table["p"]).all()
    assert ((table["ci_low"] <= table["delta"]) & (table["delta"] <= table["ci_high"])).all()
    df = run.results()
    for _, row in table.iterrows():
        per_seed = df[df["fraction"] == float(row["budget"])].pivot(index="seed", columns="init", values="auc")
        assert row["delta"] == pytest.approx((per_seed["scratch"] - per_seed["noise"]).mean(), abs=1e-9)
    # The report's own test of the same pair (best on validation against the other): the same p-value.
    family = [
        e for e in Evidence(runs["api"]).family() if {e["best"]["arm"], e["other"]["arm"]} == {"scratch", "noise"}
    ]
    assert len(family) == 2
    for entry in family:
        ours = table[table["budget"] == entry["budget"]].iloc[0]
        assert entry["test"].p == pytest.approx(ours["p"], rel=1e-12)
        sign = 1 if entry["best"]["arm"] == "scratch" else -1
        assert sign * entry["test"].delta == pytest.approx(ours["delta"], rel=1e-12)
    with pytest.raises(mp.MedpretrainError, match="arms in this run: scratch, noise"):
        run.compare("scratch", "imagenet")
    with pytest.raises(mp.MedpretrainError, match="no protocol 'finetune' in this run"):
        run.compare("scratch", "noise", protocol="finetune")
    with pytest.raises(mp.MedpretrainError, match="unknown metric 'f1'"):
        run.compare("scratch", "noise", metric="f1")


def test_export_files_have_every_row_and_the_results_columns(runs: dict[str, Path], tmp_path: Path) -> None:
    run = mp.open_run(runs["api"])
    df = run.results()
    result = invoke("export", runs["api"], "--format", "parquet", "--out", tmp_path / "rows.parquet")
    assert result.exit_code == 0, result.output
    assert f"({N_CELLS} cells)" in result.output
    back = pd.read_parquet(tmp_path / "rows.parquet")
    assert list(back.columns) == list(df.columns) and len(back) == N_CELLS
    assert list(back["cell_key"]) == list(df["cell_key"]) and list(back["auc"]) == list(df["auc"])
    assert [json.loads(v) for v in back["n_per_class"]] == list(df["n_per_class"])  # lists as JSON text
    csv = pd.read_csv(run.export(tmp_path / "rows.csv", format="csv"))
    rows = json.loads(run.export(tmp_path / "rows.json", format="json").read_text())
    assert list(csv.columns) == list(df.columns) and list(csv["seed"]) == list(df["seed"])
    assert [list(r) for r in rows] == [list(df.columns)] * N_CELLS and rows[0]["n_per_class"] == df.loc[
        0, "n_per_class"
    ]
    default = invoke("export", runs["api"])  # csv beside the store
    assert "--tracking-uri" in runner.invoke(app, ["export", "--help"]).output
    assert default.exit_code == 0 and len(pd.read_csv(runs["api"] / "results.csv")) == N_CELLS


def test_mlflow_gets_one_run_per_cell_and_a_second_export_adds_none(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    (runs["api"] / "report.html").write_text("<html>report</html>")  # a report beside the store is logged too
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    first = invoke("export", runs["api"], "--to", "mlflow", "--tracking-uri", uri, "--experiment", "api-test")
    assert first.exit_code == 0, first.output
    assert f"{N_CELLS} runs created, 0 already there" in first.output
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # opted in for the export only

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("api-test").experiment_id
    exported = client.search_runs([experiment])
    df = mp.open_run(runs["api"]).results().set_index("cell_key")
    assert sorted(r.data.tags["medpretrain.cell_key"] for r in exported) == sorted(df.index)
    one = exported[0]
    row = df.loc[one.data.tags["medpretrain.cell_key"]]
    params, metrics = one.data.params, one.data.metrics
    assert (params["dataset"], params["init"], params["protocol"]) == (row["dataset"], row["init"], "linear")
    assert float(params["fraction"]) == row["fraction"] and int(params["seed"]) == row["seed"]
    assert float(params["chosen.C"]) == row["chosen.C"] and float(params["augmentation.hflip"]) == 0.5
    for name in ("auc", "auc_ci_low", "auc_ci_high", "acc", "balanced_acc", "val_auc", "val_acc"):
        assert metrics[name] == pytest.approx(row[name])
    assert {a.path for a in client.list_artifacts(one.info.run_id)} == {"report.html", "study.json"}
    assert one.info.status == "FINISHED"

    again = mp.open_run(runs["api"]).to_mlflow(tracking_uri=uri, experiment="api-test")
    assert (again["created"], again["kept"]) == (0, N_CELLS)
    # An export killed half-way leaves an unfinished run: the next export replaces it, still one per cell.
    client.set_terminated(one.info.run_id, "RUNNING")
    third = mp.open_run(runs["api"]).to_mlflow(tracking_uri=uri, experiment="api-test")
    assert (third["created"], third["kept"], third["replaced"]) == (1, N_CELLS - 1, 1)
    assert len(client.search_runs([experiment])) == N_CELLS


def test_bad_input_is_one_line_naming_the_fix(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for args, message in (
        ([runs["api"], "--format", "xlsx"], "unknown export format 'xlsx'"),
        ([runs["api"], "--to", "wandb"], "unknown export target 'wandb'"),
        ([tmp_path], "has no results.db"),
        ([runs["api"], "--experiment", "x"], "add --to mlflow"),
    ):
        result = invoke("export", *args)
        assert result.exit_code == 2, result.output
        (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
        assert message in line
    with pytest.raises(mp.MedpretrainError, match=re.escape("has no results.db")):
        mp.open_run(tmp_path)
    with pytest.raises(mp.MedpretrainError, match=re.escape("Study(...): budgets.fractions")):
        mp.Study(**{**STUDY, "budgets": {"fractions": [2.0]}})
    with pytest.raises(mp.MedpretrainError, match=re.escape("mp.run needs a Study, not int")):
        mp.run(42, out=tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(mp.MedpretrainError, match="unknown option epoch"):
        mp.evaluate(dataset="pneumoniamnist", fractions=[1.0], epoch=3)
    with pytest.raises(mp.MedpretrainError, match="no label budget given"):
        mp.evaluate(dataset="pneumoniamnist")
    with pytest.raises(mp.MedpretrainError, match="unknown preset 'nope'"):
        mp.preset("nope")
    for name in ("mlflow", "mlflow.exceptions", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(mp.MedpretrainError, match=re.escape("pip install -e '.[mlflow]'")):
        mp.open_run(runs["api"]).to_mlflow(tracking_uri=str(tmp_path / "mlruns"))


def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "scratch" in printed and "noise" in printed and "p_adj" in printed
    assert len(pd.read_parquet(tmp_path / "runs/readme/results.parquet")) == N_CELLS
    assert len(mp.open_run(tmp_path / "runs/readme-blood").results()) == 2


def test_the_quickstart_example_runs_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["quickstart.py", str(tmp_path / "qs")])
    names = runpy.run_path(str(REPO / "examples" / "quickstart.py"), run_name="__main__")
    assert len(names["df"]) == N_CELLS and len(names["curve"]) == 4  # 2 inits × 2 label counts
    assert (tmp_path / "qs" / "quickstart.png").read_bytes()[:4] == b"\x89PNG"


def test_the_docstring_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medpretrain.api
    import medpretrain.export
    import medpretrain.study

    monkeypatch.chdir(tmp_path)
    for module in (medpretrain.api, medpretrain.export, medpretrain.study):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__
