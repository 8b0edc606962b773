"""The one planner: which pre-trainings a study needs and which cells it evaluates, in what order.

`medpretrain run` (a study file or preset) and `medpretrain evaluate` (a study built from the command line) both
plan here, so both get the same image-size policy, the same duplicate-init check, the same cell keys and the
same execution path (`runner.run_study` → an executor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from medpretrain.budgets import Budget, ratios_of
from medpretrain.cells import Cell
from medpretrain.data import load_dataset, parse_subset, source_of
from medpretrain.errors import MedpretrainError
from medpretrain.inits import checkpoint_meta, parse_init
from medpretrain.mitigations import mitigation_grid
from medpretrain.pretrain import PretrainRequest, target_hflip
from medpretrain.protocols import get_protocol
from medpretrain.study import IMAGENET_IMAGE_SIZE, Pretraining, Study


@dataclass
class PretrainJob:
    """One pre-training the study needs, for the dataset it will be evaluated on."""

    dataset: str
    label: str
    request: PretrainRequest
    replicate: int = 0  # which of the study's `pretrain_seeds` pre-trainings of this init

    @property
    def description(self) -> str:
        return f"pre-train {self.label} on {self.request.dataset}"


def native_size(dataset: str, size: int) -> int:
    """The size a dataset's images have before any resizing: MedMNIST's `size`; for a user's folder or CSV the
    data layer's own choice (the median longest side, capped at 224), read from the loaded data set."""
    base = parse_subset(dataset)[0]
    source = source_of(base)
    native = source.native_size(base, size) if source is not None else None
    return native if native is not None else load_dataset(dataset, size=size).image_size


def image_size_for(study: Study, dataset: str) -> int:
    """One image size for every init of a dataset (a fair comparison): `image_size` when given; else a
    checkpoint's own training size (the largest, when several), else the native size; at least 112 px when any
    init starts from ImageNet (ImageNet features need upsampled small images, see IMAGENET_IMAGE_SIZE)."""
    if study.image_size is not None:
        return study.image_size
    own = [
        checkpoint_meta(init).get("image_size")
        for init in study.inits
        if isinstance(init, str) and parse_init(init).kind == "checkpoint"
    ]
    own_sizes = [int(s) for s in own if s]
    base = max(own_sizes) if own_sizes else native_size(dataset, study.size)
    starts = [i if isinstance(i, str) else i.init for i in study.inits]
    return max(base, IMAGENET_IMAGE_SIZE) if any(parse_init(s).from_imagenet for s in starts) else base


def check_distinct_inits(study: Study) -> None:
    """Refuse a study that lists one initialization twice: its cells would share keys, run twice and the second
    row would be silently dropped (results and feature caches are keyed by the init's key). Files are compared by
    init key: a copy of a checkpoint, or a file edited after pre-training that kept its request, is the same."""
    seen: dict[str, str] = {}
    for init in study.inits:
        if isinstance(init, Pretraining):
            key, shown = f"pretraining:{init.display}", init.display
        else:
            key, shown = parse_init(init).key, str(init)
        if key in seen:
            raise MedpretrainError(
                f"init '{shown}' and init '{seen[key]}' are the same initialization",
                "give each init once (a pre-training checkpoint is keyed by its request, not its bytes; a pre-training "
                "of the study needs a different method, setting or label)",
            )
        seen[key] = shown


def budgets_of(study: Study) -> list[Budget]:
    """Fractions, then shots, each at every imbalance ratio of the study."""
    b = study.budgets
    return [Budget(fraction=f, imbalance=r) for f in b.fractions for r in ratios_of(b.imbalance)] + [
        Budget(shots=k, imbalance=r) for k in b.shots for r in ratios_of(b.imbalance)
    ]


def with_mitigations(study: Study, cells: list[Cell]) -> list[Cell]:
    """Each cell once per mitigation of the study (`mitigations.mitigation_grid`), side by side so they share the
    cell's features; `none` leaves the params as they are, so its cells keep their keys."""
    out = []
    for cell in cells:
        for name in mitigation_grid(study.mitigations, cell.protocol):
            params = cell.params if name in (None, "none") else {**cell.params, "mitigation": name}
            out.append(replace(cell, params=params))
    return out


