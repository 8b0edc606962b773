import numpy as np
import pytest

from medpretrain.budgets import Budget, select
from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.choice(4, size=2000, p=[0.55, 0.25, 0.15, 0.05])


def test_fraction_is_stratified(labels):
    idx = select(labels, Task.MULTICLASS, Budget(fraction=0.1), seed=0)
    full = np.bincount(labels, minlength=4)
    sub = np.bincount(labels[idx], minlength=4)
    assert np.all(np.abs(sub - 0.1 * full) <= 1)
    assert len(np.unique(idx)) == len(idx)


def test_subsets_are_nested_for_a_seed(labels):
    small = select(labels, Task.MULTICLASS, Budget(fraction=0.01), seed=3)
    medium = select(labels, Task.MULTICLASS, Budget(fraction=0.1), seed=3)
    full = select(labels, Task.MULTICLASS, Budget(fraction=1.0), seed=3)
    assert set(small) <= set(medium) <= set(full)
    assert len(full) == len(labels)
    assert set(select(labels, Task.MULTICLASS, Budget(shots=5), seed=3)) <= set(
        select(labels, Task.MULTICLASS, Budget(shots=20), seed=3)
    )


def test_seeds_draw_different_subsets(labels):
    a = select(labels, Task.MULTICLASS, Budget(fraction=0.05), seed=0)
    b = select(labels, Task.MULTICLASS, Budget(fraction=0.05), seed=1)
    assert len(a) == len(b) and not np.array_equal(a, b)


def test_shots_per_class(labels):
    idx = select(labels, Task.MULTICLASS, Budget(shots=10), seed=0)
    assert np.bincount(labels[idx], minlength=4).tolist() == [10, 10, 10, 10]


def test_imbalance_ratio(labels):
    idx = select(labels, Task.MULTICLASS, Budget(shots=50, imbalance=10), seed=0)
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.max() / counts.min() == pytest.approx(10, rel=0.1)


def test_too_small_fraction_names_smallest_valid_budget(labels):
    rare = int(np.bincount(labels)[3])
    with pytest.raises(MedpretrainError, match="smallest valid fraction is") as err:
        select(labels, Task.MULTICLASS, Budget(fraction=0.1 / rare), seed=0, classes=["a", "b", "c", "d"])
    assert "'d'" in str(err.value)
    suggested = float(str(err.value).split("smallest valid fraction is ")[1].split(",")[0])
    assert len(select(labels, Task.MULTICLASS, Budget(fraction=suggested), seed=0)) >= 4


@pytest.mark.parametrize(
    "kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"shots": 0}, {}, {"fraction": 0.1, "shots": 3}]
)
def test_invalid_budgets(kwargs):
    with pytest.raises(MedpretrainError):
        Budget(**kwargs)


def test_multilabel_keeps_a_positive_per_label():
    rng = np.random.default_rng(0)
    y = (rng.random((500, 5)) < [0.5, 0.3, 0.2, 0.1, 0.05]).astype(int)
    idx = select(y, Task.MULTILABEL, Budget(fraction=0.2), seed=0)
    assert (y[idx].sum(axis=0) >= 1).all()
    with pytest.raises(MedpretrainError, match="smallest valid fraction"):
        select(y, Task.MULTILABEL, Budget(fraction=0.001), seed=0)
