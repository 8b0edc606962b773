"""Pre-train each method, then linear-probe it beside the random-weight (scratch) baseline.

Prints one JSON line per init with the test accuracy/AUC (mean over seeds) at each label fraction, the
pre-training time and images/s, and for each method its accuracy (points) and AUC gains over scratch at each
fraction with the report's test, `stats.paired_comparison` (95% interval and p from the seed-to-seed variation and
the shared test-set bootstrap).
Usage (issue acceptance: 1 epoch for every method; 30 epochs for quality):
    python bench/ssl_linear.py --dataset bloodmnist --epochs 1 --methods simclr moco byol simsiam swav dino \
        barlow_twins vicreg spark vae mae --fractions 0.01 --seeds 3 --out runs/bench-ssl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import medpretrain.ssl  # noqa: F401  (registers the methods)
from medpretrain.cli_support import parse_hparams
from medpretrain.data import load_dataset
from medpretrain.pretrain import PretrainRequest, pretrain
from medpretrain.runner import run_study
from medpretrain.stats import paired_comparison
from medpretrain.store import Store
from medpretrain.study import validate_study

# Settings a method needs at 28 px: SparK a feature grid larger than 1×1, MAE a ViT with 4-px patches.
SETTINGS = {"spark": ("resnet18", True), "mae": ("vit_tiny", True)}


def probe(init: str, backbone: str, small_stem: bool, args: argparse.Namespace, store: Store) -> list[dict]:
    """The linear probe of one init, through the tool's own planner and runner (stored cells are reused)."""
    study = validate_study(
        {
            "datasets": [args.dataset],
            "image_size": args.image_size,
            "backbone": backbone,
            "small_stem": small_stem,
            "inits": [init],
            "protocols": ["linear"],
            "budgets": {"fractions": list(args.fractions)},
            "seeds": args.seeds,
        },
        "bench",
    )
    return run_study(study, store.out_dir, progress=False, log=lambda _: None).rows


def mean_metrics(rows: list[dict], args: argparse.Namespace) -> dict:
    out = {}
    for f in args.fractions:
        chosen = [r for r in rows if r["fraction"] == f]
        out[f"acc@{f:g}"] = round(float(np.mean([r["acc"] for r in chosen])), 4)
        out[f"auc@{f:g}"] = round(float(np.mean([r["auc"] for r in chosen])), 4)
    return out


def paired_gains(
    rows: list[dict], baseline: list[dict], y: np.ndarray, task: str, args: argparse.Namespace, store: Store
) -> dict:
    """Gain over the baseline per fraction in test accuracy (points) and AUC: [mean, 95% low, high] and p from
    the report's test (`stats.paired_comparison`: seed s of the method paired with seed s of the baseline)."""
    out = {}
    for f in args.fractions:
        seeds = range(args.seeds)
        (a, b) = (
            np.stack([store.predictions(next(r for r in arm if r["fraction"] == f and r["seed"] == s)["cell_key"])
                      for s in seeds])
            for arm in (rows, baseline)
        )  # fmt: skip
        for metric, scale in (("acc", 100), ("auc", 1)):
            test = paired_comparison(y, a, b, task=task, metric=metric)
            out[f"{metric}_gain@{f:g}"] = [round(scale * v, 4) for v in (test.delta, test.low, test.high)]
            out[f"{metric}_gain_p@{f:g}"] = round(test.p, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="bloodmnist")
    parser.add_argument("--methods", nargs="+", default=["simclr"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--small-stem", action="store_true", help="ResNet small stem for every method")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed or 16-mixed")
    parser.add_argument("--hp", nargs="*", default=[], help="method hyper-parameters as key=value")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ssl"))
    args = parser.parse_args()
    store = Store(args.out / "eval")
    test_split = load_dataset(args.dataset)
    baselines = {}
    for method in args.methods:
        backbone, small_stem = SETTINGS.get(method, ("resnet18", args.small_stem))
        if (backbone, small_stem) not in baselines:
            baselines[backbone, small_stem] = probe("scratch", backbone, small_stem, args, store)
            print(json.dumps({"init": "scratch", "backbone": backbone, "small_stem": small_stem,
                              **mean_metrics(baselines[backbone, small_stem], args)}), flush=True)  # fmt: skip
        hparams = parse_hparams(args.hp)
        if args.batch_size:
            hparams["batch_size"] = args.batch_size
        request = PretrainRequest(
            dataset=args.dataset, method=method, backbone=backbone, epochs=args.epochs,
            image_size=args.image_size, small_stem=small_stem, hparams=hparams, precision=args.precision,
        )  # fmt: skip
        started = time.perf_counter()
        checkpoint = pretrain(request, args.out / "ssl", resume=True, progress=False, log=lambda _: None)
        history = torch.load(checkpoint, map_location="cpu", weights_only=False)["history"]
        rows = probe(str(checkpoint), backbone, small_stem, args, store)
        record = {
            "init": method,
            "backbone": backbone,
            "small_stem": small_stem,
            "epochs": args.epochs,
            "pretrain_seconds": round(time.perf_counter() - started, 1),
            "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1),
            "final_loss": round(history[-1]["loss"], 4),
            "embedding_std": round(history[-1]["embedding_std"], 4),
            **mean_metrics(rows, args),
            **paired_gains(
                rows, baselines[backbone, small_stem], test_split.labels["test"], test_split.task, args, store
            ),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
