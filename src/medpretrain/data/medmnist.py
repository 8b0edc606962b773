"""MedMNIST v2 (2D) release files: location, download, md5 verification and loading.

All facts about the data sets (URLs, md5 sums, tasks, label names, split sizes) come from the `medmnist`
package's `INFO`, so a new release of that package is picked up without edits here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from medmnist.info import INFO

from medpretrain.atomic import atomic_path, write_json
from medpretrain.data.base import SPLITS, Dataset, Task
from medpretrain.data.images import resize_uint8
from medpretrain.errors import MedpretrainError

MEDMNIST_FLAGS: tuple[str, ...] = tuple(flag for flag in INFO if not flag.endswith("3d"))
NATIVE_SIZE = 28  # the size whose file carries no "_<size>" suffix

_ENV_DATA = "MEDPRETRAIN_DATA"
_ENV_OFFLINE = "MEDPRETRAIN_OFFLINE"
_VERIFIED: dict[tuple[str, int, int], str] = {}  # in-process memo: (path, bytes, mtime_ns) -> md5


def data_dir() -> Path:
    """$MEDPRETRAIN_DATA, else the per-user cache folder .../medpretrain/medmnist."""
    env = os.environ.get(_ENV_DATA, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("medpretrain")) / "medmnist"


def is_offline() -> bool:
    return os.environ.get(_ENV_OFFLINE, "").strip().lower() in {"1", "true", "yes", "on"}


def available_sizes(flag: str) -> tuple[int, ...]:
    info = INFO[check_flag(flag)]
    extra = sorted(int(key[4:]) for key in info if key.startswith("url_") and key[4:].isdigit())
    return (NATIVE_SIZE, *extra)


def check_flag(flag: str) -> str:
    if flag not in MEDMNIST_FLAGS:
        raise MedpretrainError(
            f"Unknown data set '{flag}'",
            f"use one of the MedMNIST flags {', '.join(MEDMNIST_FLAGS)}, "
            "or give a path to an image folder or a CSV manifest",
        )
    return flag


def check_size(flag: str, size: int) -> int:
    sizes = available_sizes(flag)
    if size not in sizes:
        raise MedpretrainError(f"MedMNIST has no size {size} for '{flag}'", f"use one of {', '.join(map(str, sizes))}")
    return size


def _suffix(size: int) -> str:
    return "" if size == NATIVE_SIZE else f"_{size}"


def file_name(flag: str, size: int = NATIVE_SIZE) -> str:
    """`<flag>.npz` for 28 px, `<flag>_<size>.npz` otherwise (the names medmnist itself uses)."""
    return f"{flag}{_suffix(size)}.npz"


def file_url(flag: str, size: int = NATIVE_SIZE) -> str:
    return str(INFO[flag][f"url{_suffix(size)}"])


def file_md5(flag: str, size: int = NATIVE_SIZE) -> str:
    return str(INFO[flag][f"MD5{_suffix(size)}"])


def file_path(flag: str, size: int = NATIVE_SIZE) -> Path:
    return data_dir() / file_name(check_flag(flag), check_size(flag, size))


def split_sizes(flag: str) -> dict[str, int]:
    """Images per split from the release metadata (the loader verifies the file against these counts)."""
    n = INFO[check_flag(flag)]["n_samples"]
    return {split: int(n[split]) for split in SPLITS}


@dataclass(frozen=True)
class DatasetInfo:
    """One row of `medpretrain datasets`: what a MedMNIST flag is and whether its file is here."""

    flag: str
    size: int
    available: bool
    path: Path
    n_train: int
    n_val: int
    n_test: int
    n_classes: int
    task: Task
    channels: int
    url: str

    @property
    def n_total(self) -> int:
        return self.n_train + self.n_val + self.n_test


def list_datasets(size: int = NATIVE_SIZE) -> list[DatasetInfo]:
    """Every 2D MedMNIST flag at `size`; counts come from the metadata, availability from the disk."""
    rows = []
    for flag in MEDMNIST_FLAGS:
        info = INFO[flag]
        path = file_path(flag, size)
        n = info["n_samples"]
        rows.append(
            DatasetInfo(
                flag=flag,
                size=size,
                available=path.is_file(),
                path=path,
                n_train=int(n["train"]),
                n_val=int(n["val"]),
                n_test=int(n["test"]),
                n_classes=len(info["label"]),
                task=Task.from_medmnist(info["task"]),
                channels=int(info["n_channels"]),
                url=file_url(flag, size),
            )
        )
    return rows


# --- md5 verification, remembered per (path, size, mtime) so a 35 MB file is hashed once -----------------


def _md5_of(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_path(path: Path) -> Path:
    """Records live in the per-user cache, never beside the data: data folders may be shared or read-only."""
    import platformdirs

    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(platformdirs.user_cache_dir("medpretrain")) / "verified" / f"{digest}.json"


def _read_record(path: Path, stat: os.stat_result) -> str | None:
    try:
        data = json.loads(_record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        isinstance(data, dict)
        and data.get("bytes") == stat.st_size
        and data.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(data.get("md5"), str)
    ):
        return str(data["md5"])
    return None


def _write_record(path: Path, stat: os.stat_result, md5: str) -> None:
    record = _record_path(path)
    payload = {"file": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": md5}
    # An unwritable cache only costs a re-hash next time. Atomic: a concurrent reader sees the old record or the new.
    with contextlib.suppress(OSError):
        write_json(record, payload, indent=None)


def verify_file(path: Path, expected_md5: str) -> None:
    """Raise if the file's md5 differs from the release's; hash only when size or mtime changed."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    md5 = _VERIFIED.get(memo_key) or _read_record(path, stat)
    if md5 is None:
        try:
            md5 = _md5_of(path)
        except OSError as exc:
            raise MedpretrainError(
                f"Cannot read MedMNIST file {path} ({exc})",
                "check its permissions, or delete it and re-download",
            ) from exc
        _write_record(path, stat, md5)
    _VERIFIED[memo_key] = md5
    if md5 != expected_md5:
        raise MedpretrainError(
            f"MedMNIST file {path} is corrupt or not the official release (md5 {md5}, expected {expected_md5})",
            "delete it and run again to re-download it (or download it again by hand)",
        )


