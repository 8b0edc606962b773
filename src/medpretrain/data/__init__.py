"""Data sets as in-memory uint8 tensors: MedMNIST v2 (2D) by flag, or a user's image folder / CSV manifest."""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path

import torch

from medpretrain.data.base import SPLITS, Dataset, Task
from medpretrain.data.folder import MAX_AUTO_IMAGE_SIZE, load_unlabeled_folder
from medpretrain.data.images import RESIZE_MODES, resize_images
from medpretrain.data.medmnist import (
    MEDMNIST_FLAGS,
    DatasetInfo,
    available_sizes,
    data_dir,
    list_datasets,
    split_sizes,
)
from medpretrain.data.sources import SOURCES, MedMNISTSource, source_of
from medpretrain.data.subset import check_limits, parse_subset, subset_spec, take_subset
from medpretrain.errors import MedpretrainError

__all__ = [
    "MAX_AUTO_IMAGE_SIZE",
    "MEDMNIST_FLAGS",
    "SOURCES",
    "SPLITS",
    "Dataset",
    "DatasetInfo",
    "Task",
    "available_sizes",
    "check_spec",
    "clear_cache",
    "data_dir",
    "list_datasets",
    "load_dataset",
    "load_unlabeled",
    "parse_subset",
    "source_of",
    "subset_spec",
]

_MEMO_SIZE = 8  # datasets at 224 px are large; keep a handful, a miss only costs a reload


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _subset_memo(
    base: str, limits: tuple[tuple[str, int], ...], size: int, image_size: int | None, split_dir: Path | None, seed: int
) -> Dataset:
    full = load_dataset(base, size=size, image_size=image_size, split_dir=split_dir, seed=seed)
    return take_subset(full, dict(limits))


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _resized_memo(spec: str, size: int, split_dir: Path | None, seed: int, image_size: int, mode: str) -> Dataset:
    """The natively loaded `spec` brought to `image_size` by `mode`; its key says how, so caches never mix
    resize policies."""
    native = load_dataset(spec, size=size, split_dir=split_dir, seed=seed)
    try:
        images = {split: resize_images(x, image_size, mode) for split, x in native.images.items()}
    except ValueError as err:
        raise MedpretrainError(str(err), "use resize: bilinear, or an image size at least the native one") from None
    return replace(native, images=images, image_size=image_size, key=f"{native.key}-{mode}{image_size}")


def clear_cache() -> None:
    """Forget memoised data sets (tests, or after files changed in ways size/mtime do not show)."""
    _resized_memo.cache_clear()
    for source in SOURCES.values():
        source.clear_cache()
    _subset_memo.cache_clear()


def _looks_like_path(spec: str) -> bool:
    return any(sep in spec for sep in ("/", "\\")) or spec.startswith((".", "~")) or Path(spec).suffix != ""


def _unknown(text: str, whole: str) -> MedpretrainError:
    # Inside a subset spec the whole spec is named too: the user typed that, not the bare base.
    where = f" in '{whole}'" if whole != text else ""
    if _looks_like_path(text):
        return MedpretrainError(
            f"{Path(text).expanduser()}{where} does not exist",
            "give an existing image folder or CSV manifest, or a MedMNIST flag",
        )
    return MedpretrainError(
        f"Unknown data set '{text}'{where}",
        f"use one of the MedMNIST flags {', '.join(MEDMNIST_FLAGS)}, "
        "or give a path to an image folder or a CSV manifest",
    )


def check_spec(spec: str | os.PathLike[str], *, size: int = 28) -> None:
    """Everything about a dataset spec that can be checked without reading images, so commands fail before
    any progress bar or work: the subset syntax, that the base is a MedMNIST flag (with a file at `size`) or
    an existing path, and, for MedMNIST, that no subset count exceeds its split (the sizes are metadata).
    """
    text = os.fspath(spec)
    base, limits = parse_subset(text)
    source = source_of(base)
    if source is None:
        raise _unknown(base, text)
    source.check(base, size)
    if limits and isinstance(source, MedMNISTSource):  # split sizes are metadata: checked before any loading
        check_limits(text.strip(), limits, split_sizes(base.strip().lower()))


def load_dataset(
    spec: str | os.PathLike[str],
    *,
    size: int = 28,
    image_size: int | None = None,
    split_dir: Path | None = None,
    seed: int = 0,
    resize: str = "bilinear",
) -> Dataset:
    """Load a MedMNIST flag (at native `size`) or a path (image folder or CSV manifest).

    Images are resized once, antialiased, to `image_size` (None: the native size — for MedMNIST `size`; for
    user data the median longest side capped at 224). `size` applies to MedMNIST only; `split_dir` and `seed`
    to user data without given splits. Memoised in-process: the same arguments (and unchanged files) return
    the same object, so callers must not modify it.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise MedpretrainError(f"Invalid image size {image_size!r}", "use a positive number of pixels, e.g. 224")
    if resize not in RESIZE_MODES:
        raise MedpretrainError(f"unknown resize mode '{resize}'", f"choose one of: {', '.join(RESIZE_MODES)}")
    if resize != "bilinear" and image_size is not None:
        # Loaded natively, then brought to size by the chosen policy (memoised, like every load).
        return _resized_memo(os.fspath(spec), size, split_dir, seed, image_size, resize)
    text = os.fspath(spec)
    base, limits = parse_subset(text)
    if limits:
        check_spec(text, size=size)  # a bad base or count is named with the whole spec, before any loading
        return _subset_memo(base, tuple(limits.items()), size, image_size, split_dir, seed)
    source = source_of(text)
    if source is None:
        raise _unknown(text, text)
    return source.load(text, size=size, image_size=image_size, split_dir=split_dir, seed=seed)


def load_unlabeled(
    spec: str | os.PathLike[str], *, size: int = 28, image_size: int | None = None, split_dir: Path | None = None
) -> tuple[str, str, torch.Tensor]:
    """Training images without labels, for self-supervised pre-training: (name, content key, uint8 N×C×H×W).

    A MedMNIST flag or a labeled folder/CSV gives its training split only (validation and test images are
    never pre-trained on); a folder that is not a labeled dataset gives every image under it.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if parse_subset(text)[1] or isinstance(source_of(text), MedMNISTSource) or not path.is_dir():
        dataset = load_dataset(spec, size=size, image_size=image_size, split_dir=split_dir)
        return dataset.name, dataset.key, dataset.images["train"]
    try:
        dataset = load_dataset(path, image_size=image_size, split_dir=split_dir)
    except MedpretrainError:
        return load_unlabeled_folder(path.resolve(), image_size=image_size)
    return dataset.name, dataset.key, dataset.images["train"]
