"""Class imbalance (issue 14, point 5): exact r:1 labelled subsets, per-class counts in the rows, the mitigations
of the linear probe and of fine-tuning, and the report's imbalance section. Real MedMNIST files, tiny subsets."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from markupsafe import escape
from typer.testing import CliRunner

from medpretrain.budgets import Budget, allocation, select
from medpretrain.cells import Cell
from medpretrain.cli import app
from medpretrain.data import load_dataset
from medpretrain.data.base import Dataset, Task
from medpretrain.errors import MedpretrainError
from medpretrain.inits import parse_init
from medpretrain.metrics import score
from medpretrain.mitigations import MITIGATIONS, get_mitigation
from medpretrain.protocols import EvalContext, get_protocol
from medpretrain.report import build_report
from medpretrain.report.imbalance import imbalance
from medpretrain.report.run import Run
from medpretrain.runtime import cache_root, torch_threads
from medpretrain.study import validate_study
from medpretrain.train import FinetuneConfig, finetune
from medpretrain.train.finetune import _batches

runner = CliRunner()
MITIGATION_NAMES = ("none", "class_weighted", "balanced_sampler", "logit_adjustment")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _counts(ds: Dataset, idx: np.ndarray) -> np.ndarray:
    return np.bincount(ds.labels["train"][idx], minlength=ds.num_classes)


def _exact(counts: np.ndarray, ratio: float) -> bool:
    """Largest / smallest is `ratio`, up to one image of rounding on the largest class."""
    return abs(int(counts.max()) - ratio * int(counts.min())) <= 1


# ------------------------------------------------------------------------------------------ the subsets


@pytest.mark.parametrize("budget", [Budget(fraction=0.1, imbalance=20), Budget(shots=30, imbalance=20)])
def test_imbalance_20_on_retinamnist_is_exactly_20(budget: Budget) -> None:
    ds = load_dataset("retinamnist")
    natural = np.bincount(ds.labels["train"])
    assert natural.max() / natural.min() < 8  # retinamnist is 7.4:1 by nature: removing images cannot reach 20
    for seed in (0, 1):
        idx = select(ds.labels["train"], ds.task, budget, seed, ds.classes)
        counts = _counts(ds, idx)
        assert _exact(counts, 20), counts
        assert counts.argmax() == natural.argmax() and counts.argmin() == natural.argmin()  # ranks kept
        # The size of the same budget without imbalance (every class's count is the profile's, not the data's).
        balanced = len(select(ds.labels["train"], ds.task, Budget(fraction=budget.fraction, shots=budget.shots), 0))
        assert abs(len(idx) - balanced) <= 1
    assert not np.array_equal(
        select(ds.labels["train"], ds.task, budget, 0), select(ds.labels["train"], ds.task, budget, 1)
    )


def test_a_ratio_below_the_natural_one_is_exact_not_natural() -> None:
    ds = load_dataset("retinamnist")  # 7.4:1 by nature
    counts = _counts(ds, select(ds.labels["train"], ds.task, Budget(fraction=0.5, imbalance=3), 0, ds.classes))
    assert _exact(counts, 3), counts
    # A 58:1 data set made from organamnist's real labels (its largest class against 106 images of another).
    y = load_dataset("organamnist").labels["train"]
    keep = np.concatenate([np.flatnonzero(y == 6), np.flatnonzero(y == 1)[:106], np.flatnonzero(y == 0)[:900]])
    labels = np.searchsorted([0, 1, 6], y[keep])  # classes 0, 1, 6 → 0, 1, 2
    assert round(np.bincount(labels).max() / np.bincount(labels).min()) == 58
    for budget in (Budget(fraction=0.2, imbalance=10), Budget(fraction=1.0, imbalance=10)):
        counts = np.bincount(labels[select(labels, Task.MULTICLASS, budget, 0)])
        assert _exact(counts, 10), counts


def test_a_budget_too_large_for_the_ratio_shrinks_and_says_so() -> None:
    y = load_dataset("retinamnist").labels["train"]
    shrunk = allocation(y, Task.ORDINAL, Budget(fraction=1.0, imbalance=20))
    assert shrunk.requested == len(y) and shrunk.counts.sum() < len(y)  # all 1080 labels cannot be 20:1
    assert _exact(shrunk.counts, 20) and (shrunk.counts <= np.bincount(y)).all()
    balanced = allocation(y, Task.ORDINAL, Budget(fraction=0.5, imbalance=1))
    assert len(set(balanced.counts.tolist())) == 1  # 1 = balanced
    with pytest.raises(MedpretrainError, match="needs at least 24 labels"):
        allocation(y, Task.ORDINAL, Budget(shots=1, imbalance=20))  # 5 labels cannot be 20:1
    with pytest.raises(MedpretrainError, match="needs 1000 training images of class"):
        allocation(y, Task.ORDINAL, Budget(fraction=1.0, imbalance=1000))
    with pytest.raises(MedpretrainError, match="single-label tasks only"):
        select(np.eye(3, dtype=int)[y % 3], Task.MULTILABEL, Budget(fraction=0.5, imbalance=2), 0)


def test_cell_keys_change_with_the_subset_and_the_mitigation() -> None:
    def cell(budget: Budget, params: dict[str, Any]) -> Cell:
        return Cell("retinamnist", 28, 28, "resnet18", False, "scratch", "linear", budget, 0, params)

    plain = Budget(fraction=0.1)
    assert "imbalance_version" not in cell(plain, {}).config()  # balanced budgets keep the keys they had
    assert cell(Budget(fraction=0.1, imbalance=20), {}).config()["imbalance_version"] == 2
    assert cell(plain, {"mitigation": "none"}).key == cell(plain, {}).key  # the default spelt out
    keys = {cell(plain, {"mitigation": m} if m != "none" else {}).key for m in MITIGATION_NAMES}
    assert len(keys) == len(MITIGATION_NAMES)


# ------------------------------------------------------------------------------------------ mitigations


def _pixels(ds: Dataset) -> dict[str, np.ndarray]:
    """7×7 average-pooled pixels as frozen features: the probe only needs arrays, and these need no network."""
    return {s: F.avg_pool2d(ds.images[s].float() / 255, 4).flatten(1).numpy() for s in ("train", "val", "test")}


def _context(ds: Dataset, idx: np.ndarray, params: dict[str, Any], features: Any = None) -> EvalContext:
    return EvalContext(
        dataset=ds,
        train_idx=idx,
        init=parse_init("scratch"),
        backbone="resnet18",
        small_stem=False,
        seed=0,
        params=params,
        features=features,
        progress=False,
    )


def test_each_linear_mitigation_raises_balanced_accuracy_on_a_20_to_1_subset() -> None:
    ds = load_dataset("retinamnist")
    feats = _pixels(ds)
    idx = select(ds.labels["train"], ds.task, Budget(fraction=0.2, imbalance=20), 0, ds.classes)
    rare = int(np.argmin(_counts(ds, idx)))
    results = {}
    for name in MITIGATION_NAMES:
        pred = get_protocol("linear").run(_context(ds, idx, {"mitigation": name}, lambda init=None: feats))
        assert pred.extra["mitigation"] == name
        results[name] = (score(ds.labels["test"], pred.test_proba, ds.task), pred.test_proba.argmax(axis=1))
    base_bacc, base_pred = results["none"][0]["balanced_acc"], results["none"][1]
    for name in MITIGATION_NAMES[1:]:
        metrics, pred = results[name]
        assert metrics["balanced_acc"] > base_bacc + 0.02, (name, metrics["balanced_acc"], base_bacc)
        assert (pred == rare).sum() > (base_pred == rare).sum() + 10, name  # the rarest class gets predicted
    assert results["balanced_sampler"][0] != results["class_weighted"][0]  # oversampling is not the weights


def test_each_finetune_mitigation_moves_predictions_towards_the_rare_class() -> None:
    ds = load_dataset("pneumoniamnist[val=64,test=64]")
    idx = select(ds.labels["train"], ds.task, Budget(shots=16, imbalance=10), 0, ds.classes)
    rare = int(np.argmin(_counts(ds, idx)))
    tiny = {"epochs": 1, "min_steps": 6, "batch_size": 16, "lr": 1e-3, "evals": 1, "warmup_epochs": 0, "augment": False}
    rare_proba = {}
    for name in MITIGATION_NAMES:
        pred = get_protocol("finetune").run(_context(ds, idx, {**tiny, "mitigation": name}))
        assert pred.steps == 6
        rare_proba[name] = float(pred.test_proba[:, rare].mean())
    for name in MITIGATION_NAMES[1:]:
        assert rare_proba[name] > rare_proba["none"] + 0.02, rare_proba


def test_the_balanced_sampler_draws_every_class_alike_in_the_training_loop() -> None:
    y = np.array([0] * 200 + [1] * 10)
    x = torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8)
    weights = get_mitigation("balanced_sampler").sampling_weights(y, 2)
    drawn = torch.cat([b[1] for b in _batches((x, torch.as_tensor(y)), 30, shuffle=True, seed=0, weights=weights)])
    plain = torch.cat([b[1] for b in _batches((x, torch.as_tensor(y)), 30, shuffle=True, seed=0)])
    assert len(drawn) == len(y)  # an epoch is as many draws as labels
    assert 0.35 < float(drawn.float().mean()) < 0.65  # the rare class half the time, not 1 in 21
    assert int(plain.sum()) == 10


def test_logit_adjustment_and_class_weights_are_the_papers_quantities() -> None:
    y = np.array([0] * 30 + [1] * 3)
    offset = get_mitigation("logit_adjustment").logit_offset(y, 2, tau=1.0)
    np.testing.assert_allclose(offset, np.log([30 / 33, 3 / 33]))  # τ·log π (Menon et al. 2021)
    np.testing.assert_allclose(get_mitigation("class_weighted").loss_weights(y, Task.BINARY, 2), [33 / 60, 33 / 6])
    assert get_mitigation("class_weighted").sklearn_class_weight == "balanced"
    assert get_mitigation("none").loss_weights(y, Task.BINARY, 2) is None
    assert sorted(MITIGATIONS) == sorted(MITIGATION_NAMES)


def _multilabel() -> Dataset:
    rng = np.random.default_rng(0)
    images = {
        s: torch.randint(0, 255, (n, 1, 16, 16), dtype=torch.uint8) for s, n in (("train", 16), ("val", 8), ("test", 8))
    }
    labels = {s: (rng.random((len(x), 3)) < 0.4).astype(np.int64) for s, x in images.items()}
    return Dataset(name="ml", task=Task.MULTILABEL, classes=["a", "b", "c"], images=images, labels=labels,
                   key="ml", source="test", size=16, image_size=16)  # fmt: skip


@pytest.mark.parametrize("name", ["balanced_sampler", "logit_adjustment"])
def test_mitigations_without_meaning_for_multilabel_are_refused(name: str) -> None:
    ds = _multilabel()
    feats = {s: ds.images[s].flatten(1).float().numpy() for s in ds.images}
    with pytest.raises(MedpretrainError, match="not defined for multi-label"):
        get_protocol("linear").run(_context(ds, np.arange(16), {"mitigation": name}, lambda init=None: feats))
    with pytest.raises(MedpretrainError, match="not defined for multi-label"):
        finetune(torch.nn.Identity(), ds, np.arange(16), FinetuneConfig(mitigation=name), seed=0, progress=False)  # type: ignore[arg-type]


def test_bad_mitigations_are_one_line_errors(tmp_path: Path) -> None:
    base = {"datasets": ["retinamnist"], "inits": ["scratch"], "budgets": {"fractions": [0.1]}}
    with pytest.raises(MedpretrainError, match="unknown mitigation 'reweight'"):
        validate_study({**base, "mitigations": ["reweight"]}, "study")
    with pytest.raises(MedpretrainError, match="not in both"):
        validate_study({**base, "mitigations": ["none"], "params": {"linear": {"mitigation": "class_weighted"}}}, "s")
    with pytest.raises(MedpretrainError, match="'mitigation': 'oops'"):
        validate_study({**base, "params": {"finetune": {"mitigation": "oops"}}}, "study")
    result = runner.invoke(app, ["evaluate", "--dataset", "retinamnist", "--fraction", "0.1", "--mitigation", "x",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")], result.output


# ------------------------------------------------------------------------------------------ rows and report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`medpretrain evaluate` with two ratios, two mitigations and two seeds: 8 linear cells on retinamnist."""
    out = tmp_path_factory.mktemp("imbalance-run")
    args = ["evaluate", "--dataset", "retinamnist[val=100,test=150]", "--init", "scratch", "--protocol", "linear",
            "--fraction", "0.2", "--imbalance", "5", "--imbalance", "20", "--mitigation", "none",
            "--mitigation", "class_weighted", "--seeds", "2", "--no-progress", "--out", str(out),
            "--json", str(out / "rows.json")]  # fmt: skip
    with torch_threads(1):
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_rows_record_the_counts_per_class_and_the_mitigation(run_dir: Path) -> None:
    rows = json.loads((run_dir / "rows.json").read_text())
    assert len(rows) == 8
    assert {(r["imbalance"], r["mitigation"]) for r in rows} == {
        (r, m) for r in (5.0, 20.0) for m in ("none", "class_weighted")
    }
    for row in rows:
        counts = np.array(row["n_per_class"])
        assert counts.sum() == row["n_labeled"] and _exact(counts, row["imbalance"]), row["n_per_class"]
        assert row["n_requested"] == 216 and len(row["recall_per_class"]) == 5
        assert np.mean(row["recall_per_class"]) == pytest.approx(row["balanced_acc"])
        assert row["config"]["imbalance_version"] == 2


