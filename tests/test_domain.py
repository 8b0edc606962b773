"""Domain gap: Fréchet distance and RBF-MMD through a fixed ImageNet backbone, and the domain study artefact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medpretrain.data import load_dataset
from medpretrain.domain import frechet_distance, gap_pairs, mmd_rbf, write_domain_gaps
from medpretrain.features import extract
from medpretrain.inits import build_model
from medpretrain.runtime import torch_threads
from medpretrain.study import validate_study

N = 600  # images per data set: two disjoint halves of 300 for the within-data-set distance


@pytest.fixture(scope="module")
def imagenet_features() -> dict[str, np.ndarray]:
    """EfficientNet-Lite0 ImageNet features at 112 px of N training images of three shared data sets."""
    model, _ = build_model("efficientnet_lite0", "imagenet", img_size=112)
    out = {}
    with torch_threads(1):
        for flag in ("pneumoniamnist", "bloodmnist", "retinamnist"):
            dataset = load_dataset(f"{flag}[train={N},val=10,test=10]", image_size=112)
            out[flag] = extract(model, dataset.images["train"], progress=False)
    return out


def test_a_data_set_is_far_closer_to_itself_than_to_any_other(imagenet_features: dict[str, np.ndarray]) -> None:
    """Fréchet distance and MMD² of two disjoint halves of one data set lie far below every cross pair."""
    half = N // 2
    flags = list(imagenet_features)
    within = {
        f: (frechet_distance(x[:half], x[half:]), mmd_rbf(x[:half], x[half:])) for f, x in imagenet_features.items()
    }
    cross = {
        (a, b): (frechet_distance(imagenet_features[a][:half], imagenet_features[b][:half]),
                 mmd_rbf(imagenet_features[a][:half], imagenet_features[b][:half]))
        for i, a in enumerate(flags) for b in flags[i + 1 :]
    }  # fmt: skip
    worst_within = max(v[0] for v in within.values())
    closest_cross = min(v[0] for v in cross.values())
    assert closest_cross > 3 * worst_within, (within, cross)
    assert min(v[1] for v in cross.values()) > 5 * max(abs(v[1]) for v in within.values()), (within, cross)


def test_distances_are_symmetric_and_zero_on_the_same_sample() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(loc=1.0, size=(150, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    # Means 1 apart in each of 8 dimensions: the Fréchet distance is about ‖Δμ‖² = 8.
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.25)
    assert mmd_rbf(a, b) > 0.1 and abs(mmd_rbf(a[:100], a[100:])) < 0.02
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(a[:1], b)


def test_a_domain_study_writes_every_source_target_pair(tmp_path: Path) -> None:
    study = validate_study(
        {
            "datasets": ["pneumoniamnist[train=40,val=10,test=10]", "bloodmnist[train=40,val=10,test=10]"],
            "inits": [
                "scratch",
                {"method": "simclr", "epochs": 1, "unlabeled_from": "bloodmnist[train=40,val=10,test=10]"},
            ],
            "budgets": {"fractions": [1.0]},
        },
        "domain test",
    )
    pairs, sources = gap_pairs(study)
    assert ("bloodmnist[train=40,val=10,test=10]", "pneumoniamnist[train=40,val=10,test=10]") in pairs
    assert len(pairs) == 3 and list(sources.values()) == ["bloodmnist[train=40,val=10,test=10]"]
    with torch_threads(1):
        path = write_domain_gaps(study, tmp_path, progress=False)
    assert path is not None
    gaps = json.loads(path.read_text())
    by_pair = {(g["source"], g["target"]): g for g in gaps["pairs"]}
    self_gap = by_pair["pneumoniamnist[train=40,val=10,test=10]", "pneumoniamnist[train=40,val=10,test=10]"]
    assert self_gap["frechet"] == pytest.approx(0.0, abs=1e-3)
    assert min(g["frechet"] for (s, t), g in by_pair.items() if s != t) > 1.0
    assert gaps["backbone"] == "efficientnet_lite0" and gaps["image_size"] == 112
    # No pre-training on another data set: nothing to measure, nothing written.
    plain = validate_study({"datasets": ["pneumoniamnist"], "inits": ["scratch"], "budgets": {"fractions": [1.0]}}, "x")
    assert write_domain_gaps(plain, tmp_path / "plain") is None
