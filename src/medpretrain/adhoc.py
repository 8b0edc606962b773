"""The study behind `medpretrain evaluate` and `mp.evaluate`: one dataset's options, checked, as a Study.

Both front doors call `evaluation_study`, so the command line and the Python API plan, key and run the same
cells. Everything checkable without data fails here, before a progress bar starts or an image is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medpretrain.errors import MedpretrainError
from medpretrain.study import Study


def evaluation_study(
    dataset: str,
    *,
    init: Sequence[str] = ("scratch",),
    backbone: str = "resnet18",
    protocol: Sequence[str] = ("linear",),
    source: Sequence[str] = (),
    fraction: Sequence[float] = (),
    shots: Sequence[int] = (),
    imbalance: Sequence[float] = (),
    mitigation: Sequence[str] = (),
    seeds: int = 1,
    size: int = 28,
    image_size: int | None = None,
    small_stem: bool | None = None,
    epochs: int | None = None,
    min_steps: int | None = None,
    lr: Sequence[float] = (),
    batch_size: int | None = None,
    class_weighted: bool = False,
    bn_adapt: bool = False,
    validation: str = "full",
    resize: str = "bilinear",
    hflip: float | None = None,
    input_norm: str = "imagenet",
    executor: str = "local",
) -> Study:
    """The validated study `medpretrain evaluate` runs for these options (named as its command-line options)."""
    from medpretrain.backbones import get_spec
    from medpretrain.budgets import Budget
    from medpretrain.data import check_spec
    from medpretrain.executors import check_executor
    from medpretrain.inits import checkpoint_meta, parse_init
    from medpretrain.protocols import get_protocol
    from medpretrain.study import validate_study

    check_spec(dataset, size=size)
    for name in protocol:
        get_protocol(name)
    get_spec(backbone)
    for budget_kw in [{"fraction": f} for f in fraction] + [{"shots": k} for k in shots]:
        for ratio in imbalance or [None]:
            Budget(**budget_kw, imbalance=ratio)
    if not fraction and not shots:
        raise MedpretrainError("no label budget given", "add --fraction 1.0 (all labels) or --shots 10")
    finetune_params: dict[str, Any] = {
        k: v
        for k, v in {
            "epochs": epochs,
            "min_steps": min_steps,
            "lr": list(lr) or None,
            "batch_size": batch_size,
            "class_weighted": class_weighted or None,
        }.items()
        if v is not None
    }
    frozen_params: dict[str, Any] = {"bn_adapt": True} if bn_adapt else {}
    for name in protocol:
        get_protocol(name).validate_params(finetune_params if name == "finetune" else frozen_params)
    check_executor(executor)
    stems = {bool(checkpoint_meta(p).get("small_stem")) for p in (parse_init(t).path for t in init) if p}
    if small_stem is None and len(stems) > 1:
        raise MedpretrainError(
            "the checkpoints were trained with different stems", "choose one: --small-stem or --standard-stem"
        )
    return validate_study(
        {
            "name": "evaluate",
            "datasets": [str(Path(dataset).resolve()) if Path(dataset).exists() else dataset],
            "size": size,
            "backbone": backbone,
            "image_size": image_size,
            "small_stem": small_stem if small_stem is not None else any(stems),
            "inits": list(init),
            "protocols": list(protocol),
            "budgets": {"fractions": list(fraction), "shots": list(shots), "imbalance": list(imbalance) or None},
            "mitigations": list(mitigation),
            "seeds": seeds,
            "validation": validation,
            "hflip": hflip,
            "resize": resize,
            "input_norm": input_norm,
            "sources": list(source) or None,
            "params": {name: finetune_params if name == "finetune" else frozen_params for name in protocol},
        },
        "command line",
    )
