"""Matching a foreign state_dict onto a backbone's (timm) keys.

Recognised layouts: plain / torchvision / timm state_dicts (direct key names), any module prefix (Lightning
``model.``, ``backbone.``, DDP ``module.``…), lightly-style ``nn.Sequential(*list(resnet.children())[:-1])``
keys (``0.weight``, ``4.0.conv1.weight``), and, as a last resort, another implementation's names when tensor
count, shapes and order all agree. The result is a `LoadReport` of loaded / missing / unexpected / skipped keys.

Official self-supervised ImageNet checkpoints (tested with files written in their exact layouts):

- DINO (Caron et al., ICCV 2021): ``{"teacher": ..., "student": ...}`` with ``backbone.`` keys (``module.backbone.``
  under DDP: the student always, the teacher of a ResNet); the teacher is taken (`checkpoints.CONTAINER_KEYS`),
  the ``head.`` (DINOHead) dropped;
- SwAV (Caron et al., NeurIPS 2020): ``module.`` keys, ``projection_head`` and ``prototypes`` dropped (heads);
- MoCo v2 (Chen et al., arXiv 2003.04297): ``state_dict`` of ``module.encoder_q.`` / ``module.encoder_k.`` and
  ``module.queue``: the query encoder is loaded whatever the key order, its ``fc.0``/``fc.2`` MLP dropped;
- MoCo v3 (Chen, Xie and He, ICCV 2021): ``module.base_encoder.`` / ``module.momentum_encoder.`` /
  ``module.predictor.``: the base encoder is loaded, its ``fc`` (ResNet) or ``head`` (ViT) projector dropped;
- SimCLR v1/v2 (Chen et al., ICML 2020; NeurIPS 2020) converted to torchvision (``{"state_dict": ...}`` of
  tonylins/simclr-converter): torchvision names, the supervised ``fc`` dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.inits.report import LoadReport, _is_counter, _preview

# Classifier/projection heads are task-specific: dropped on purpose, reported as skipped, not unexpected.
HEAD_NAMES: frozenset[str] = frozenset(
    {"fc", "classifier", "head", "heads", "head_dist", "_fc", "projection_head", "prediction_head", "prototypes"}
)
MIN_LOADED_FRACTION = 0.5


@dataclass(frozen=True)
class KnownLayout:
    """A checkpoint holding several copies of the network: `use` is the module to load, `others` the branches
    that are dropped on purpose (a momentum copy, a queue, a predictor).

    Without it, the two encoders match the backbone equally well and the first in key order would win: a file
    re-saved with sorted keys would load MoCo's key encoder (``encoder_k`` < ``encoder_q``).
    """

    name: str
    use: str
    others: tuple[str, ...]

    def applies(self, keys: list[str]) -> bool:
        segments = {part for key in keys for part in key.split(".")}
        return self.use in segments and any(other in segments for other in self.others)


KNOWN_LAYOUTS: tuple[KnownLayout, ...] = (
    KnownLayout("MoCo v2", use="encoder_q", others=("encoder_k", "queue", "queue_ptr")),
    KnownLayout("MoCo v3", use="base_encoder", others=("momentum_encoder", "predictor")),
)


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


def _best_name_match(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], children: list[str], layout: KnownLayout | None = None
) -> _Match:
    """Pick the (prefix to strip, key transform) under which most source tensors land on target keys; with a
    known layout, among the prefixes that end at its `use` module."""
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
    if layout is not None:
        wanted = {pt: v for pt, v in votes.items() if pt[0].endswith(f"{layout.use}.")}
        votes = wanted or votes
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


def load_state_into(
    backbone: Backbone, state: Mapping[str, Tensor], *, source_label: str, notes: tuple[str, ...] = ()
) -> LoadReport:
    """Load a state_dict of any supported layout into `backbone`, returning what matched.

    Strategy: strip whichever module prefix gives the most matches (Lightning ``model.``, ``backbone.``, DDP
    ``module.``...; for a `KNOWN_LAYOUTS` file the prefix of its `use` module), with direct key names or the
    lightly child-index remap; if nothing matches by name, fall back to ordered shape-matching when counts and
    every shape agree. Head keys are dropped on purpose. `notes` go into the report (e.g. which container).
    """
    target = backbone.model.state_dict()
    children = [name for name, _ in backbone.model.named_children()]
    layout = next((known for known in KNOWN_LAYOUTS if known.applies(list(state))), None)
    if layout is not None:
        notes = (*notes, f"{layout.name} layout: loaded {layout.use}, dropped {', '.join(layout.others)}")
    match = _best_name_match(state, target, children, layout)
    if not match.pairs:
        ordered = _ordered_shape_match(state, target)
        if ordered is not None:
            match = ordered
    transform = _child_index_transform(children) if match.transform == "child-index" else (lambda r: r)
    report, mismatched = _plan(
        backbone, state, match, source_label=source_label, transform=transform, extra_notes=notes
    )
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
