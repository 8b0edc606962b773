"""Where a dataset spec's images come from: one registry of data sources, asked in order.

A spec's base (before any `[train=N,…]` subset) is a MedMNIST flag or a path to an image folder / CSV manifest.
Each source says whether a base is its own, checks what can be checked without reading images, and loads it;
`check_spec`, `load_dataset` and the study validator all dispatch here instead of testing string shapes.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from pathlib import Path

from medpretrain.data.base import Dataset
from medpretrain.data.folder import load_folder, scan
from medpretrain.data.medmnist import MEDMNIST_FLAGS, file_path, is_offline, load_medmnist
from medpretrain.registry import Registry

_MEMO_SIZE = 8  # datasets at 224 px are large; keep a handful, a miss only costs a reload


class DataSource(ABC):
    """One kind of dataset spec. `native_size` is None when only loading tells it (a folder's images)."""

    name: str

    @abstractmethod
    def owns(self, base: str) -> bool: ...

    @abstractmethod
    def check(self, base: str, size: int) -> None:
        """Raise MedpretrainError for what is wrong without reading any image."""

    def native_size(self, base: str, size: int) -> int | None:
        return None

    @abstractmethod
    def load(self, base: str, *, size: int, image_size: int | None, split_dir: Path | None, seed: int) -> Dataset:
        """The whole dataset (memoised: the same arguments and unchanged files give the same object)."""

    @abstractmethod
    def clear_cache(self) -> None:
        """Forget memoised loads."""


class MedMNISTSource(DataSource):
    name = "medmnist"

    def owns(self, base: str) -> bool:
        return base.strip().lower() in MEDMNIST_FLAGS

    def check(self, base: str, size: int) -> None:
        file_path(base.strip().lower(), size)  # validates the size; the file itself may still be downloaded

    def native_size(self, base: str, size: int) -> int | None:
        return size

    def load(self, base: str, *, size: int, image_size: int | None, split_dir: Path | None, seed: int) -> Dataset:
        flag = base.strip().lower()
        path = file_path(flag, size)  # validates size
        try:
            st = path.stat()
            stamp: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        return _load_medmnist_memo(flag, size, image_size, str(path), stamp, is_offline())

    def clear_cache(self) -> None:
        _load_medmnist_memo.cache_clear()


class FileSource(DataSource):
    """An image folder (one sub-folder per class, optionally under train/val/test) or a CSV manifest."""

    name = "files"

    def owns(self, base: str) -> bool:
        return Path(base).expanduser().exists()

    def check(self, base: str, size: int) -> None:
        return None  # its images are read (and checked) when it is loaded

    def load(self, base: str, *, size: int, image_size: int | None, split_dir: Path | None, seed: int) -> Dataset:
        resolved = Path(base).expanduser().resolve()
        fingerprint = scan(resolved).fingerprint()
        sd = Path(split_dir).expanduser().resolve() if split_dir is not None else None
        return _load_folder_memo(resolved, image_size, sd, seed, fingerprint)

    def clear_cache(self) -> None:
        _load_folder_memo.cache_clear()


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _load_medmnist_memo(
    flag: str, size: int, image_size: int | None, path: str, stamp: tuple[int, int] | None, offline: bool
) -> Dataset:
    # path/stamp/offline are part of the key only: a changed MEDPRETRAIN_DATA or a replaced file reloads.
    return load_medmnist(flag, size, image_size)


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _load_folder_memo(
    path: Path, image_size: int | None, split_dir: Path | None, seed: int, fingerprint: str
) -> Dataset:
    return load_folder(path, image_size=image_size, split_dir=split_dir, seed=seed)


SOURCES: Registry[DataSource] = Registry("data source")
for _source in (MedMNISTSource(), FileSource()):
    SOURCES.add(_source.name, _source)


def source_of(base: str | os.PathLike[str]) -> DataSource | None:
    """The data source that owns a spec's base, or None (the caller names the problem with the whole spec)."""
    text = os.fspath(base)
    return next((s for s in SOURCES.values() if s.owns(text)), None)


__all__ = ["SOURCES", "DataSource", "FileSource", "MedMNISTSource", "source_of"]