def pretrain_jobs(study: Study) -> list[PretrainJob]:
    """One job per (dataset, pre-training init, pre-training seed); seed k is the init's seed + k."""
    jobs = []
    for dataset in study.dataset_specs:
        pretrainings = [init for init in study.inits if isinstance(init, Pretraining)]
        if not pretrainings:
            continue
        # Per dataset, not per job: both may read checkpoint files or load the data set.
        image_size, hflip = image_size_for(study, dataset), target_hflip(study.hflip, dataset, study.size)
        for init in pretrainings:
            for k in range(study.pretrain_seeds):
                request = PretrainRequest(
                    dataset=init.unlabeled_from or dataset,
                    method=init.method,
                    backbone=study.backbone,
                    epochs=init.epochs,
                    init=init.init,
                    size=study.size,
                    image_size=image_size,
                    small_stem=study.small_stem,
                    seed=init.seed + k,
                    hparams=dict(init.hparams),
                    hflip=hflip,
                    input_norm=study.input_norm,
                )
                jobs.append(PretrainJob(dataset=dataset, label=init.display, request=request, replicate=k))
    return jobs


def plan_cells(study: Study, checkpoints: dict[tuple[str, str | None, int], Path]) -> list[Cell]:
    """Every cell, ordered dataset → init → protocol (feature-based first) → budget → seed.

    `checkpoints` maps (dataset, init label, replicate) of each pre-training to its finished file; evaluation
    seed s uses replicate s mod `pretrain_seeds`, so with several pre-trainings their variance is part of the
    seed-to-seed variance that the statistics count.
    """
    protocols = sorted(study.protocols, key=lambda p: (get_protocol(p).fuses, not get_protocol(p).uses_features))
    cells = []
    for dataset in study.dataset_specs:
        image_size = image_size_for(study, dataset)

        def cell(
            init: str,
            protocol: str,
            budget: Budget,
            seed: int,
            dataset: str = dataset,
            image_size: int = image_size,
            **extra: object,
        ) -> Cell:
            return Cell(
                dataset=dataset,
                size=study.size,
                image_size=image_size,
                backbone=study.backbone,
                small_stem=study.small_stem,
                init=init,
                protocol=protocol,
                budget=budget,
                seed=seed,
                params=study.params_for(protocol),
                validation=study.validation,
                resize=study.resize,
                hflip=study.hflip,
                input_norm=study.input_norm,
                **extra,  # type: ignore[arg-type]
            )

        def text(init: str | Pretraining, seed: int, dataset: str = dataset) -> str:
            if isinstance(init, Pretraining):
                return str(checkpoints[dataset, init.display, seed % study.pretrain_seeds])
            return str(init)

        for protocol in protocols:
            if get_protocol(protocol).fuses:
                # One cell per set of sources: its init is the first source, `sources` the rest.
                sources = study.source_inits()
                label = " + ".join(_display(s) for s in sources)
                here = any(isinstance(s, Pretraining) for s in sources)
                for budget in budgets_of(study):
                    for seed in range(study.seeds):
                        texts = [text(s, seed) for s in sources]
                        cells.append(cell(texts[0], protocol, budget, seed, sources=tuple(texts[1:]),
                                          init_label=label, pretrained_here=here))  # fmt: skip
                continue
            for init in study.inits:
                label = init.display if isinstance(init, Pretraining) else None
                for budget in budgets_of(study):
                    for seed in range(study.seeds):
                        cells.append(cell(text(init, seed), protocol, budget, seed, init_label=label,
                                          pretrained_here=isinstance(init, Pretraining)))  # fmt: skip
    return with_mitigations(study, cells)


def _display(init: str | Pretraining) -> str:
    return init.display if isinstance(init, Pretraining) else parse_init(init).label


def explanation_cells(cells: list[Cell]) -> dict[str, Path]:
    """Which fine-tuned networks to keep for Grad-CAM: per (dataset, init) the cell with the most labels
    (largest fraction, else largest shots) and the lowest seed. Returns cell key → relative model path."""
    best: dict[tuple[str, str], Cell] = {}

    def rank(c: Cell) -> tuple[int, float, int]:
        b = c.budget
        return (1, b.fraction, -c.seed) if b.fraction is not None else (0, float(b.shots or 0), -c.seed)

    for cell in cells:
        if get_protocol(cell.protocol).uses_features:
            continue
        group = (cell.dataset, cell.init_name)
        if group not in best or rank(cell) > rank(best[group]):
            best[group] = cell
    return {c.key: Path("models") / f"{c.key}.pt" for c in best.values()}


__all__ = [
    "PretrainJob",
    "budgets_of",
    "check_distinct_inits",
    "explanation_cells",
    "image_size_for",
    "native_size",
    "plan_cells",
    "pretrain_jobs",
]
