"""The recommendation: per data set and budget, which initialisation and protocol to use, in one sentence.

A pure function of values the run has already computed (run.py): per-arm records (means over seeds, mean
validation AUC, init kind, image size, protocol, budget) and the Holm-adjusted tests of the report's family.
It reads no file and touches no store, so its wording is tested on synthetic records (tests/test_recommend.py).

The wording follows the evidence: a significant win is named with its Δ and adjusted p; no significant
difference is never called "equivalent" (a test that fails to reject shows no such thing) and names the
cheaper option by the cost model below; a budget where nothing is significant says what the design could
have detected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medpretrain.protocols import PROTOCOLS, protocol_cost
from medpretrain.report.text import about, fmt
from medpretrain.stats import ALPHA, Estimate, format_p

# The cost model. What it costs to obtain an init: only a self-supervised pre-training of your own costs compute
# before evaluation (ImageNet weights are downloaded; a checkpoint you brought, timm:<model> weights included,
# exists; the noise control is generated).
# A fusion (dvme, concat) needs every one of its sources, so it costs more than any single init.
INIT_COST = {"scratch": 0, "imagenet": 0, "checkpoint": 0, "noise": 0, "pretrained": 1, "fusion": 2}
# What a protocol costs to run is the protocol's own attribute (`Protocol.cost`, `cost_reason`): kNN fits nothing,
# a linear probe fits a head on frozen features, fine-tuning trains the whole network. Compute per image also
# grows with the image size (pixels).
INIT_PHRASES = {"ImageNet": "ImageNet transfer", "scratch": "training from scratch"}

Record = Mapping[str, Any]


def _sort_value(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _budget_phrase(rec: Record) -> str:
    if rec.get("fraction") is not None:
        text = f"{rec['fraction'] * 100:g}% of the training labels"
    else:
        text = f"{rec['shots']} labeled images per class"
    # Exactly r:1 between the most and the least frequent class (budgets.allocate), not "at most".
    return text + (f", classes {rec['imbalance']:g}:1 imbalanced" if rec.get("imbalance") else "")


def _phrase(arm: str) -> str:
    return INIT_PHRASES.get(arm, arm)


SAME_COST = "Both cost about the same to obtain and run."


def cheaper(a: Record, b: Record) -> str:
    """The cost model in one sentence: which of two records is cheaper to obtain and run, and why."""
    sentence = _cheaper(a, b)
    # Prose phrases ("training from scratch") start the sentence capitalised; init names ("ckpt:mine") stay as typed.
    if any(sentence.startswith(phrase) for phrase in INIT_PHRASES.values()):
        return sentence[:1].upper() + sentence[1:]
    return sentence


def _cheaper(a: Record, b: Record) -> str:
    cost_a, cost_b = INIT_COST.get(a["init_kind"], 1), INIT_COST.get(b["init_kind"], 1)
    if cost_a != cost_b:
        cheap, dear = (a, b) if cost_a < cost_b else (b, a)
        if dear["init_kind"] == "fusion":
            return f"{_phrase(cheap['arm'])} is the cheaper: it needs one initialisation, not every source of a fusion."
        return f"{_phrase(cheap['arm'])} is the cheaper: it needs no self-supervised pre-training of your own."
    if a["image_size"] != b["image_size"]:
        cheap, dear = (a, b) if a["image_size"] < b["image_size"] else (b, a)
        ratio = (dear["image_size"] / cheap["image_size"]) ** 2
        return (
            f"{_phrase(cheap['arm'])} is the cheaper: it runs at {cheap['image_size']} px instead of "
            f"{dear['image_size']} px, about {about(ratio)}× less compute per image."
        )
    cost_a, cost_b = protocol_cost(a["protocol"]), protocol_cost(b["protocol"])
    if cost_a != cost_b:
        cheap = a if cost_a < cost_b else b
        reason = PROTOCOLS[cheap["protocol"]].cost_reason
        return f"{_phrase(cheap['arm'])} ({cheap['protocol']}) is the cheaper: {reason}."
    return SAME_COST


def _p_pair(test: Estimate, p_adj: float) -> str:
    floor = test.n_boot if test.n_seeds == 1 else None
    return f"{format_p(test.p, floor)}, Holm-adjusted {format_p(p_adj, floor)}"


def _reference(best: Record, same: Sequence[Record]) -> Record | None:
    """What the best is measured against: ImageNet transfer, else training from scratch, else the runner-up."""
    others = [r for r in same if r is not best]
    for kind in ("imagenet", "scratch"):
        found = next((r for r in others if r["init_kind"] == kind), None)
        if found is not None:
            return found
    return others[0] if others else None


def _cannot_separate(n_tests: int, test: Estimate, n_test: int) -> str:
    """The sentence's tail for a budget at which no test of the family is significant after adjustment."""
    remedy, part = ("more seeds", "seed-to-seed") if test.limited_by == "seeds" else ("a larger test set", "test-set")
    return (
        f" At this budget the study cannot separate the initialisations: none of its {n_tests} test"
        f"{'s' if n_tests != 1 else ''} is significant after Holm adjustment. With {test.n_seeds} "
        f"seed{'s' if test.n_seeds != 1 else ''} and {n_test} test images it detects AUC differences of about "
        f"{test.detectable():.3f} (80% power, α = {ALPHA:g}); {remedy} would make smaller ones detectable (the "
        f"{part} variance is the larger part of the uncertainty)."
    )


