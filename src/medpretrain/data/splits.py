"""Seeded stratified splits for user data, persisted as JSON so a study can be reproduced exactly."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medpretrain.atomic import write_json
from medpretrain.errors import MedpretrainError

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_FORMAT = "medpretrain-split/1"


def stratified_split(labels: Sequence[int], fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split indices per class with the given fractions; the first split takes the rounding remainder.

    Every class keeps at least one item in the first split (train) so no class is unseen in training.
    Indices inside each split are sorted so the order does not depend on the shuffle.
    """
    names = list(fractions)
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        counts = {name: int(np.floor(fractions[name] * len(idx) + 0.5)) for name in names[1:]}
        while sum(counts.values()) > len(idx) - 1 and any(counts.values()):
            largest = max(counts, key=lambda k: counts[k])
            counts[largest] -= 1
        for name in names[1:]:
            parts[name].append(idx[start : start + counts[name]])
            start += counts[name]
        parts[names[0]].append(idx[start:])
    return {name: np.sort(np.concatenate(parts[name])).astype(np.int64) for name in names}


def split_file(split_dir: Path, name: str, items: Sequence[tuple[str, str]], seed: int) -> Path:
    """Where the split of this exact list of (relative path, label) items with this seed is stored."""
    h = hashlib.sha1()
    h.update(f"{SPLIT_FORMAT}|seed={seed}|{sorted(DEFAULT_FRACTIONS.items())}\n".encode())
    for rel, label in sorted(items):
        h.update(f"{rel}\t{label}\n".encode())
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "data"
    return split_dir / f"{safe}-{h.hexdigest()[:10]}.json"


def load_split(path: Path, rel_paths: Sequence[str]) -> dict[str, list[str]] | None:
    """Read a saved split; None when absent. It must cover exactly `rel_paths`, else it is stale."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        splits = {k: [str(p) for p in v] for k, v in data["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MedpretrainError(
            f"Split file {path} is unreadable ({exc})", "delete it and a new split will be written"
        ) from exc
    listed = [p for v in splits.values() for p in v]
    if sorted(listed) != sorted(rel_paths):
        raise MedpretrainError(
            f"Split file {path} does not list the same images as the data set",
            "delete it and a new split will be written",
        )
    return splits


def save_split(path: Path, splits: dict[str, list[str]], *, seed: int, source: str) -> None:
    """Write atomically so a concurrent reader never sees half a file."""
    payload = {
        "format": SPLIT_FORMAT,
        "source": source,
        "seed": seed,
        "fractions": DEFAULT_FRACTIONS,
        "splits": splits,
    }
    write_json(path, payload, indent=1)
