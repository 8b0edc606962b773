"""`build_model`: create a backbone and initialise it through the init-kind registry, with a `LoadReport`."""

from __future__ import annotations

from dataclasses import replace

import torch

from medpretrain.backbones import DEFAULT_INPUT_NORM, Backbone, create_backbone, get_spec
from medpretrain.inits.report import LoadReport
from medpretrain.inits.spec import KINDS, InitSpec, parse_init


def build_model(
    backbone: str,
    init: InitSpec | str,
    *,
    small_stem: bool = False,
    seed: int = 0,
    img_size: int | None = None,
    input_norm: str = DEFAULT_INPUT_NORM,
) -> tuple[Backbone, LoadReport]:
    """Create `backbone` (torch seeded with `seed` first, so scratch is reproducible) and initialise it.

    An init that brings its own architecture (``timm:<model>``) is built as that backbone instead; the load
    report notes that the requested backbone and stem did not apply.
    """
    spec = parse_init(init) if isinstance(init, str) else init
    get_spec(backbone)  # unknown names fail before any file is read
    kind = KINDS[spec.kind]
    if kind.check is not None:
        # Before seeding and building: a wrong --backbone / --small-stem should fail without any work done.
        kind.check(spec, backbone, small_stem)
    own = kind.backbone(spec) if kind.backbone is not None else None
    torch.manual_seed(seed)
    model = create_backbone(
        own or backbone, small_stem=small_stem and own is None, img_size=img_size, input_norm=input_norm
    )
    report = kind.load(model, spec, seed)
    if own is not None:
        stem = " and --small-stem" if small_stem else ""
        note = f"{own} is its own architecture as published: backbone {backbone}{stem} do not apply to it"
        report = replace(report, notes=(*report.notes, note))
    return model, report