def _sentence(best: Record, recs: Sequence[Record], comparisons: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The sentence of one (data set, budget) whose best record on validation is `best`."""
    protocol = best["protocol"]
    per_class = about(best["n_labeled"] / max(int(best["n_classes"]), 1))
    lead = (
        f"With about {per_class} label{'' if per_class == '1' else 's'} per class ({_budget_phrase(best)}, "
        f"{best['n_labeled']:.0f} labeled images)"
    )
    name = f"{_phrase(best['arm'])} ({protocol}, best on validation)"
    reference = _reference(best, [r for r in recs if r["protocol"] == protocol])
    if reference is None and best["init_kind"] == "fusion":
        # A fusion is measured against what it combines: of its tested alternatives (concat, each source alone),
        # the one best on validation.
        own = [e["other"] for e in comparisons if e["best"] is best]
        reference = max(own, key=lambda r: _sort_value(r["val_auc_mean"]), default=None)
    if reference is None:
        text = (
            f"{lead}, {name} reaches test AUC {fmt(best['auc_mean'])}; no other initialisation was "
            "evaluated with this protocol, so there is nothing to compare."
        )
        return {"text": text, "best": best["arm"], "significant": None}
    pair = (best["dataset"], protocol, best["budget"], best["arm"], reference["arm"])
    entry = next((e for e in comparisons if _pair(e) == pair), None)
    ref = _phrase(reference["arm"])
    test = entry["test"] if entry else None
    if entry is None or test is None or not math.isfinite(test.p):
        text = (
            f"{lead}, {name} scores {best['auc_mean'] - reference['auc_mean']:+.3f} test AUC against {ref}, "
            "but no seed has predictions of both, so there is no test."
        )
        return {"text": text, "best": best["arm"], "significant": None}
    interval = f"95% interval {test.low:+.3f} to {test.high:+.3f}; {_p_pair(test, entry['p_adj'])}"
    chosen = best["arm"]
    if entry["significant"] and test.delta > 0:
        text = f"{lead}, use {name}: {test.delta:+.3f} test AUC over {ref} ({interval})."
    elif entry["significant"]:
        chosen = reference["arm"]
        text = (
            f"{lead}, use {ref} ({protocol}): on test it beats {name} by {-test.delta:+.3f} AUC "
            f"({interval}), so the validation ranking did not hold."
        )
    else:
        text = (
            f"{lead}, {name}, test AUC {fmt(best['auc_mean'])}, and {ref}, {fmt(reference['auc_mean'])}: "
            f"no significant difference ({test.delta:+.3f} AUC, {interval}). That is not evidence that they "
            f"are equivalent. {cheaper(best, reference)}"
        )
    # Every protocol's tests at this budget count: the initialisations are "not separated" only if none is.
    at_budget = [e for e in comparisons if (e["dataset"], e["budget"]) == (best["dataset"], best["budget"])]
    if not any(e["significant"] for e in at_budget):
        text += _cannot_separate(len(at_budget), test, int(best["n_test"]))
    return {"text": text, "best": chosen, "significant": entry["significant"]}


def _pair(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return (entry["dataset"], entry["protocol"], entry["budget"], entry["best"]["arm"], entry["other"]["arm"])


def recommend(records: Iterable[Record], comparisons: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per data set, one sentence per budget: the best (init, protocol) on validation, tested against a reference
    under the same protocol, worded from the Holm-adjusted p-value and the cost model.

    `records`: one per (dataset, protocol, budget, arm) with `dataset, protocol, budget, arm, init_kind,
    image_size, n_labeled, fraction, shots, imbalance, auc_mean, val_auc_mean, n_classes, n_test`. Data sets and
    budgets keep their first-appearance order (give budgets fewest labels first); within a budget the best mean
    validation AUC ranks first (the test split never chooses), then the cheaper protocol, then the given order.
    `comparisons`: the Holm-adjusted family (`dataset, protocol, budget, best, other` records, `test` an
    `Estimate` or None, `p_adj`, `significant`). Returns `[{"dataset", "sentences": [{"text", "best",
    "significant"}]}]`.
    """
    groups: dict[str, dict[str, list[Record]]] = {}
    for rec in records:
        groups.setdefault(rec["dataset"], {}).setdefault(rec["budget"], []).append(rec)
    out = []
    for dataset, budgets in groups.items():
        sentences = []
        for recs in budgets.values():
            ranked = sorted(
                (r for r in recs if math.isfinite(r["val_auc_mean"])),
                key=lambda r: (-_sort_value(r["val_auc_mean"]), protocol_cost(r["protocol"])),
            )
            if ranked:
                sentences.append(_sentence(ranked[0], ranked, comparisons))
        out.append({"dataset": dataset, "sentences": sentences})
    return out
