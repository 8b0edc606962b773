"""The recommendation's wording, on synthetic records: no run directory, no store, no predictions.

`report.recommend` is a pure function of per-arm records and the Holm-adjusted tests, so every branch of its
wording is pinned here with hand-made numbers: a significant win is named with its Δ and adjusted p, a
non-significant difference never claims equivalence and names the cheaper option with its reason, and a budget
where nothing is significant says what the design could have detected.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from medpretrain.report import recommend
from medpretrain.report.recommend import cheaper
from medpretrain.stats import Estimate

DATASET = "toymnist"


def record(arm: str, init_kind: str, *, protocol: str = "finetune", budget: str = "0.1", **kw: Any) -> dict[str, Any]:
    """One (dataset, protocol, budget, arm) record with the keys the recommendation reads."""
    fraction = float(budget)
    return {
        "dataset": DATASET,
        "protocol": protocol,
        "budget": budget,
        "arm": arm,
        "init_kind": init_kind,
        "image_size": 28,
        "n_labeled": 1000 * fraction,
        "fraction": fraction,
        "shots": None,
        "imbalance": None,
        "auc_mean": 0.80,
        "val_auc_mean": 0.80,
        "n_classes": 2,
        "n_test": 400,
        **kw,
    }


def estimate(delta: float, p: float, *, n_seeds: int = 3, seed_var: float = 4e-4, test_var: float = 1e-4) -> Estimate:
    return Estimate(
        delta=delta,
        low=delta - 0.03,
        high=delta + 0.03,
        p=p,
        method="seed+test-set t (Welch–Satterthwaite)",
        metric="auc",
        n_seeds=n_seeds,
        n_boot=1000,
        seed_var=seed_var,
        test_var=test_var,
        df=float(n_seeds - 1),
    )


def comparison(best: dict[str, Any], other: dict[str, Any], test: Estimate | None, p_adj: float) -> dict[str, Any]:
    return {
        "dataset": best["dataset"],
        "protocol": best["protocol"],
        "budget": best["budget"],
        "best": best,
        "other": other,
        "roles": ["runner-up"],
        "test": test,
        "p_adj": p_adj,
        "significant": bool(math.isfinite(p_adj) and p_adj < 0.05),
    }


def only_sentence(records: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    (block,) = recommend(records, comparisons)
    assert block["dataset"] == DATASET
    (sentence,) = block["sentences"]
    return sentence


def test_a_significant_win_is_named_with_delta_and_adjusted_p() -> None:
    ssl = record("simclr", "pretrained", val_auc_mean=0.91, auc_mean=0.88)
    imagenet = record("ImageNet", "imagenet", val_auc_mean=0.85, auc_mean=0.83)
    test = estimate(0.05, 0.0012)
    sentence = only_sentence([imagenet, ssl], [comparison(ssl, imagenet, test, 0.0036)])
    text = sentence["text"]
    assert text.startswith("With about 50 labels per class (10% of the training labels, 100 labeled images)")
    assert "use simclr (finetune, best on validation): +0.050 test AUC over ImageNet transfer" in text
    assert "95% interval +0.020 to +0.080; p = 0.0012, Holm-adjusted p = 0.0036" in text
    assert "cannot separate" not in text and "cheaper" not in text
    assert sentence["best"] == "simclr" and sentence["significant"] is True


def test_a_significant_loss_reverses_the_validation_ranking() -> None:
    ssl = record("simclr", "pretrained", val_auc_mean=0.91)
    imagenet = record("ImageNet", "imagenet", val_auc_mean=0.85)
    sentence = only_sentence([ssl, imagenet], [comparison(ssl, imagenet, estimate(-0.04, 0.001), 0.002)])
    assert (
        "use ImageNet transfer (finetune): on test it beats simclr (finetune, best on validation) by +0.040 AUC"
        in (sentence["text"])
    )
    assert "the validation ranking did not hold" in sentence["text"]
    assert sentence["best"] == "ImageNet" and sentence["significant"] is True


def test_no_significant_difference_claims_no_equivalence_and_names_the_cheaper_option() -> None:
    ssl = record("simclr", "pretrained", val_auc_mean=0.90, auc_mean=0.861)
    imagenet = record("ImageNet", "imagenet", val_auc_mean=0.88, auc_mean=0.852)
    text = only_sentence([ssl, imagenet], [comparison(ssl, imagenet, estimate(0.009, 0.21), 0.42)])["text"]
    assert "simclr (finetune, best on validation), test AUC 0.861, and ImageNet transfer, 0.852" in text
    assert (
        "no significant difference (+0.009 AUC, 95% interval -0.021 to +0.039; p = 0.21, Holm-adjusted p = 0.42)"
        in (text)
    )
    assert "ImageNet transfer is the cheaper: it needs no self-supervised pre-training of your own." in text
    # Failing to reject is not equivalence: the word appears only in the sentence that says so.
    assert "indistinguishable" not in text
    assert "That is not evidence that they are equivalent." in text
    rest = text.replace("not evidence that they are equivalent", "").lower()
    assert "equivalen" not in rest and "indistinguishable" not in rest and "same performance" not in rest


def test_nothing_significant_at_a_budget_says_what_the_design_could_detect() -> None:
    ssl = record("simclr", "pretrained", val_auc_mean=0.90)
    imagenet = record("ImageNet", "imagenet", val_auc_mean=0.88)
    test = estimate(0.009, 0.21, n_seeds=3, seed_var=4e-4, test_var=1e-4)  # seeds dominate the variance
    text = only_sentence([ssl, imagenet], [comparison(ssl, imagenet, test, 0.42)])["text"]
    assert "At this budget the study cannot separate the initialisations: none of its 1 test is significant" in text
    assert f"With 3 seeds and 400 test images it detects AUC differences of about {test.detectable():.3f}" in text
    assert "(80% power, α = 0.05); more seeds would make smaller ones detectable (the seed-to-seed variance" in text
    # The same test with the test set dominating asks for a larger test set instead.
    noisy = estimate(0.009, 0.21, n_seeds=3, seed_var=1e-5, test_var=1e-3)
    text = only_sentence([ssl, imagenet], [comparison(ssl, imagenet, noisy, 0.42)])["text"]
    assert "a larger test set would make smaller ones detectable (the test-set variance" in text
    assert f"about {noisy.detectable():.3f}" in text and noisy.detectable() != pytest.approx(test.detectable())


def test_a_significant_test_under_another_protocol_means_the_budget_is_separated() -> None:
    ft_best = record("simclr", "pretrained", val_auc_mean=0.90)
    ft_other = record("ImageNet", "imagenet", val_auc_mean=0.88)
    lin_best = record("simclr", "pretrained", protocol="linear", val_auc_mean=0.87)
    lin_other = record("ImageNet", "imagenet", protocol="linear", val_auc_mean=0.80)
    family = [
        comparison(ft_best, ft_other, estimate(0.01, 0.3), 0.3),
        comparison(lin_best, lin_other, estimate(0.06, 0.001), 0.002),
    ]
    sentence = only_sentence([ft_best, ft_other, lin_best, lin_other], family)
    assert "no significant difference" in sentence["text"] and "(finetune, best on validation)" in sentence["text"]
    assert "cannot separate" not in sentence["text"]
    assert sentence["significant"] is False


def test_the_best_is_chosen_on_validation_never_on_test() -> None:
    on_val = record("simclr", "pretrained", val_auc_mean=0.90, auc_mean=0.70)
    on_test = record("ImageNet", "imagenet", val_auc_mean=0.80, auc_mean=0.95)
    sentence = only_sentence([on_test, on_val], [comparison(on_val, on_test, estimate(-0.25, 0.2), 0.2)])
    assert "simclr (finetune, best on validation)" in sentence["text"] and sentence["best"] == "simclr"


def test_a_tie_on_validation_goes_to_the_cheaper_protocol() -> None:
    ft = record("ImageNet", "imagenet", protocol="finetune", val_auc_mean=0.85)
    knn = record("ImageNet", "imagenet", protocol="knn", val_auc_mean=0.85)
    sentence = only_sentence([ft, knn], [])
    assert "ImageNet transfer (knn, best on validation) reaches test AUC 0.800" in sentence["text"]
    assert "nothing to compare" in sentence["text"] and sentence["significant"] is None


def test_no_test_without_shared_predictions() -> None:
    ssl = record("simclr", "pretrained", val_auc_mean=0.90, auc_mean=0.84)
    scratch = record("scratch", "scratch", val_auc_mean=0.70, auc_mean=0.71)
    sentence = only_sentence([ssl, scratch], [comparison(ssl, scratch, None, math.nan)])
    assert "scores +0.130 test AUC against training from scratch" in sentence["text"]
    assert "no seed has predictions of both, so there is no test" in sentence["text"]
    assert sentence["significant"] is None


def test_cost_model_reasons() -> None:
    small = record("ImageNet", "imagenet", image_size=28)
    large = record("ImageNet (64 px)", "imagenet", image_size=64)
    assert cheaper(large, small) == (
        "ImageNet transfer is the cheaper: it runs at 28 px instead of 64 px, about 5.2× less compute per image."
    )
    linear = record("scratch", "scratch", protocol="linear")
    finetune = record("ImageNet", "imagenet", protocol="finetune")
    assert (
        cheaper(finetune, linear) == "Training from scratch (linear) is the cheaper: a linear probe trains no network."
    )
    ckpt = record("ckpt:mine", "checkpoint")
    assert cheaper(ckpt, record("scratch", "scratch")) == "Both cost about the same to obtain and run."
    assert cheaper(record("dino", "pretrained"), ckpt).startswith(
        "ckpt:mine is the cheaper: it needs no self-supervised"
    )


def test_budgets_keep_their_order_and_inputs_are_not_modified() -> None:
    few = record("ImageNet", "imagenet", budget="0.01", shots=None)
    many = record("ImageNet", "imagenet", budget="1")
    shots = record("ImageNet", "imagenet", budget="5", fraction=None, shots=5, imbalance=10.0, n_labeled=10)
    records = [few, many, shots]
    before = copy.deepcopy(records)
    (block,) = recommend(records, [])
    texts = [s["text"] for s in block["sentences"]]
    assert texts[0].startswith("With about 5 labels per class (1% of the training labels, 10 labeled images)")
    assert texts[1].startswith("With about 500 labels per class (100% of the training labels, 1000 labeled images)")
    assert texts[2].startswith(
        "With about 5 labels per class (5 labeled images per class, classes 10:1 imbalanced, 10 labeled images)"
    )
    assert records == before
    # A budget without any validation result has nothing to rank: no sentence rather than a guess.
    (block,) = recommend([record("scratch", "scratch", val_auc_mean=math.nan)], [])
    assert block == {"dataset": DATASET, "sentences": []}
