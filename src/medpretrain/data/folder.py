"""A user's own labelled images: an image folder or a CSV manifest.

Layouts
- Image folder: ``<root>/<class>/**/<image>``, or with given splits
  ``<root>/{train,val,test}/<class>/**/<image>`` (``val/`` may be absent: then 1/8 of train, stratified,
  becomes validation).
- CSV manifest: header row ``path,label[,split]``; relative paths are relative to the CSV's folder.

Formats: PNG, JPEG, BMP, TIFF (tifffile for 16-bit / multi-page), DICOM (.dcm or suffix-less with the DICM
marker). Non-uint8 pixel data is min-max scaled to uint8 per image; DICOM gets its rescale slope/intercept and
its window (or VOI LUT) first, and MONOCHROME1 is inverted.

Size: every image is padded to a square (centred, black) and resized, antialiased, to ``image_size``. With
``image_size=None`` the size is the median longest side of the images, capped at ``MAX_AUTO_IMAGE_SIZE``
(224) so a folder of 2k X-rays does not silently need gigabytes. Channels: 1 if every image is grayscale,
otherwise 3 for all (gray images replicated).

Splits: given by the layout / split column, else stratified 70/10/20 with ``seed``; a generated split is saved
as JSON in ``split_dir`` (when given) and reused from there on later loads.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medpretrain.data.base import SPLITS, Dataset, Task
from medpretrain.data.images import is_image_file, pad_to_square, peek_size, read_image, resize_uint8, to_chw
from medpretrain.data.splits import DEFAULT_FRACTIONS, load_split, save_split, split_file, stratified_split
from medpretrain.errors import MedpretrainError

MAX_AUTO_IMAGE_SIZE = 224
VAL_FRACTION_OF_TRAIN = 0.125  # carve-out when only train/ and test/ are given: ≈10 % of a 80/20 split
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_LAYOUT_HINT = (
    "put images (PNG, JPEG, TIFF or DICOM) in one sub-folder per class, optionally under train/ val/ test/, "
    "or give a CSV manifest with columns path,label[,split]"
)


@dataclass(frozen=True)
class Item:
    """One labelled image: `rel` is its path relative to the manifest's base folder (posix)."""

    rel: str
    label: str
    split: str | None


@dataclass(frozen=True)
class Manifest:
    kind: str  # "folder" or "csv"
    source: Path  # the folder or the CSV file
    base: Path  # folder relative paths refer to
    name: str
    items: tuple[Item, ...]

    def file(self, item: Item) -> Path:
        return self.base / item.rel

    def fingerprint(self) -> str:
        """Content identity: paths, labels, given splits, and each file's size and mtime."""
        h = hashlib.sha1()
        for item in self.items:
            st = self.file(item).stat()
            h.update(f"{item.rel}\t{item.label}\t{item.split}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p) and not any(s.startswith(".") for s in p.parts))


def _scan_folder(root: Path) -> Manifest:
    subdirs = _visible_dirs(root)
    split_dirs = {_SPLIT_ALIASES[d.name.lower()]: d for d in subdirs if d.name.lower() in _SPLIT_ALIASES}
    items: list[Item] = []
    if split_dirs:
        if "train" not in split_dirs or "test" not in split_dirs:
            have = ", ".join(sorted(split_dirs))
            raise MedpretrainError(
                f"Image folder {root} has split sub-folders ({have}) but not both train/ and test/",
                "add the missing train/ or test/ folder (val/ is optional), or use one sub-folder per class "
                "without splits to get a stratified 70/10/20 split",
            )
        for split, split_root in split_dirs.items():
            for class_dir in _visible_dirs(split_root):
                for f in _images_under(class_dir):
                    items.append(Item(f.relative_to(root).as_posix(), class_dir.name, split))
    else:
        for class_dir in subdirs:
            for f in _images_under(class_dir):
                items.append(Item(f.relative_to(root).as_posix(), class_dir.name, None))
    if not items:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        detail = f" ({len(loose)} images lie directly in it, not in class sub-folders)" if loose else ""
        raise MedpretrainError(f"No readable images found in class sub-folders of {root}{detail}", _LAYOUT_HINT)
    return Manifest("folder", root, root, root.name, tuple(items))


def _scan_csv(path: Path) -> Manifest:
    fix = "the first row must be a header with columns path,label[,split] (split: train, val or test)"
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in fields]
            if missing:
                found = ", ".join(fields) if fields else "none"
                raise MedpretrainError(
                    f"CSV manifest {path} lacks column(s) {', '.join(missing)} (found: {found})", fix
                )
            reader.fieldnames = fields
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedpretrainError(f"Cannot read CSV manifest {path} ({exc})", fix) from exc

    base = path.parent
    items: list[Item] = []
    for line, row in rows:
        rel = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not rel and not label and not (row.get("split") or "").strip():
            continue  # blank line
        if not rel or not label:
            raise MedpretrainError(f"CSV manifest {path}, line {line}: empty path or label", fix)
        split_text = (row.get("split") or "").strip().lower()
        split = _SPLIT_ALIASES.get(split_text) if split_text else None
        if split_text and split is None:
            raise MedpretrainError(
                f"CSV manifest {path}, line {line}: unknown split '{split_text}'", "use train, val or test"
            )
        items.append(Item(Path(rel).as_posix(), label, split))
    if not items:
        raise MedpretrainError(f"CSV manifest {path} lists no images", fix)
    with_split = sum(item.split is not None for item in items)
    if 0 < with_split < len(items):
        raise MedpretrainError(
            f"CSV manifest {path}: {len(items) - with_split} rows have no split while others have one",
            "give a split for every row, or leave the column empty everywhere for a 70/10/20 split",
        )
    absent = [item.rel for item in items if not (base / item.rel).is_file()]
    if absent:
        shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        raise MedpretrainError(
            f"CSV manifest {path} lists {len(absent)} file(s) that do not exist: {shown}",
            f"fix the paths (relative paths are relative to {base})",
        )
    if with_split and not {"train", "test"} <= {item.split for item in items}:
        raise MedpretrainError(
            f"CSV manifest {path} gives splits but not both train and test rows",
            "add train and test rows (val is optional), or leave the split column empty",
        )
    return Manifest("csv", path, base, path.stem, tuple(items))