def test_the_report_shows_metrics_against_the_ratio_per_init_and_mitigation(run_dir: Path) -> None:
    sections = imbalance(Run(run_dir))
    assert len(sections) == 1
    section = sections[0]
    assert section["src"].startswith("data:image/png;base64,")
    table = {(r["mitigation"], r["ratio"]): r for r in section["table"]}
    assert set(table) == {(m, r) for m in ("none", "class_weighted") for r in ("5", "20")}
    assert all(len(r["recall"]) == 5 and r["seeds"] == 2 for r in table.values())
    assert len(section["tests"]) == 2  # class_weighted against none at each ratio
    assert all(t["verdict"] in ("significant", "no significant difference") for t in section["tests"])
    assert section["verdicts"][0].startswith("At ratio 20:1")
    # The whole report, without its feature cache (so no UMAP is computed): the section renders in it.
    shutil.rmtree(cache_root(run_dir) / "features", ignore_errors=True)
    html = build_report(run_dir).read_text()
    assert html.count('class="imbalance-verdict"') == 1 and str(escape(section["verdicts"][0])) in html
    assert html.count("<tr data-mitigation=") == 4


def test_the_mitigation_tests_join_the_reports_one_holm_family(run_dir: Path) -> None:
    """Holm over the significance table's tests and the imbalance section's together, not per section."""
    from medpretrain.stats import holm

    run = Run(run_dir)
    pair_tests, mitigation_tests = run.family(), run.imbalance_tests()
    assert len(mitigation_tests) == 2 and run.n_tests == len(pair_tests) + 2
    everything = pair_tests + mitigation_tests
    expected = holm([e["test"].p for e in everything])
    assert [e["p_adj"] for e in everything] == pytest.approx(expected)
    # Adjusting the section alone would give smaller p-values whenever the report has other tests.
    alone = holm([e["test"].p for e in mitigation_tests])
    assert all(e["p_adj"] >= a - 1e-12 for e, a in zip(mitigation_tests, alone, strict=True))
