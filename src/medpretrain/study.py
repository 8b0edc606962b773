"""A study: the whole comparison grid, read from YAML and validated before anything trains.

Every field is checked at the boundary (pydantic plus our registries), so a typo in a method, a protocol,
a dataset or a budget fails in a second with the offending key named, not an hour into a run. Presets are
study files shipped inside the package (`medpretrain/presets/*.yaml`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medpretrain.errors import MedpretrainError
from medpretrain.study_parts import (
    Budgets,
    DatasetEntry,
    Pretraining,
    check_init_text,
    is_init_text,
    member,
)

# Measured here (BENCHMARKS.md): ImageNet features need upsampled inputs — EfficientNet-Lite0 linear probe on
# pneumoniamnist, AUC 0.70 at 28 px vs 0.93 at 112 px — so a study with ImageNet-derived inits defaults to 112.
IMAGENET_IMAGE_SIZE = 112


class Study(BaseModel):
    """The comparison grid; the Python API's `mp.Study`. Invalid fields raise MedpretrainError naming the key.

    >>> import medpretrain as mp
    >>> study = mp.Study(datasets=["pneumoniamnist[train=60,val=40,test=40]"], inits=["scratch"],
    ...                  budgets={"fractions": [0.5, 1.0]}, seeds=2)
    >>> study.n_cells
    4
    >>> mp.Study(datasets=["pneumoniamnist"], inits=["scratch"], budgets={"fractions": [2.0]})
    Traceback (most recent call last):
    ...
    medpretrain.errors.MedpretrainError: Study(...): budgets.fractions: fractions must be in (0, 1], got [2.0] — ...
    """

    model_config = ConfigDict(extra="forbid")

    def __init__(self, /, **data: Any) -> None:
        # Constructed from Python (mp.Study(...)): the same one-line error as a study file's. validate_study
        # goes through model_validate, which does not come here, so a file's errors keep naming the file.
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _study_error(err, "Study(...)") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Study:
        """Read and validate a study file, as `medpretrain run FILE` does (`mp.Study.from_yaml("study.yaml")`)."""
        return load_study(path)

    name: str = "study"
    description: str = ""
    size: int = Field(28, description="MedMNIST source resolution: 28, 64, 128 or 224")  # before datasets: read there
    datasets: list[str | DatasetEntry] = Field(min_length=1)
    backbone: str = "resnet18"
    image_size: int | None = Field(None, ge=8)
    small_stem: bool = False
    inits: list[str | Pretraining] = Field(min_length=1)
    protocols: list[str] = Field(default_factory=lambda: ["linear"], min_length=1)
    # Which inits the fusion protocols (dvme, concat) combine: an init as written in `inits`, a pre-training's
    # label or method, or any other init (scratch, imagenet, noise, a checkpoint). Default: every init.
    sources: list[str] | None = Field(None, min_length=2)
    budgets: Budgets
    seeds: int = Field(3, ge=1)
    pretrain_seeds: int = Field(1, ge=1, description="pre-train each method N times; eval seed s uses s mod N")
    validation: Literal["full", "matched"] = "full"
    resize: Literal["bilinear", "nearest", "pad"] = "bilinear"
    # How every network (whatever its init) normalises its input: imagenet (each backbone's own, ImageNet's for
    # the registered ones) or half ((x - 0.5) / 0.5, the MedMNIST v2 baselines'); backbones.INPUT_NORMS.
    input_norm: str = "imagenet"
    hflip: float | None = Field(None, ge=0, le=1, description="flip probability; default: the dataset's")
    # Protocol parameters: `params: {protocol: {...}}` for any registered protocol; the per-protocol keys
    # `finetune:`, `linear:` and `knn:` are the same, kept because study files use them.
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Imbalance mitigations to compare: one cell each for protocols with a `mitigation` parameter (linear, finetune)
    mitigations: list[str] = Field(default_factory=list)
    finetune: dict[str, Any] = Field(default_factory=dict)
    linear: dict[str, Any] = Field(default_factory=dict)
    knn: dict[str, Any] = Field(default_factory=dict)
    # Learning-curve forecasts (medpretrain.forecast): labels needed to reach each target, per metric.
    targets: dict[str, list[float]] = Field(default_factory=dict)

    @field_validator("input_norm")
    @classmethod
    def _input_norm(cls, value: str) -> str:
        from medpretrain.backbones import INPUT_NORMS

        return member(value, INPUT_NORMS, "input_norm")

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        from medpretrain.forecast import FORECAST_METRICS

        for metric, levels in value.items():
            member(metric, FORECAST_METRICS, "target metric")
            bad = [t for t in levels if not 0 < t < 1]
            if bad:
                raise ValueError(f"targets for {metric} must lie in (0, 1), got {bad}")
        return {metric: sorted(set(levels)) for metric, levels in value.items()}

    @field_validator("datasets", mode="before")
    @classmethod
    def _available(cls, value: Any, info: Any) -> Any:
        """`datasets: available` = every MedMNIST dataset present in the data directory (the paper preset)."""
        if value != "available":
            return value
        from medpretrain.data import list_datasets

        size = info.data.get("size", 28) if info.data else 28
        found = [d.flag for d in list_datasets(size=size) if d.available]
        if not found:
            raise ValueError("no MedMNIST dataset found in the data directory; set MEDPRETRAIN_DATA or list datasets")
        return found

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, values: list[str | DatasetEntry], info: Any) -> list[str | DatasetEntry]:
        from medpretrain.data import MEDMNIST_FLAGS, check_spec, parse_subset, source_of

        size = info.data.get("size", 28) if info.data else 28  # `size` is validated first (declared first)
        for value in values:
            spec = value.spec if isinstance(value, DatasetEntry) else value
            try:
                base = value.name if isinstance(value, DatasetEntry) else parse_subset(value)[0]
                if source_of(base) is None:
                    where = f" in '{spec}'" if spec != base else ""
                    raise ValueError(
                        f"unknown dataset '{base}'{where}; allowed: a MedMNIST flag ({', '.join(MEDMNIST_FLAGS)}) "
                        "or an existing image folder / CSV manifest"
                    )
                # Subset syntax, size and counts larger than a split: the rest that needs no data.
                check_spec(spec, size=size)
            except MedpretrainError as err:
                # As a ValueError pydantic names the key (datasets.N), like every other study error.
                raise ValueError(f"{err.message}; {err.hint}") from None
        return values

    @field_validator("size")
    @classmethod
    def _size(cls, value: int) -> int:
        if value not in (28, 64, 128, 224):
            raise ValueError(f"size must be one of 28, 64, 128, 224, got {value}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from medpretrain.backbones import BACKBONES

        return member(value, BACKBONES, "backbone")

    @field_validator("inits")
    @classmethod
    def _known_inits(cls, values: list[str | Pretraining]) -> list[str | Pretraining]:
        for value in values:
            if isinstance(value, str):
                check_init_text(value)
        return values

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, values: list[str]) -> list[str]:
        from medpretrain.protocols import PROTOCOLS

        unknown = [v for v in values if v not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol {unknown}; allowed: {', '.join(sorted(PROTOCOLS))}")
        return list(dict.fromkeys(values))

    @model_validator(mode="after")
    def _protocol_params(self) -> Study:
        from medpretrain.mitigations import check_grid
        from medpretrain.protocols import get_protocol

        for name in sorted({"finetune", "linear", "knn", *self.params}):
            try:
                get_protocol(name).validate_params(self.params_for(name))
            except MedpretrainError as err:
                raise ValueError(f"{name}: {err.message}; {err.hint}") from None
        check_grid(self.mitigations, [p for p in self.protocols if "mitigation" in self.params_for(p)])
        return self

    @model_validator(mode="after")
    def _fusion_sources(self) -> Study:
        if any(get_fusion(p) for p in self.protocols):
            self.source_inits()  # raises for an unknown or ambiguous source, or fewer than two
        return self

    def source_inits(self) -> list[str | Pretraining]:
        """The inits the fusion protocols combine, resolved: `sources` (each matched to an init of the study
        by its text, label or method, else taken as an init of its own), or every init."""
        if self.sources is None:
            if len(self.inits) < 2:
                raise ValueError("a fusion protocol (dvme, concat) needs at least two inits or `sources`")
            return list(self.inits)
        return [_resolve_source(text, self.inits) for text in self.sources]

    @model_validator(mode="after")
    def _inits_have_networks(self) -> Study:
        from medpretrain.inits import check_trainable, parse_init
        from medpretrain.protocols import PROTOCOLS

        for name, init in ((p, i) for p in self.protocols for i in self.inits if isinstance(i, str)):
            if PROTOCOLS[name].trains_network:  # noise has no network: a one-line MedpretrainError as it is
                check_trainable(parse_init(init), f"protocol {name}")
        return self

    @property
    def dataset_specs(self) -> list[str]:
        return [d.spec if isinstance(d, DatasetEntry) else d for d in self.datasets]

    @property
    def n_cells(self) -> int:
        """The size of the grid: datasets × inits × protocols × budgets × seeds."""
        from medpretrain.budgets import ratios_of
        from medpretrain.mitigations import mitigation_grid

        n_budgets = (len(self.budgets.fractions) + len(self.budgets.shots)) * len(ratios_of(self.budgets.imbalance))
        per_budget = sum(
            (1 if get_fusion(p) else len(self.inits)) * len(mitigation_grid(self.mitigations, p))
            for p in self.protocols
        )
        return len(self.dataset_specs) * per_budget * n_budgets * self.seeds

    def params_for(self, protocol: str) -> dict[str, Any]:
        """The protocol's parameters: `params[protocol]` over the legacy per-protocol key of the same name."""
        legacy = getattr(self, protocol, None) if protocol in ("finetune", "linear", "knn") else None
        return {**(legacy or {}), **self.params.get(protocol, {})}