def scan(path: Path) -> Manifest:
    """List the labelled images of a folder or CSV manifest without decoding them."""
    if path.is_dir():
        return _scan_folder(path)
    if path.is_file() and path.suffix.lower() in {".csv", ".tsv", ".txt"}:
        return _scan_csv(path)
    if path.is_file():
        raise MedpretrainError(f"{path} is neither an image folder nor a CSV manifest", _LAYOUT_HINT)
    raise MedpretrainError(f"{path} does not exist", "give an existing image folder or CSV manifest")


def _sort_classes(names: set[str]) -> list[str]:
    """Numeric names in numeric order ("2" before "10"), otherwise alphabetical."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _assign_splits(
    manifest: Manifest, y: np.ndarray, split_dir: Path | None, seed: int
) -> tuple[dict[str, np.ndarray], Path | None]:
    """Indices into manifest.items per split: given, partly given (no val), or generated and saved."""
    items = manifest.items
    given = items[0].split is not None
    if given and any(item.split == "val" for item in items):
        return {s: np.array([i for i, it in enumerate(items) if it.split == s], dtype=np.int64) for s in SPLITS}, None

    rels = [item.rel for item in items]
    keyed = [(item.rel, f"{item.label}|{item.split or ''}") for item in items]
    path = split_file(split_dir, manifest.name, keyed, seed) if split_dir is not None else None
    saved = load_split(path, rels) if path is not None else None
    if saved is not None:
        where = {rel: split for split, members in saved.items() for rel in members}
        return {s: np.array([i for i, r in enumerate(rels) if where[r] == s], dtype=np.int64) for s in SPLITS}, path

    if given:  # train/ and test/ given: carve validation out of train, stratified
        train_idx = np.array([i for i, it in enumerate(items) if it.split == "train"], dtype=np.int64)
        parts = stratified_split(y[train_idx], {"train": 1 - VAL_FRACTION_OF_TRAIN, "val": VAL_FRACTION_OF_TRAIN}, seed)
        test_idx = np.array([i for i, it in enumerate(items) if it.split == "test"], dtype=np.int64)
        splits = {"train": train_idx[parts["train"]], "val": train_idx[parts["val"]], "test": test_idx}
    else:
        splits = stratified_split(y, DEFAULT_FRACTIONS, seed)
    if path is not None:
        save_split(path, {s: [rels[i] for i in splits[s]] for s in SPLITS}, seed=seed, source=str(manifest.source))
    return splits, path


def _check_splits(manifest: Manifest, classes: list[str], y: np.ndarray, splits: dict[str, np.ndarray]) -> None:
    where = manifest.source
    train_counts = np.bincount(y[splits["train"]], minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(train_counts == 0)]
    if empty:
        raise MedpretrainError(
            f"Class(es) {', '.join(empty)} in {where} have no training images",
            "add training images for them or remove those classes",
        )
    for split in SPLITS:
        if len(splits[split]) == 0:
            raise MedpretrainError(
                f"Split '{split}' of {where} is empty ({len(y)} images in all)",
                "add images (a 70/10/20 split needs at least a few per class) or give the split explicitly",
            )


def _decode_resized(path: Path, target: int) -> torch.Tensor:
    """Decode and resize at once, so full-resolution pixels never pile up in memory."""
    arr = read_image(path)
    img = pad_to_square(to_chw(arr, 1 if arr.ndim == 2 else 3))
    return resize_uint8(img.unsqueeze(0), target)[0]


def load_folder(path: Path, *, image_size: int | None = None, split_dir: Path | None = None, seed: int = 0) -> Dataset:
    """Load an image folder or CSV manifest (see the module doc for layouts, sizes and splits)."""
    manifest = scan(path)
    items = manifest.items
    classes = _sort_classes({item.label for item in items})
    if len(classes) < 2:
        raise MedpretrainError(
            f"{manifest.source} has a single class ('{classes[0]}')",
            "classification needs at least two classes: add a sub-folder (or label) per class",
        )
    index = {name: i for i, name in enumerate(classes)}
    y = np.array([index[item.label] for item in items], dtype=np.int64)
    splits, saved_at = _assign_splits(manifest, y, split_dir, seed)
    _check_splits(manifest, classes, y, splits)

    files = [manifest.file(item) for item in items]
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        shapes = list(pool.map(peek_size, files))
        native = int(np.median([max(h, w) for h, w in shapes]))
        target = image_size if image_size is not None else min(native, MAX_AUTO_IMAGE_SIZE)
        decoded = list(pool.map(lambda f: _decode_resized(f, target), files))
    channels = 3 if any(t.shape[0] == 3 for t in decoded) else 1
    if channels == 3:
        decoded = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in decoded]

    images = {s: torch.stack([decoded[i] for i in splits[s]]).contiguous() for s in SPLITS}
    labels = {s: y[splits[s]].copy() for s in SPLITS}
    split_of = {int(i): s for s in SPLITS for i in splits[s]}
    h = hashlib.sha1(manifest.fingerprint().encode())
    for i, item in enumerate(items):
        h.update(f"{item.rel}\t{split_of[i]}\n".encode())
    return Dataset(
        name=manifest.name,
        task=Task.BINARY if len(classes) == 2 else Task.MULTICLASS,
        classes=classes,
        images=images,
        labels=labels,
        key=f"{manifest.name}-{h.hexdigest()[:10]}-px{target}",
        source=str(manifest.source),
        size=native,
        image_size=target,
        meta={
            "kind": manifest.kind,
            "base": str(manifest.base),
            "files": {s: [items[i].rel for i in splits[s]] for s in SPLITS},
            "splits_given": items[0].split is not None,
            "split_file": str(saved_at) if saved_at is not None else None,
            "seed": seed,
            "native_size": native,
            "class_counts": dict(Counter(item.label for item in items)),
        },
    )


def load_unlabeled_folder(path: Path, *, image_size: int | None = None) -> tuple[str, str, torch.Tensor]:
    """Every image under `path`, any layout, no labels needed (self-supervised pre-training).

    Images under `val/` or `test/` sub-folders are left out, so pre-training on a labeled folder never
    sees the images it will be evaluated on. Returns (name, content key, uint8 N×C×H×W).
    """
    files = [
        f
        for f in _images_under(path)
        if not any(part.lower() in ("val", "valid", "validation", "test") for part in f.relative_to(path).parts[:-1])
    ]
    if not files:
        raise MedpretrainError(f"No readable images found under {path}", "put PNG, JPEG, TIFF or DICOM files in it")
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        native = int(np.median([max(h, w) for h, w in pool.map(peek_size, files)]))
        target = image_size if image_size is not None else min(native, MAX_AUTO_IMAGE_SIZE)
        decoded = list(pool.map(lambda f: _decode_resized(f, target), files))
    if any(t.shape[0] == 3 for t in decoded):
        decoded = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in decoded]
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return path.name, f"{path.name}-unlabeled-{h.hexdigest()[:10]}-px{target}", torch.stack(decoded).contiguous()
