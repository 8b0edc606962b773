"""Which initialisation to use: `InitSpec`, `parse_init`, and the registry of init kinds.

Each kind is one `InitKind` entry in `KINDS`: its display label, how it is written (a keyword, a path, or a
prefix and an argument), an optional check run before any model is built, and the loader that fills a freshly
created backbone — or, for a kind without a network, the features it stands for. Adding a kind means adding
one entry here; `build_model`, `parse_init`, the feature cache and the study's validation dispatch through it.

- ``scratch``: random weights; ``imagenet``: supervised ImageNet-1k weights found offline (`imagenet`);
- a checkpoint file (`checkpoints`, `layouts`: ours, plain, torchvision, timm, Lightning, lightly, and the
  official DINO, SwAV, MoCo v2/v3 and converted SimCLR files);
- ``timm:<model>``: any timm model with its published weights from the local Hugging Face cache, as its own
  backbone (`timm_hub`); rows record it as ``checkpoint`` (weights someone else trained, at no cost to you);
- ``noise``: the negative control, image-independent Gaussian features of the backbone's width (`noise`); no
  network, so only frozen-feature protocols (linear, knn, fusions) take it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpretrain.backbones import TIMM_PREFIX, Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.inits.checkpoints import _load_checkpoint, _require_file, checkpoint_key, checkpoint_meta
from medpretrain.inits.imagenet import _load_imagenet
from medpretrain.inits.noise import noise_features
from medpretrain.inits.report import LoadReport
from medpretrain.inits.timm_hub import check_model_name, load_timm_weights, timm_key


@dataclass(frozen=True)
class InitKind:
    """One kind of initialisation.

    `load(backbone, spec, seed)` fills a backbone just created with torch seeded by `seed`;
    `check(spec, backbone_name, small_stem)`, when given, fails before anything is built or trained.
    A kind is written as its name (a keyword), as a path (`takes_path`), or as `prefix` + an argument
    (`InitSpec.name`), which `validate` checks cheaply (no file read) when the spec is made.
    `key` identifies its content for caches and results (default: the kind's name). `features(spec, width,
    split, n)`, when given, is what the kind stands for instead of a network (the frozen-feature protocols read
    it; the kind then has no network to fine-tune). `backbone(spec)`, when given, names the backbone the init
    brings with it, replacing the study's. `record_kind` is what results rows store as `init_kind` (default:
    the kind's name; the report's cost model reads it). `from_imagenet`: natural-image weights, so small images
    are upsampled for it (`study.IMAGENET_IMAGE_SIZE`).
    """

    label: Callable[[InitSpec], str]
    load: Callable[[Backbone, InitSpec, int], LoadReport]
    takes_path: bool = False
    prefix: str | None = None
    check: Callable[[InitSpec, str, bool], None] | None = None
    validate: Callable[[InitSpec], None] | None = None
    key: Callable[[InitSpec], str] | None = None
    features: Callable[[InitSpec, int, str, int], np.ndarray] | None = None
    backbone: Callable[[InitSpec], str] | None = None
    record_kind: str | None = None
    from_imagenet: bool = False

    @property
    def has_network(self) -> bool:
        return self.features is None


def _load_scratch(backbone: Backbone, spec: InitSpec, seed: int) -> LoadReport:
    # Nothing to load: create_backbone already drew the random weights from the seeded generator.
    return LoadReport(source=f"scratch (random init, seed {seed})")


def _load_imagenet_kind(backbone: Backbone, spec: InitSpec, seed: int) -> LoadReport:
    return _load_imagenet(backbone)


def _load_checkpoint_kind(backbone: Backbone, spec: InitSpec, seed: int) -> LoadReport:
    assert spec.path is not None
    return _load_checkpoint(backbone, spec.path)


def _checkpoint_label(spec: InitSpec) -> str:
    assert spec.path is not None
    return f"ckpt:{spec.path.stem}"


def _checkpoint_key(spec: InitSpec) -> str:
    assert spec.path is not None
    _require_file(spec.path)
    return checkpoint_key(spec.path)


def _check_checkpoint(spec: InitSpec, backbone: str, small_stem: bool) -> None:
    """Our own checkpoints record their backbone and stem; a mismatch is a usage error, not a partial load."""
    assert spec.path is not None
    meta = checkpoint_meta(spec.path)
    if meta and meta.get("backbone_name") != backbone:
        raise MedpretrainError(
            f"checkpoint {spec.path} was trained for backbone {meta['backbone_name']}, not {backbone}",
            f"use --backbone {meta['backbone_name']}",
        )
    if meta and bool(meta.get("small_stem")) != small_stem:
        flag = "with" if meta.get("small_stem") else "without"
        raise MedpretrainError(f"checkpoint {spec.path} was trained {flag} the small stem", f"run {flag} --small-stem")


def _timm_name(spec: InitSpec) -> str:
    assert spec.name is not None
    return spec.name


def _load_timm_kind(backbone: Backbone, spec: InitSpec, seed: int) -> LoadReport:
    return load_timm_weights(backbone, _timm_name(spec))


def _noise_features(spec: InitSpec, width: int, split: str, n: int) -> np.ndarray:
    return noise_features(width, split, n)


def _refuse_no_network(spec: InitSpec, backbone: str = "", small_stem: bool = False) -> None:
    raise MedpretrainError(
        f"init '{spec.text}' has no network: its features are seeded Gaussian noise, not computed from the images",
        "use it with frozen-feature protocols only (linear, knn, or as a fusion source), not to fine-tune or "
        "to start a pre-training from",
    )


def _load_no_network(backbone: Backbone, spec: InitSpec, seed: int) -> LoadReport:
    _refuse_no_network(spec)
    raise AssertionError("unreachable")  # _refuse_no_network always raises


KINDS: dict[str, InitKind] = {
    "scratch": InitKind(label=lambda spec: "scratch", load=_load_scratch),
    "imagenet": InitKind(label=lambda spec: "ImageNet", load=_load_imagenet_kind, from_imagenet=True),
    "checkpoint": InitKind(
        label=_checkpoint_label,
        load=_load_checkpoint_kind,
        takes_path=True,
        check=_check_checkpoint,
        key=_checkpoint_key,
    ),
    # Weights someone else trained and published: rows record "checkpoint" (a file you bring costs nothing to
    # obtain), not "imagenet", which the report keeps for the supervised ImageNet baseline of the study's backbone.
    "timm": InitKind(
        label=lambda spec: f"{TIMM_PREFIX}{spec.name}",
        load=_load_timm_kind,
        prefix=TIMM_PREFIX,
        validate=lambda spec: check_model_name(_timm_name(spec)),
        key=lambda spec: timm_key(_timm_name(spec)),
        backbone=lambda spec: f"{TIMM_PREFIX}{spec.name}",
        record_kind="checkpoint",
        from_imagenet=True,
    ),
    "noise": InitKind(
        label=lambda spec: "noise", load=_load_no_network, check=_refuse_no_network, features=_noise_features
    ),
}
INIT_KINDS: tuple[str, ...] = tuple(KINDS)
# Kinds named by a keyword on the command line / in a study file; the others are given by a path or a prefix.
_KEYWORDS: tuple[str, ...] = tuple(name for name, kind in KINDS.items() if not kind.takes_path and not kind.prefix)
_PREFIXES: dict[str, str] = {kind.prefix: name for name, kind in KINDS.items() if kind.prefix}
_WRITTEN: tuple[str, ...] = (*(f"'{k}'" for k in _KEYWORDS), *(f"'{p}<model>'" for p in _PREFIXES))


@dataclass(frozen=True)
class InitSpec:
    """Which initialisation to use; `path` only for a path-taking kind, `name` only for a prefixed one."""

    kind: str
    path: Path | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MedpretrainError(f"unknown init kind {self.kind!r}", f"use one of: {', '.join(INIT_KINDS)}")
        kind = KINDS[self.kind]
        if kind.takes_path != (self.path is not None):
            raise MedpretrainError(
                f"init kind {self.kind!r} {'needs' if kind.takes_path else 'takes no'} path",
                f"give a checkpoint path, or {' / '.join(_WRITTEN)}",
            )
        if (kind.prefix is not None) != (self.name is not None):
            raise MedpretrainError(
                f"init kind {self.kind!r} {'needs' if kind.prefix else 'takes no'} name",
                f"write {kind.prefix}<name>" if kind.prefix else f"write '{self.kind}'",
            )
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
        if kind.validate is not None:
            kind.validate(self)

    @property
    def key(self) -> str:
        """Stable identifier for caching results; content-based for files."""
        kind = KINDS[self.kind]
        return kind.key(self) if kind.key is not None else self.kind

    @property
    def label(self) -> str:
        """Display name for tables and plots."""
        return KINDS[self.kind].label(self)

    @property
    def text(self) -> str:
        """The init as written on the command line or in a study file (parse_init(spec.text) == spec)."""
        if self.path is not None:
            return str(self.path)
        return f"{KINDS[self.kind].prefix}{self.name}" if self.name is not None else self.kind

    @property
    def record_kind(self) -> str:
        """What results rows store as `init_kind` (scratch, imagenet, checkpoint, noise)."""
        return KINDS[self.kind].record_kind or self.kind

    @property
    def from_imagenet(self) -> bool:
        return KINDS[self.kind].from_imagenet

    @property
    def has_network(self) -> bool:
        return KINDS[self.kind].has_network


def parse_init(text: str) -> InitSpec:
    """A keyword ('scratch', 'imagenet', 'noise'; any case), a prefixed kind ('timm:<model>') or the path of an
    existing checkpoint file."""
    value = text.strip()
    if value.lower() in _KEYWORDS:
        return InitSpec(value.lower())
    for prefix, kind in _PREFIXES.items():
        if value.lower().startswith(prefix):
            return InitSpec(kind, name=value[len(prefix) :].strip())
    path = Path(value).expanduser()
    if path.is_file():
        return InitSpec("checkpoint", path)
    if path.exists():
        raise MedpretrainError(f"init {text!r} is not a file", "give the path of a checkpoint file")
    raise MedpretrainError(
        f"unknown init {text!r} (not {', '.join(_WRITTEN)} or an existing checkpoint file)",
        f"valid inits: {', '.join(w.strip(chr(39)) for w in _WRITTEN)}, or the path of a checkpoint file",
    )


def init_text(value: str, *, start: bool = False) -> str:
    """The init as a study stores it: a keyword, ``timm:<model>``, or a checkpoint's resolved path. `start`: it
    must also be something a pre-training can start from (`check_pretraining_start`)."""
    spec = parse_init(value)
    if start:
        check_pretraining_start(spec)
    return str(spec.path.resolve()) if spec.path is not None else spec.text


def check_trainable(spec: InitSpec, use: str) -> None:
    """Refuse an init without a network for `use` (a protocol that trains one, e.g. "protocol finetune")."""
    if not spec.has_network:
        raise MedpretrainError(
            f"init '{spec.text}' cannot be used by {use}: it has no network (its features are Gaussian noise)",
            "use it only with frozen-feature protocols (linear, knn) or as a fusion source, in a study of its own "
            "if others are fine-tuned",
        )


def check_pretraining_start(spec: InitSpec) -> None:
    """Refuse an init a pre-training cannot start from: one without a network, or one that brings its own
    backbone (a checkpoint of it would fit no registered backbone to evaluate it with)."""
    if not spec.has_network:
        _refuse_no_network(spec)
    if KINDS[spec.kind].backbone is not None:
        raise MedpretrainError(
            f"a pre-training cannot start from '{spec.text}': it is its own architecture, not the study's backbone",
            "start from imagenet (torchvision/timm weights of the study's backbone) or a checkpoint file",
        )
