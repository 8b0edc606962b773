"""``timm:<model>`` inits: any timm model with its published weights, read from the local Hugging Face cache only.

``timm:vit_small_patch16_224.dino`` or ``timm:resnet50.a1_in1k`` names a timm model and its pretrained tag (no
tag: timm's default one). The model is its own backbone, as published: its architecture, stem, patch size,
feature width (timm's ``num_features``) and input normalisation (its pretrained config's mean/std); the study's
``backbone`` and ``small_stem`` do not apply to it (the load report says so). The weights are the file timm's
pretrained config names on the Hugging Face hub (``timm/<model>.<tag>``), looked up in the HF cache with
``huggingface_hub.try_to_load_from_cache`` (a file-system lookup, never a network call); an absent file is a
one-line error naming the cache path and the command that fetches it on a connected machine.
"""

from __future__ import annotations

from pathlib import Path

import timm
from timm.models import get_pretrained_cfg

from medpretrain.backbones import TIMM_PREFIX, Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.inits.checkpoints import _find_state_dict, _read_checkpoint, file_sha256
from medpretrain.inits.imagenet import HF_FILES, _hf_cache_dir, _hf_cached_file
from medpretrain.inits.layouts import load_state_into
from medpretrain.inits.report import LoadReport, _preview


def check_model_name(name: str) -> None:
    """Cheap, file-free checks when `timm:<name>` is parsed: timm knows the model and where its weights live."""
    if not name:
        raise MedpretrainError("init 'timm:' names no model", "write timm:<model>, e.g. timm:resnet50.a1_in1k")
    if not timm.is_model(name):
        raise MedpretrainError(
            f"timm has no model '{name}'",
            "list the names with python -c \"import timm; print(timm.list_models('*resnet*', pretrained=True))\"",
        )
    hub_repo(name)


def hub_repo(name: str) -> str:
    """The Hugging Face repository of `name`'s pretrained weights, from timm's pretrained config."""
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise MedpretrainError(
            f"timm model '{name}' has no pretrained weights on the Hugging Face hub",
            "pick a tag that has, from timm.list_models(pretrained=True), e.g. resnet50.a1_in1k",
        )
    return str(cfg.hf_hub_id)


def _filenames(name: str) -> tuple[str, ...]:
    cfg = get_pretrained_cfg(name)
    return (cfg.hf_hub_filename,) if cfg is not None and cfg.hf_hub_filename else HF_FILES


def weights_file(name: str) -> Path:
    """The cached weight file of `timm:<name>`, or a MedpretrainError naming where it belongs and how to get it."""
    repo = hub_repo(name)
    found = _hf_cached_file(repo, _filenames(name))
    if found is not None:
        return found
    where = _hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>" / _filenames(name)[0]
    raise MedpretrainError(
        f"weights of timm:{name} are not in the Hugging Face cache: no {where}",
        f'on a connected machine run `hf download {repo}` (or python -c "import timm; '
        f"timm.create_model('{name}', pretrained=True)\") and copy its cache to {_hf_cache_dir()}; "
        "nothing is downloaded at run time",
    )


def timm_key(name: str) -> str:
    """By the resolved repository and the file's bytes: `timm:resnet50` and `timm:resnet50.a1_in1k` are one init."""
    return f"timm-{hub_repo(name).rsplit('/', 1)[-1]}-{file_sha256(weights_file(name))[:16]}"


def load_timm_weights(backbone: Backbone, name: str) -> LoadReport:
    """Put the cached weights of `timm:<name>` into `backbone` (built by `create_backbone('timm:<name>')`)."""
    if backbone.name != f"{TIMM_PREFIX}{name}":
        raise MedpretrainError(
            f"weights of timm:{name} cannot go into backbone {backbone.name}",
            f"build the backbone timm:{name} (build_model does)",
        )
    path = weights_file(name)
    state = _find_state_dict(_read_checkpoint(path))
    if state is None:
        raise MedpretrainError(f"weight file {path} of timm:{name} holds no state_dict", "delete it and fetch it again")
    report = load_state_into(backbone, state, source_label=f"timm:{name} ({hub_repo(name)}, {path.name})")
    # The model is the one the file was published for, so a partial load is a wrong or damaged file, never a
    # stem that differs (which a checkpoint into a study's backbone may legitimately have).
    if report.missing:
        raise MedpretrainError(
            f"{path} lacks {len(report.missing)} tensors of timm:{name} ({_preview(report.missing)})",
            "the cached file is not this model's; delete it and fetch it again",
        )
    return report
