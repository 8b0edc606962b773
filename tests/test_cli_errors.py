"""What the CLI prints when a user gets something wrong (issue 17): brackets survive the console, oversized
subsets are refused, and every input checkable without data fails before a progress bar or any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medpretrain.cli import app

runner = CliRunner()
SUBSET = "pneumoniamnist[train=60,val=40,test=60]"


def _error(args: list[str | Path]) -> str:
    """The one `error:` line of a command that must fail with exit code 2 and no traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    # No progress bar got as far as drawing (tqdm writes "name:   0%|" to stderr).
    assert "%|" not in result.output, result.output
    return lines[0]


def _study(tmp_path: Path, dataset: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"datasets: ['{dataset}']\ninits: [scratch]\nbudgets: {{fractions: [1.0]}}\nseeds: 1\n")
    return path


def test_ray_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, installed or not
    out = tmp_path / "run"
    line = _error(["run", _study(tmp_path, SUBSET), "--executor", "ray", "--out", out])
    assert "medpretrain[ray]" in line, line  # rich used to eat "[ray]" as a style tag
    assert not out.exists()  # refused before the run directory was written


@pytest.mark.parametrize("dataset", ["nosuch[train=10]", "nosuch[train=10,val=5]"])
def test_unknown_dataset_in_subset_fails_before_any_bar(tmp_path: Path, dataset: str) -> None:
    out = tmp_path / "run"
    line = _error(["evaluate", "--dataset", dataset, "--fraction", "1.0", "--out", out])  # progress bars on
    assert f"'{dataset}'" in line, line  # the spec with its brackets, as typed
    assert not out.exists()


def test_bad_subset_syntax_shows_the_spec(tmp_path: Path) -> None:
    line = _error(["evaluate", "--dataset", "pneumoniamnist[train=0]", "--fraction", "1.0", "--out", tmp_path])
    assert "pneumoniamnist[train=0]" in line, line


def test_oversized_subset_is_refused_before_any_bar(tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = _error(["evaluate", "--dataset", "pneumoniamnist[train=99999]", "--fraction", "1.0", "--out", out])
    # Names the spec, the split, the requested and the available count (4708: MedMNIST v2 metadata), and the fix.
    for fragment in ("pneumoniamnist[train=99999]", "train", "99999", "4708", "train=4708 or fewer"):
        assert fragment in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    ("dataset", "fragments"),
    [
        ("pneumoniamnist[train=99999]", ("datasets", "pneumoniamnist[train=99999]", "4708")),
        ("nosuch[train=10]", ("datasets", "unknown dataset 'nosuch' in 'nosuch[train=10]'")),
    ],
)
def test_study_file_subset_errors_before_any_work(tmp_path: Path, dataset: str, fragments: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    line = _error(["run", _study(tmp_path, dataset), "--out", out])
    for fragment in fragments:
        assert fragment in line, line
    assert not out.exists()


def test_pretrain_checks_inputs_before_loading_data(tmp_path: Path) -> None:
    out = tmp_path / "ssl"
    args = ["pretrain", "--method", "simclr", "--epochs", "1", "--out", out]
    assert "nosuch[train=10]" in _error([*args, "--dataset", "nosuch[train=10]"])
    assert "temprature" in _error([*args, "--dataset", SUBSET, "--hp", "temprature=0.1"])
    assert not out.exists()


def test_subset_spec_survives_log_lines_and_summary(tmp_path: Path) -> None:
    args = ["evaluate", "--dataset", SUBSET, "--fraction", "1.0", "--out", tmp_path / "run", "--no-progress"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    lines = second.output.splitlines()
    assert any(line.startswith(f"done already: {SUBSET}") for line in lines), second.output  # a log line
    assert any(line.startswith("│") and SUBSET in line for line in lines), second.output  # the summary table
