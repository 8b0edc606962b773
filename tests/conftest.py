"""Shared test set-up: real MedMNIST data from ../shared, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data" / "medmnist").resolve()

# The tests use the real shared files; CI sets this too, this default is for a developer's plain `pytest`.
os.environ.setdefault("MEDPRETRAIN_DATA", str(SHARED_DATA))
os.environ.setdefault("MEDPRETRAIN_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(os.environ["MEDPRETRAIN_DATA"])
