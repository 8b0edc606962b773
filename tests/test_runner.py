"""The main job: study files, presets, the runner (resumable after SIGKILL) and the Ray executor, on real data."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medpretrain.cli import app
from medpretrain.data import load_dataset
from medpretrain.runner import explanation_cells, plan_cells, pretrain_jobs
from medpretrain.store import Store
from medpretrain.study import load_study, preset_names, validate_study

runner = CliRunner()

# A real but tiny study: 2 inits (one pre-trained first) × 2 protocols × 2 budgets × 2 seeds = 16 cells.
TINY = {
    "datasets": [{"name": "pneumoniamnist", "train": 60, "val": 40, "test": 60}],
    "backbone": "resnet18",
    "image_size": 28,
    "inits": ["scratch", {"method": "simclr", "epochs": 2, "hparams": {"batch_size": 30, "warmup_epochs": 1}}],
    "protocols": ["linear", "finetune"],
    "budgets": {"fractions": [0.5, 1.0]},
    "seeds": 2,
    "finetune": {"epochs": 1, "min_steps": 0, "lr": 1e-3},
}
N_CELLS = 16


def write_study(tmp_path: Path, study: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study))
    return path


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """The real console entry point in a subprocess (what a user types), environment inherited."""
    proc = subprocess.run(
        [sys.executable, "-m", "medpretrain", *map(str, args)], capture_output=True, text=True, timeout=900
    )
    return proc.returncode, proc.stdout, proc.stderr


def row_keys(out: Path) -> list[str]:
    return [r["cell_key"] for r in Store(out).rows()]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_study(tmp_path_factory.mktemp("study"), TINY)


@pytest.fixture(scope="module")
def uninterrupted(tiny_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    code, stdout, stderr = run_cli("run", tiny_study, "--out", out, "--no-report", "--no-progress")
    assert code == 0, stderr
    assert "16 cells run, 0 reused" in stdout
    return out


def test_presets_are_listed_and_valid():
    assert {"quick", "paper"} <= set(preset_names())
    result = runner.invoke(app, ["run", "--list-presets"])
    assert result.exit_code == 0, result.output
    assert "preset: quick" in result.output and "preset: paper" in result.output
    quick = load_study(preset="quick")
    methods = {i.method for i in quick.inits if not isinstance(i, str)}
    assert "spark" in methods and methods & {"simclr", "moco", "byol", "swav", "dino", "barlow_twins", "vicreg"}
    assert {"scratch", "imagenet"} <= {i for i in quick.inits if isinstance(i, str)}
    assert any(not isinstance(i, str) and i.init == "imagenet" for i in quick.inits)  # ImageNet → self-supervised
    assert {"linear", "finetune"} <= set(quick.protocols) and quick.seeds == 3
    assert min(quick.budgets.fractions) <= 0.02 and max(quick.budgets.fractions) == 1.0
    paper = load_study(preset="paper")  # `datasets: available` = the files found in MEDPRETRAIN_DATA
    assert {"pneumoniamnist", "bloodmnist"} <= set(paper.dataset_specs) and paper.seeds == 5
    assert paper.budgets.fractions == [0.01, 0.1, 0.25, 1.0]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"inits": ["scratch", {"method": "simclrr", "epochs": 3}]}, "inits.1.method: unknown method 'simclrr'"),
        ({"budgets": {"fractions": [-0.1]}}, "budgets.fractions"),
        ({"budgets": {"shots": [0]}}, "budgets.shots"),
        ({"datasets": ["pneumoniamnistx"]}, "datasets: unknown dataset 'pneumoniamnistx'"),
        ({"protocols": ["linear", "svm"]}, "protocols: unknown protocol"),
        ({"protocol": ["linear"]}, "protocol: unknown key"),
        ({"finetune": {"epoch": 3}}, "finetune"),
        ({"inits": [{"method": "simclr", "epochs": 3, "hparams": {"temprature": 0.1}}]}, "temprature"),
        ({"backbone": "resnet1000"}, "backbone: unknown backbone"),
    ],
)
def test_invalid_study_fails_before_training_naming_the_key(tmp_path: Path, change: dict, named: str):
    path = write_study(tmp_path, {**TINY, **change})
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert named in result.output
    assert len(result.output.strip().splitlines()) == 1 or "error:" in result.output
    assert not out.exists()  # nothing trained, nothing written


def test_study_errors_list_allowed_values():
    with pytest.raises(Exception) as err:
        validate_study({**TINY, "inits": [{"method": "nope", "epochs": 1}]}, "s.yaml")
    assert "simclr" in str(err.value) and "spark" in str(err.value)


def test_plan_orders_pretraining_and_features_once(tmp_path: Path):
    study = validate_study(TINY, "tiny")
    jobs = pretrain_jobs(study)
    assert [j.request.method for j in jobs] == ["simclr"]
    assert jobs[0].request.dataset == "pneumoniamnist[train=60,val=40,test=60]"
    fake = tmp_path / "fake.pt"
    from medpretrain.backbones import create_backbone
    from medpretrain.inits import save_checkpoint

    save_checkpoint(fake, create_backbone("resnet18"), image_size=28, method="simclr")
    cells = plan_cells(study, {(jobs[0].dataset, jobs[0].label, jobs[0].replicate): fake})
    assert len(cells) == N_CELLS and len({c.key for c in cells}) == N_CELLS
    # Feature-based protocols of an init run back to back (one extraction), before its fine-tuning cells.
    order = [(c.init_name, c.protocol) for c in cells]
    assert order.index(("scratch", "finetune")) > max(i for i, o in enumerate(order) if o == ("scratch", "linear"))
    kept = explanation_cells(cells)
    assert len(kept) == 2  # one fine-tuned network per init, for Grad-CAM
    chosen = [c for c in cells if c.key in kept]
    assert all(c.protocol == "finetune" and c.budget.fraction == 1.0 and c.seed == 0 for c in chosen)


def test_subset_is_fixed_and_stratified():
    full = load_dataset("pneumoniamnist")
    sub = load_dataset("pneumoniamnist[train=60,val=40,test=60]")
    assert [len(sub.labels[s]) for s in ("train", "val", "test")] == [60, 40, 60]
    assert sub.key != full.key and sub.name == "pneumoniamnist[train=60,val=40,test=60]"
    share_full = full.labels["train"].mean()
    assert abs(sub.labels["train"].mean() - share_full) < 0.02  # class proportions kept
    again = load_dataset("pneumoniamnist[train=60, val=40, test=60]")
    assert (again.labels["test"] == sub.labels["test"]).all()


def cells_run_reused(stdout: str) -> tuple[int, int]:
    match = re.search(r"\((\d+) cells run, (\d+) reused\)", stdout)
    assert match, stdout
    return int(match[1]), int(match[2])


def test_run_writes_every_cell_and_reruns_nothing(tiny_study: Path, uninterrupted: Path):
    keys = row_keys(uninterrupted)
    assert len(keys) == N_CELLS == len(set(keys))
    assert len(list((uninterrupted / "models").glob("*.pt"))) == 2
    assert (uninterrupted / "study.json").exists() and (uninterrupted / "run_log.jsonl").exists()
    inits = {r["init"] for r in Store(uninterrupted).rows()}
    assert inits == {"scratch", "simclr (2 ep)"}
    kinds = {(r["init"], r["init_kind"]) for r in Store(uninterrupted).rows()}
    assert kinds == {("scratch", "scratch"), ("simclr (2 ep)", "pretrained")}  # pre-trained by this study
    code, stdout, stderr = run_cli("run", tiny_study, "--out", uninterrupted, "--no-report", "--no-progress")
    assert code == 0, stderr
    assert cells_run_reused(stdout) == (0, N_CELLS)
    assert row_keys(uninterrupted) == keys


def test_sigkill_then_same_command_completes_without_duplicates(tiny_study: Path, uninterrupted: Path, tmp_path: Path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medpretrain", "run", str(tiny_study), "--out", str(out), "--no-report"]
    proc = subprocess.Popen([*cmd, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "results.db"
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            with sqlite3.connect(db) as con:
                try:
                    n = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                except sqlite3.OperationalError:
                    n = 0
            if n >= 5:  # mid-grid: some linear and some fine-tuning cells done
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = n
                break
        time.sleep(0.1)
    proc.wait()
    assert killed_at is not None and killed_at < N_CELLS, "the run ended before it could be killed"
    code, stdout, stderr = run_cli("run", tiny_study, "--out", out, "--no-report", "--no-progress")
    assert code == 0, stderr
    keys = row_keys(out)
    assert len(keys) == len(set(keys)) == N_CELLS
    assert set(keys) == set(row_keys(uninterrupted))
    ran, reused = cells_run_reused(stdout)
    assert reused >= killed_at and ran + reused == N_CELLS


def test_ray_executor_gives_the_same_rows(tiny_study: Path, uninterrupted: Path, tmp_path: Path):
    out = tmp_path / "ray"
    code, _, stderr = run_cli("run", tiny_study, "--out", out, "--no-report", "--no-progress", "--executor", "ray")
    assert code == 0, stderr
    keys = row_keys(out)
    assert len(keys) == len(set(keys)) == N_CELLS
    assert set(keys) == set(row_keys(uninterrupted))


def test_report_command_needs_a_run_directory(tmp_path: Path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no results.db" in result.output


def test_run_needs_a_study_or_a_preset(tmp_path: Path):
    for args in (["run"], ["run", str(tmp_path / "missing.yaml")], ["run", "--preset", "nope"]):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, args
        assert "error:" in result.output
    assert not (tmp_path / "out").exists()
