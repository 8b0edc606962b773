"""Where the numbers came from: the study's configuration, its validation policy, versions, hardware and time.

Section 9 of the report and the header's count of planned cells. Everything is read from `study.json`,
`run_log.jsonl` and the rows themselves; what is not recorded is shown as unknown, never guessed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import yaml

from medpretrain.report.run import Run, finite
from medpretrain.report.text import fmt

FULL, MATCHED = "full", "matched"
INPUT_NORM_TEXT = {"imagenet": "ImageNet mean/std", "half": "(x − 0.5) / 0.5 (the MedMNIST v2 baselines')"}


def _policy(row: dict[str, Any]) -> str:
    """A row's validation policy; rows written before the policy existed validated on the whole split."""
    return str((row.get("config") or {}).get("validation") or FULL)


def _counts(values: set[int]) -> str:
    return " or ".join(str(v) for v in sorted(values))


def validation(run: Run) -> list[dict[str, Any]]:
    """Per data set, one sentence per validation policy its rows used (normally one): how many validation images
    chose the hyper-parameters, the epoch and the best initialisation. A full split at a small label budget is
    more validation data than such a project would have, which flatters every arm's selection."""
    out = []
    for dataset in run.datasets:
        rows = [r for r in run.rows if r["dataset"] == dataset]
        by_policy: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_policy[_policy(r)].append(r)
        budgets = run.budgets(dataset)
        mixed = len(by_policy) > 1
        sentences = []
        for policy, members in by_policy.items():
            scope = ""
            if mixed:  # say which budgets each policy covers, or the two sentences would contradict each other
                covered = [b for b in budgets if any(m["budget"] == b for m in members)]
                scope = f" (cells at budget{'s' if len(covered) != 1 else ''} {', '.join(covered)})"
            if policy == FULL:
                # Rows from before `n_val` was recorded used the whole split: its size is the count.
                counts = {int(m["n_val"]) for m in members if m.get("n_val") is not None}
                if any(m.get("n_val") is None for m in members):
                    counts.add(run.val_split_size(dataset))
                sentences.append(
                    f"Validation{scope}: full validation split{'' if mixed else ' at every budget'} "
                    f"({_counts(counts)} images) — "
                    "optimistic at small budgets, where a real project would not have that many labelled "
                    "validation images."
                )
            elif policy == MATCHED:
                per_budget = []
                for b in budgets:
                    counts = {int(m["n_val"]) for m in members if m["budget"] == b and m.get("n_val") is not None}
                    if any(m["budget"] == b for m in members):
                        per_budget.append(f"{_counts(counts) if counts else 'not recorded'} at budget {b}")
                sentences.append(
                    f"Validation{scope}: matched — subsampled in the same proportion as the training budget "
                    f"(validation images per budget: {'; '.join(per_budget)})."
                )
            else:
                sentences.append(f"Validation{scope}: {policy} (a policy this version of the report does not know).")
        out.append({"dataset": dataset, "sentences": sentences})
    return out


def config(run: Run) -> dict[str, Any]:
    """Section 9: study.json as YAML, the validation policy, library versions, hardware and the time of each
    `medpretrain run` invocation."""
    study = run.study
    study_text = (
        yaml.safe_dump(study, sort_keys=False, allow_unicode=True, default_flow_style=False)
        if isinstance(study, dict)
        else None
    )
    last = run.run_log[-1] if run.run_log else {}
    if last.get("versions"):
        versions, versions_source = last["versions"], "recorded by the last `medpretrain run`"
    elif run.rows[-1].get("versions"):
        versions, versions_source = run.rows[-1]["versions"], "recorded with the last finished cell"
    else:
        versions, versions_source = {}, "unknown"
    hardware = [e["hardware"] for e in run.run_log if e.get("hardware")]
    distinct_hw = [json.loads(h) for h in dict.fromkeys(json.dumps(h, sort_keys=True) for h in hardware)]
    seconds = [e.get("seconds") for e in run.run_log]
    invocations = [
        {
            "started": e.get("started", "?"),
            "finished": e.get("finished", "—"),
            "seconds": fmt(e.get("seconds"), 0),
            "executor": e.get("executor", "?"),
            "completed": {True: "yes", False: "no (stopped)"}.get(e.get("completed"), "?"),
            "cells_run": e.get("cells_run", "?"),
            "cells_reused": e.get("cells_reused", "?"),
            "pretrainings": ", ".join(
                f"{p.get('label', '?')} ({fmt(p.get('seconds'), 0)} s)" for p in e.get("pretrainings") or []
            ),
        }
        for e in run.run_log
    ]
    return {
        "study": study_text,
        "validation": validation(run),
        "protocols": protocols(run),
        "versions": versions,
        "versions_source": versions_source,
        "hardware": [yaml.safe_dump(h, sort_keys=False, default_flow_style=False) for h in distinct_hw],
        "total_seconds": float(np.sum(finite(seconds))) if run.run_log else None,
        "cell_seconds": float(np.sum(finite(r.get("seconds") for r in run.rows))),
        "invocations": invocations,
    }