def get_fusion(protocol: str) -> bool:
    """Whether a (registered) protocol combines several inits' features."""
    from medpretrain.protocols import PROTOCOLS

    return protocol in PROTOCOLS and PROTOCOLS[protocol].fuses


def _resolve_source(text: str, inits: list[str | Pretraining]) -> str | Pretraining:
    """A fusion source: the study init it names (its text, a pre-training's label or display, or method when
    only one pre-training uses it), else an init of its own (keyword or checkpoint file)."""
    wanted = text.strip()
    named = [i for i in inits if isinstance(i, Pretraining) and wanted in (i.label, i.display)]
    if named:
        return named[0]
    by_method = [i for i in inits if isinstance(i, Pretraining) and i.method == wanted]
    if len(by_method) > 1:
        raise ValueError(f"source '{text}' matches {len(by_method)} pre-trainings; name one by its label")
    if by_method:
        return by_method[0]
    if not is_init_text(wanted):
        raise ValueError(
            f"source '{text}' is neither an init of the study (its text, a pre-training's label or method) nor an "
            "init of its own (scratch, imagenet or a checkpoint file)"
        )
    normal = check_init_text(wanted)
    return next((i for i in inits if isinstance(i, str) and check_init_text(i) == normal), normal)


def _location(loc: tuple[int | str, ...]) -> str:
    # pydantic reports union members as extra path parts ("str", "Pretraining"); users think in YAML keys.
    parts = [str(p) for p in loc if p not in ("str", "Pretraining", "DatasetEntry") and "[" not in str(p)]
    return ".".join(parts) or "(top level)"


