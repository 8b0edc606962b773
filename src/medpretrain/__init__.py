"""medpretrain: ImageNet transfer vs self-supervised pre-training for medical imaging.

The Python API is the command line's code, called from Python (`medpretrain.api`)::

    import medpretrain as mp
    study = mp.Study.from_yaml("study.yaml")          # or mp.Study(datasets=[...], ...), or mp.preset("quick")
    run = mp.run(study, out="runs/x")                 # resumable, as `medpretrain run`
    df = run.results()                                # pandas, one row per cell, JSON columns expanded
    run.compare("spark", "imagenet", protocol="linear")
    mp.evaluate(dataset="bloodmnist", init="scratch", fractions=[0.01, 0.1]).results()
    mp.open_run("runs/x")                             # a finished or interrupted run, read-only

Expected failures raise `MedpretrainError`. The names are loaded on first use, so `import medpretrain` stays
cheap (no torch until something runs).
"""

from __future__ import annotations

from medpretrain.errors import MedpretrainError

TYPE_CHECKING = False  # not typing's: importing typing would triple the cost of `import medpretrain`
if TYPE_CHECKING:
    from typing import Any

    from medpretrain.api import Run, evaluate, open_run, preset, run
    from medpretrain.study import Study

__version__ = "0.1.0"
__all__ = ["MedpretrainError", "Run", "Study", "__version__", "evaluate", "open_run", "preset", "run"]
_LAZY = {
    "Run": "medpretrain.api",
    "evaluate": "medpretrain.api",
    "open_run": "medpretrain.api",
    "preset": "medpretrain.api",
    "run": "medpretrain.api",
    "Study": "medpretrain.study",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'medpretrain' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