def planned_cells(study: Any) -> int | None:
    """datasets × inits × protocols × budgets × seeds of study.json (the runner's own count); None when the
    file is missing or shaped otherwise. `seeds` is a count; budgets are fraction and shot lists."""
    if not isinstance(study, dict):
        return None
    budgets, seeds = study.get("budgets"), study.get("seeds")
    if isinstance(budgets, dict):
        n_budgets = len(budgets.get("fractions") or []) + len(budgets.get("shots") or [])
        ratios = budgets.get("imbalance")  # a list of ratios is one budget per ratio
        n_budgets *= len(ratios) if isinstance(ratios, list) and ratios else 1
    elif isinstance(budgets, list):
        n_budgets = len(budgets)
    else:
        return None
    n_seeds = len(seeds) if isinstance(seeds, list) else seeds
    lists = [study.get(k) for k in ("datasets", "inits", "protocols")]
    if not isinstance(n_seeds, int) or not all(isinstance(v, list) for v in lists):
        return None
    datasets, inits, protocols = lists
    mitigations = study.get("mitigations") or []
    # Protocols that take a mitigation run once per mitigation of the study's grid (mitigations.mitigation_grid).
    per_init = sum(len(mitigations) if mitigations and _takes_mitigation(p) else 1 for p in protocols)  # type: ignore
    return len(datasets) * len(inits) * per_init * n_budgets * n_seeds  # type: ignore[arg-type]


def _takes_mitigation(protocol: str) -> bool:
    from medpretrain.mitigations import takes_mitigation
    from medpretrain.protocols import PROTOCOLS

    return protocol in PROTOCOLS and takes_mitigation(protocol)


def _span(values: list[int]) -> str:
    values = sorted(values)
    if not values:
        return "not recorded"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]} (median {int(np.median(values))})"


def protocols(run: Run) -> list[str]:
    """How each protocol treated the initialisations, read from the rows, and what still differs between them.

    Equal treatment is the claim a comparison rests on, so the report states it from what the cells recorded
    (their parameters, steps and flips), not from today's defaults; what is not equal is said outright.
    """
    from medpretrain.train import FinetuneConfig

    sentences = []
    by_protocol: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in run.rows:
        by_protocol[r["protocol"]].append(r)
    tuned = by_protocol.get("finetune", [])
    if tuned:
        stepped = [r for r in tuned if r.get("steps") is not None]
        if stepped:
            params = (stepped[0].get("config") or {}).get("params") or {}
            cfg = FinetuneConfig(**{k: v for k, v in params.items() if k in FinetuneConfig.model_fields})
            grid = ", ".join(f"{lr:g}" for lr in cfg.lr)
            rates = (
                f"the same learning-rate grid ({grid}, chosen on validation)"
                if len(cfg.lr) > 1
                else f"one learning rate ({grid}, not tuned)"
            )
            stopping = (
                f"stopped after {cfg.patience} validations without a better validation AUC"
                if cfg.patience
                else "without early stopping"
            )
            sentences.append(
                f"Fine-tuning: every initialisation trained with the same schedule and {rates}, at least "
                f"{cfg.min_steps} optimiser steps or {cfg.epochs} epochs, whichever is longer, {stopping}; the "
                f"weights of the best of {cfg.evals} validations are kept "
                f"(steps taken: {_span([int(r['steps']) for r in stepped])})."
                + (
                    f" Pre-trained backbones learn at {cfg.pretrained_backbone_lr_scale:g}× the head's rate."
                    if cfg.pretrained_backbone_lr_scale != 1
                    else ""
                )
            )
        if len(stepped) < len(tuned):
            sentences.append(
                f"{len(tuned) - len(stepped)} fine-tuning cells come from the older epoch-based protocol (a fixed "
                "number of epochs, so few optimiser steps at small budgets): they under-train small budgets."
            )
    frozen = [r for p, rows in by_protocol.items() if p != "finetune" for r in rows]
    if frozen:
        adapted = {bool(((r.get("config") or {}).get("params") or {}).get("bn_adapt")) for r in frozen}
        if adapted == {True}:
            sentences.append(
                "Frozen features: BatchNorm statistics were re-estimated on the training images for every "
                "initialisation alike (bn_adapt)."
            )
        else:
            sentences.append(
                "Frozen features: each initialisation keeps its own BatchNorm statistics (bn_adapt off"
                + (" for some cells" if adapted == {True, False} else "")
                + "); a network pre-trained on other images normalises these ones with foreign statistics."
                + (
                    " SparK alone re-estimates its statistics after pre-training, because its masked training "
                    "corrupted them; that restores a dense network and adapts nothing else."
                    if any("spark" in str(r.get("init", "")).lower() for r in frozen)
                    else ""
                )
            )
    study = run.study if isinstance(run.study, dict) else {}
    flips = {}
    for r in run.rows:
        flip = (r.get("augmentation") or {}).get("hflip")
        if flip is not None:
            flips.setdefault(r["dataset"], set()).add(float(flip))
    for dataset, values in flips.items():
        # The reason holds only for the data's own policy; a study that set `hflip` chose it itself.
        reason = " (off: its class names mark left/right)" if study.get("hflip") is None else " (set by the study)"
        off = reason if values == {0.0} else ""
        sentences.append(f"Horizontal flips on {dataset}: p = {_counts(values)}{off}, in fine-tuning and pre-training.")
    norms = {str((r.get("config") or {}).get("input_norm", "imagenet")) for r in run.rows}
    if norms - {"imagenet"}:
        sentences.append(
            "Input normalisation (for every initialisation alike): "
            + ", ".join(INPUT_NORM_TEXT.get(n, n) for n in sorted(norms))
            + "; a network pre-trained with ImageNet's statistics sees other inputs than it was trained on."
        )
    if any(isinstance(i, dict) for i in study.get("inits") or []) and int(study.get("pretrain_seeds") or 1) == 1:
        sentences.append(
            "Each self-supervised method was pre-trained once (pretrain_seeds: 1), so its intervals do not include "
            "pre-training variance; the seeds vary the labelled subset, the head and fine-tuning only."
        )
    return sentences