def validate_study(data: Any, source: str) -> Study:
    """A Study from parsed YAML; the first problem becomes one MedpretrainError naming the key."""
    if not isinstance(data, dict):
        raise MedpretrainError(f"{source}: a study file must be a YAML mapping", "see `medpretrain run --help`")
    try:
        return Study.model_validate(data)
    except ValidationError as err:
        raise _study_error(err, source) from None


def _study_error(err: ValidationError, source: str) -> MedpretrainError:
    """The first problem of a validation error as one MedpretrainError naming the key."""
    errors = err.errors()
    # For `str | Model` unions pydantic lists one error per member; the model member's is the useful one.
    first = next((e for e in errors if e["type"] not in ("string_type",)), errors[0])
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    key = _location(first["loc"])
    allowed = ""
    if first["type"] == "extra_forbidden":
        model = _model_at(first["loc"])
        allowed = f"allowed keys here: {', '.join(model.model_fields)}" if model else ""
    return MedpretrainError(
        f"{source}: {key}: {message}", allowed or "fix that key; `medpretrain run --list-presets` shows examples"
    )


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    names = {"Pretraining": Pretraining, "DatasetEntry": DatasetEntry}
    for part in reversed(loc[:-1]):
        if part in names:
            return names[str(part)]
        if part == "budgets":
            return Budgets
    return Study if len(loc) == 1 else None


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("medpretrain.presets").iterdir()
                  if p.name.endswith(".yaml"))  # fmt: skip


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise MedpretrainError(f"unknown preset '{name}'", f"choose one of: {', '.join(preset_names())}")
    return resources.files("medpretrain.presets").joinpath(f"{name}.yaml").read_text()


def load_study(path: str | Path | None = None, *, preset: str | None = None) -> Study:
    """Read and validate a study file or a shipped preset."""
    if (path is None) == (preset is None):
        raise MedpretrainError("give either a study file or --preset", "e.g. medpretrain run --preset quick")
    if preset is not None:
        text, source = preset_text(preset), f"preset {preset}"
    else:
        file = Path(path).expanduser()  # type: ignore[arg-type]
        if not file.is_file():
            raise MedpretrainError(f"study file {file} does not exist", "give the path of a YAML study file")
        text, source = file.read_text(), str(file)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MedpretrainError(f"{source}: not valid YAML{where}", "check indentation and colons") from None
    study = validate_study(data, source)
    if study.name == "study":
        study.name = preset or Path(source).stem
    return study
