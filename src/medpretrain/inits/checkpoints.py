"""Checkpoint files: our own format (see CONTRACTS.md), reading any supported file, and content keys.

Our format is a ``torch.save`` dict with ``"format": CHECKPOINT_FORMAT`` and the backbone's weights under
``"backbone"``. Other files may be a plain state_dict, a torchvision/timm checkpoint, a Lightning checkpoint
(``{"state_dict": ...}``), any of the containers in `CONTAINER_KEYS`, or ``.safetensors``; their key layout
is matched onto the backbone by `medpretrain.inits.layouts`.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.inits.layouts import load_state_into
from medpretrain.inits.report import LoadReport

CHECKPOINT_FORMAT = "medpretrain/1"
# Containers that wrap a state_dict in common checkpoint formats, most specific first. "teacher" comes before
# "student": DINO's teacher (the EMA network) is the one DINO evaluates (its eval scripts' default
# --checkpoint_key teacher), and a DINO file holds both.
CONTAINER_KEYS: tuple[str, ...] = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "backbone",
    "encoder",
    "network",
    "net",
    "teacher",
    "student",
    "module",
    "params",
    "weights",
)


# --------------------------------------------------------------------------------------------------- keys


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size/mtime are part of the cache key so an overwritten file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (memoised per path, size and mtime)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _pretraining_identity(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT and obj.get("config", {}).get("method"):
        from medpretrain.runtime import stable_hash

        return stable_hash(obj["config"])
    return None


def checkpoint_key(path: Path) -> str:
    """Our own pre-training checkpoints are named by their request (dataset, method, hyper-parameters, epochs,
    seed…), so they are keyed by it: the same request trained on another machine or executor — whose floating
    point differs in the last bits — is the same init. Any other file is keyed by its bytes."""
    st = path.stat()
    identity = _pretraining_identity(str(path.resolve()), st.st_size, st.st_mtime_ns)
    return f"pre-{identity}" if identity else "ckpt-" + file_sha256(path)[:16]


# --------------------------------------------------------------------------------------------------- reading


def _require_file(path: Path) -> None:
    if not path.exists():
        raise MedpretrainError(f"checkpoint {path} does not exist", "check the path")
    if not path.is_file():
        raise MedpretrainError(f"checkpoint {path} is not a file", "give the path of a checkpoint file")


def _read_checkpoint(path: Path) -> Any:
    """Load a checkpoint file on CPU, tensors-and-plain-types first."""
    _require_file(path)
    hint = "expected a file written by torch.save (or .safetensors) holding a state_dict"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise MedpretrainError(f"cannot read checkpoint {path}: {err}", hint) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Lightning/other trainers pickle hyper-parameter objects next to the weights. The user named this
        # file explicitly, so a full unpickle of a genuine torch.save archive is acceptable; anything else is
        # not a checkpoint.
        if not zipfile.is_zipfile(path):
            raise MedpretrainError(f"cannot read checkpoint {path}: not a torch checkpoint", hint) from err
        warnings.warn(
            f"{path} holds non-tensor Python objects; loading it with full unpickling (trust the source)",
            stacklevel=3,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise MedpretrainError(f"cannot read checkpoint {path}: {err2}", hint) from err2
    except PermissionError as err:
        raise MedpretrainError(f"cannot read checkpoint {path}: permission denied", "check its permissions") from err
    except Exception as err:
        raise MedpretrainError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}", hint) from err


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    # A few non-tensor entries (e.g. a version number saved next to the weights) still make a state_dict.
    tensors = sum(isinstance(v, Tensor) for v in obj.values())
    return tensors > 0 and tensors >= 0.9 * len(obj) and all(isinstance(k, str) for k in obj)


def _locate_state_dict(obj: Any, depth: int = 0) -> tuple[dict[str, Tensor], tuple[str, ...]] | None:
    """The state_dict in `obj` and the container keys leading to it (() at the top level)."""
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict()), ()
    if _is_state_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, ()
    if isinstance(obj, Mapping) and depth < 3:
        for key in CONTAINER_KEYS:
            if key in obj:
                found = _locate_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found[0], (key, *found[1])
    return None


def _find_state_dict(obj: Any) -> dict[str, Tensor] | None:
    found = _locate_state_dict(obj)
    return None if found is None else found[0]


# --------------------------------------------------------------------------------------------------- own format


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """backbone_name, small_stem, image_size and method of one of our own checkpoints; {} for others."""
    obj = _read_checkpoint(Path(path))
    if not (isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT):
        return {}
    return {k: obj.get(k) for k in ("backbone_name", "small_stem", "image_size", "method")}


def save_checkpoint(
    path: str | Path,
    backbone: Backbone,
    *,
    image_size: int,
    method: str,
    config: Mapping[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a backbone in our own format. `config`/`history` must hold plain Python types only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "backbone_name": backbone.name,
        "small_stem": backbone.small_stem,
        "image_size": int(image_size),
        "backbone": {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()},
        "method": method,
        "config": dict(config or {}),
        "history": list(history or []),
    }
    torch.save(payload, path)
    return path


def _load_checkpoint(backbone: Backbone, path: Path) -> LoadReport:
    """Put the weights of checkpoint file `path` (ours or a foreign layout) into `backbone`."""
    obj = _read_checkpoint(path)
    notes: tuple[str, ...] = ()
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        state = obj.get("backbone")
        if not _is_state_dict(state):
            raise MedpretrainError(f"checkpoint {path} has no backbone weights", "it is incomplete; re-create it")
    else:
        found = _locate_state_dict(obj)
        if found is None:
            raise MedpretrainError(
                f"checkpoint {path} holds no state_dict",
                f"expected tensors at the top level or under one of: {', '.join(CONTAINER_KEYS)}",
            )
        state, where = found
        if where:
            others = [k for k in CONTAINER_KEYS if isinstance(obj, Mapping) and k in obj and k != where[0]]
            also = f" (not {', '.join(repr(k) for k in others)})" if others else ""
            notes = (f"weights from its {'/'.join(repr(k) for k in where)} entry{also}",)
    return load_state_into(backbone, state, source_label=f"checkpoint {path}", notes=notes)
