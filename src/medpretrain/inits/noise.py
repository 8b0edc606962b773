"""The negative-control init ``noise``: frozen "features" that do not depend on the image at all.

Each image gets a vector of standard Gaussian noise of the backbone's feature width, drawn from a generator
seeded by (seed, split, block of image indices) — so the vector of image i of a split is a function of those
three numbers only, never of any pixel, of the data set, or of how many images the split has. A probe on it
scores chance; a fusion of several sources (DVME: attention over embedding sources, after the dynamic
meta-embeddings of Kiela et al., EMNLP 2018) must learn to give it no weight, which is what the fusion sanity
test checks.

It has no network: nothing to fine-tune, nothing to start a pre-training from (`InitKind.features` replaces
the network for the frozen-feature protocols; `check_trainable` refuses the others).
"""

from __future__ import annotations

import zlib

import numpy as np

# One fixed seed, like scratch's feature network (features.SCRATCH_FEATURE_SEED): every cell on "noise" probes the
# same arrays, and the label budget's seed varies what is fitted on them.
NOISE_SEED = 0
# Rows are drawn in blocks with a generator of their own, so a row depends on its index and never on the split's
# length (a generator's stream is only reproducible from its start). 256 rows keep the per-block cost negligible.
BLOCK_ROWS = 256


def noise_features(width: int, split: str, n: int, *, seed: int = NOISE_SEED) -> np.ndarray:
    """(n, width) float32 standard-normal rows; row i depends on (seed, split, i, width) only."""
    if width < 1 or n < 0:
        raise ValueError(f"noise_features needs width >= 1 and n >= 0, got width={width}, n={n}")
    # crc32, not hash(): Python salts str hashes per process, and the cache must be stable across processes.
    split_code = zlib.crc32(split.encode())
    n_blocks = -(-n // BLOCK_ROWS)
    blocks = [
        np.random.default_rng([seed, split_code, block]).standard_normal((BLOCK_ROWS, width), dtype=np.float32)
        for block in range(n_blocks)
    ]
    return np.concatenate(blocks)[:n] if blocks else np.zeros((0, width), dtype=np.float32)
