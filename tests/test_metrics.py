import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medpretrain.data.base import Task
from medpretrain.metrics import expected_calibration_error, probabilities, score
from medpretrain.stats import cell_intervals


def test_binary_metrics_against_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p1 = np.clip(0.3 * y + rng.random(400) * 0.7, 0, 1)
    proba = np.stack([1 - p1, p1], axis=1)
    m = score(y, proba, Task.BINARY) | cell_intervals(y, proba, Task.BINARY, n_boot=200)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["auc_ci_low"] < m["auc"] < m["auc_ci_high"]
    assert m["acc_ci_low"] < m["acc"] < m["acc_ci_high"]
    assert set(m) >= {"balanced_acc", "f1_macro", "kappa", "ece"}


def test_perfect_and_chance_predictions():
    y = np.repeat(np.arange(5), 40)
    perfect = np.eye(5)[y]
    m = score(y, perfect, Task.ORDINAL)
    assert m["auc"] == 1 and m["acc"] == 1 and m["kappa"] == 1 and m["ece"] == pytest.approx(0)
    uniform = np.full((200, 5), 0.2)
    assert score(y, uniform, Task.MULTICLASS)["auc"] == pytest.approx(0.5)


def test_kappa_is_quadratic_for_ordinal():
    y = np.array([0, 1, 2, 3, 4] * 20)
    off_by_one = np.eye(5)[np.clip(y + 1, 0, 4)]
    far_off = np.eye(5)[4 - y]
    assert score(y, off_by_one, Task.ORDINAL)["kappa"] > score(y, far_off, Task.ORDINAL)["kappa"]


def test_kappa_of_a_nominal_task_does_not_depend_on_the_class_order():
    """Quadratic weights mean nothing for nominal classes: relabelling them must not move kappa."""
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 400)
    pred = np.where(rng.random(400) < 0.5, y, rng.integers(0, 5, 400))
    relabel = np.array([3, 0, 4, 1, 2])
    kappa = score(y, np.eye(5)[pred], Task.MULTICLASS)["kappa"]
    assert kappa == pytest.approx(score(relabel[y], np.eye(5)[relabel[pred]], Task.MULTICLASS)["kappa"])
    assert kappa == pytest.approx(cohen_kappa_score(y, pred))  # Cohen's, unweighted
    ordinal = score(y, np.eye(5)[pred], Task.ORDINAL)["kappa"]
    assert ordinal == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))


def test_multilabel_ece_is_the_mean_of_per_label_ece():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (300, 3))
    proba = np.clip(y * 0.5 + rng.random((300, 3)) * np.array([0.5, 0.2, 0.9]), 0, 1)
    per_label = [
        expected_calibration_error(y[:, j], np.stack([1 - proba[:, j], proba[:, j]], 1), Task.BINARY) for j in range(3)
    ]
    assert expected_calibration_error(y, proba, Task.MULTILABEL) == pytest.approx(np.mean(per_label))


def test_multilabel():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (300, 4))
    proba = np.clip(y * 0.6 + rng.random((300, 4)) * 0.4, 0, 1)
    m = score(y, proba, Task.MULTILABEL)
    assert m["auc"] > 0.9 and 0 <= m["acc"] <= 1


def test_ece_of_overconfident_model():
    y = np.array([0, 1] * 50)
    proba = np.tile([[0.99, 0.01]], (100, 1))  # always says class 0 with 99% confidence, right half the time
    assert expected_calibration_error(y, proba, Task.BINARY) == pytest.approx(0.49)


def test_probabilities_by_task():
    logits = np.array([[2.0, -1.0, 0.5]])
    assert probabilities(logits, Task.MULTICLASS).sum() == pytest.approx(1)
    assert probabilities(logits, Task.MULTILABEL)[0, 1] == pytest.approx(1 / (1 + np.e))


@pytest.mark.parametrize("n_classes", [2, 3, 8])
def test_auc_matches_sklearn_with_ties(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 500)
    proba = np.round(rng.random((500, n_classes)), 1)  # many ties
    proba /= proba.sum(axis=1, keepdims=True) + 1e-9
    from medpretrain.metrics import auc

    expected = (
        roc_auc_score(y, proba[:, 1])
        if n_classes == 2
        else np.mean([roc_auc_score(y == c, proba[:, c]) for c in range(n_classes)])
    )
    assert auc(y, proba, Task.MULTICLASS) == pytest.approx(expected)


def test_cell_intervals_are_reproducible():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    proba = rng.dirichlet([1, 1, 1], 300)
    a = cell_intervals(y, proba, Task.MULTICLASS, n_boot=50, seed=7)
    assert a == cell_intervals(y, proba, Task.MULTICLASS, n_boot=50, seed=7)
    assert a["auc_ci_low"] < a["auc_ci_high"]
