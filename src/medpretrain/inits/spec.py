"""Which initialisation to use: `InitSpec`, `parse_init`, and the registry of init kinds.

Each kind (``scratch``, ``imagenet``, ``checkpoint``) is one `InitKind` entry in `KINDS`: its display label,
an optional check run before any model is built, and the loader that fills a freshly created backbone.
Adding a kind means adding one entry here; `build_model` dispatches through the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.inits.checkpoints import _load_checkpoint, _require_file, checkpoint_key, checkpoint_meta
from medpretrain.inits.imagenet import _load_imagenet
from medpretrain.inits.report import LoadReport


@dataclass(frozen=True)
class InitKind:
    """One kind of initialisation.

    `load(backbone, spec, seed)` fills a backbone just created with torch seeded by `seed`;
    `check(spec, backbone_name, small_stem)`, when given, fails before anything is built or trained.
    """

    label: Callable[[InitSpec], str]
    load: Callable[[Backbone, InitSpec, int], LoadReport]
    takes_path: bool = False
    check: Callable[[InitSpec, str, bool], None] | None = None


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


KINDS: dict[str, InitKind] = {
    "scratch": InitKind(label=lambda spec: "scratch", load=_load_scratch),
    "imagenet": InitKind(label=lambda spec: "ImageNet", load=_load_imagenet_kind),
    "checkpoint": InitKind(
        label=_checkpoint_label, load=_load_checkpoint_kind, takes_path=True, check=_check_checkpoint
    ),
}
INIT_KINDS: tuple[str, ...] = tuple(KINDS)
# Kinds named by a keyword on the command line / in a study file; the path-taking kind is given by its path.
_KEYWORDS: tuple[str, ...] = tuple(name for name, kind in KINDS.items() if not kind.takes_path)
_QUOTED_KEYWORDS: tuple[str, ...] = tuple(f"'{name}'" for name in _KEYWORDS)


@dataclass(frozen=True)
class InitSpec:
    """Which initialisation to use; `path` only for kind "checkpoint"."""

    kind: str
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MedpretrainError(f"unknown init kind {self.kind!r}", f"use one of: {', '.join(INIT_KINDS)}")
        takes_path = KINDS[self.kind].takes_path
        if takes_path != (self.path is not None):
            raise MedpretrainError(
                f"init kind {self.kind!r} {'needs' if takes_path else 'takes no'} path",
                f"give a checkpoint path, or {' / '.join(_QUOTED_KEYWORDS)}",
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
        return KINDS[self.kind].label(self)


def parse_init(text: str) -> InitSpec:
    """'scratch', 'imagenet' (any case) or the path of an existing checkpoint file."""
    value = text.strip()
    if value.lower() in _KEYWORDS:
        return InitSpec(value.lower())
    path = Path(value).expanduser()
    if path.is_file():
        return InitSpec("checkpoint", path)
    if path.exists():
        raise MedpretrainError(f"init {text!r} is not a file", "give the path of a checkpoint file")
    raise MedpretrainError(
        f"unknown init {text!r} (not {', '.join(_QUOTED_KEYWORDS)} or an existing checkpoint file)",
        f"valid inits: {', '.join(_KEYWORDS)}, or the path of a checkpoint file",
    )