# --- download ------------------------------------------------------------------------------------------


def _download(url: str, dest: Path, expected_md5: str) -> None:
    """Stream to a temporary file in the same folder, check md5, then rename atomically into place."""
    from tqdm.auto import tqdm

    h = hashlib.md5(usedforsecurity=False)
    # A failed or corrupt download raises inside the block: the partial file is removed, `dest` never appears.
    with atomic_path(dest, suffix=".part") as tmp:
        request = urllib.request.Request(url, headers={"User-Agent": "medpretrain"})
        with urllib.request.urlopen(request, timeout=60) as response, tmp.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if h.hexdigest() != expected_md5:
            raise MedpretrainError(
                f"Downloaded {url} has md5 {h.hexdigest()}, expected {expected_md5}",
                f"try again later, or download it by hand into {dest}",
            )
    stat = dest.stat()
    _write_record(dest, stat, expected_md5)
    _VERIFIED[(str(dest.resolve()), stat.st_size, stat.st_mtime_ns)] = expected_md5


def ensure_file(flag: str, size: int = NATIVE_SIZE) -> Path:
    """Path of a verified release file, downloading it first when missing and allowed."""
    path = file_path(flag, size)
    url, md5 = file_url(flag, size), file_md5(flag, size)
    if not path.is_file():
        how = f"download {url} into {path.parent} or set MEDPRETRAIN_DATA to a folder that holds {path.name}"
        if is_offline():
            raise MedpretrainError(
                f"MedMNIST file {path} not found and MEDPRETRAIN_OFFLINE is set",
                f"{how}, or unset MEDPRETRAIN_OFFLINE to download it automatically",
            )
        try:
            _download(url, path, md5)
        except MedpretrainError:
            raise
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise MedpretrainError(f"MedMNIST file {path} not found and download failed ({exc})", how) from exc
    verify_file(path, md5)
    return path


# --- loading -------------------------------------------------------------------------------------------


def _read_npz(path: Path, flag: str) -> dict[str, np.ndarray]:
    fix = "delete it and run again to re-download it"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MedpretrainError(f"MedMNIST file {path} is not a readable .npz ({exc})", fix) from exc
    expected = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise MedpretrainError(f"MedMNIST file {path} lacks arrays {', '.join(missing)}", fix)
    for split in SPLITS:
        n_expected = int(INFO[flag]["n_samples"][split])
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_expected or n_lab != n_expected:
            raise MedpretrainError(
                f"MedMNIST file {path}: split '{split}' has {n_img} images / {n_lab} labels, "
                f"metadata says {n_expected}",
                fix,
            )
    return arrays


def _images_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(N,H,W) or (N,H,W,3) → uint8 N×C×H×W."""
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous()


def load_medmnist(flag: str, size: int = NATIVE_SIZE, image_size: int | None = None) -> Dataset:
    """Load one MedMNIST flag at a native `size`, resized once to `image_size` (None = native)."""
    check_flag(flag)
    check_size(flag, size)
    info = INFO[flag]
    target = size if image_size is None else image_size
    path = ensure_file(flag, size)
    arrays = _read_npz(path, flag)
    task = Task.from_medmnist(info["task"])
    classes = [str(info["label"][str(i)]) for i in range(len(info["label"]))]

    images: dict[str, torch.Tensor] = {}
    labels: dict[str, np.ndarray] = {}
    for split in SPLITS:
        images[split] = resize_uint8(_images_to_tensor(arrays.pop(f"{split}_images")), target)
        y = np.asarray(arrays.pop(f"{split}_labels")).astype(np.int64)
        # MedMNIST stores single labels as (N, 1); the rest of the toolkit expects (N,).
        labels[split] = y.reshape(len(y), -1) if task is Task.MULTILABEL else y.reshape(len(y))
    return Dataset(
        name=flag,
        task=task,
        classes=classes,
        images=images,
        labels=labels,
        key=f"{flag}-{size}-px{target}",
        source=str(path),
        size=size,
        image_size=target,
        meta={
            "kind": "medmnist",
            "path": str(path),
            "md5": file_md5(flag, size),
            "url": file_url(flag, size),
            "python_class": info.get("python_class", ""),
            "description": info.get("description", ""),
            "license": info.get("license", ""),
        },
    )
