"""Reproduce the MedMNIST v2 ResNet-18 (28) baselines with the tool's own `medmnist-v2` preset.

The recipe is the preset (`medpretrain run --preset medmnist-v2`), not a training script of its own: this bench
only narrows it to the datasets asked for (and, where a CPU cannot run 100 epochs, fewer epochs with the
milestones kept at 50% and 75% of training), runs it through the study runner (resumable: a finished dataset is
not trained again), and prints one JSON line per dataset beside the published figures of Yang et al.,
"MedMNIST v2", Scientific Data 10:41 (2023), Table 3 (ResNet-18 (28) row).

    python bench/reproduce_medmnist_v2.py --dataset retinamnist --dataset pneumoniamnist
    python bench/reproduce_medmnist_v2.py --dataset bloodmnist --epochs 10 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medpretrain.runner import run_study
from medpretrain.study import load_study

# Published test AUC / ACC of ResNet-18 (28), MedMNIST v2 Table 3.
PUBLISHED: dict[str, tuple[float, float]] = {
    "pathmnist": (0.983, 0.907),
    "chestmnist": (0.768, 0.947),
    "dermamnist": (0.917, 0.735),
    "octmnist": (0.943, 0.743),
    "pneumoniamnist": (0.944, 0.854),
    "retinamnist": (0.717, 0.524),
    "breastmnist": (0.901, 0.863),
    "bloodmnist": (0.998, 0.958),
    "tissuemnist": (0.930, 0.676),
    "organamnist": (0.997, 0.935),
    "organcmnist": (0.992, 0.900),
    "organsmnist": (0.972, 0.782),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", default=None, help="MedMNIST flag; repeatable (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="fewer than the paper's 100 (slow CPUs)")
    parser.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed (CPUs with AMX) or 16-mixed")
    parser.add_argument("--out", type=Path, default=Path("runs/medmnist-v2"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    base = load_study(preset="medmnist-v2")
    datasets = args.dataset or base.dataset_specs
    unknown = [d for d in datasets if d not in PUBLISHED]
    if unknown:
        parser.error(f"no published ResNet-18 (28) figures for {unknown}; choose from {', '.join(PUBLISHED)}")
    finetune = {**base.finetune, "precision": args.precision}
    if args.epochs is not None:
        finetune.update(epochs=args.epochs, evals=args.epochs)
    for dataset in datasets:
        study = base.model_copy(update={"datasets": [dataset], "finetune": finetune, "name": f"medmnist-v2-{dataset}"})
        started = time.perf_counter()
        result = run_study(study, args.out / dataset, progress=args.progress, log=lambda _: None)
        (row,) = result.rows
        published_auc, published_acc = PUBLISHED[dataset]
        print(
            json.dumps(
                {
                    "dataset": dataset,
                    "auc": round(row["auc"], 4),
                    "acc": round(row["acc"], 4),
                    "published_auc": published_auc,
                    "published_acc": published_acc,
                    "auc_diff": round(row["auc"] - published_auc, 4),
                    "acc_diff": round(row["acc"] - published_acc, 4),
                    "epochs": finetune["epochs"],
                    "best_epoch": row["chosen"]["epoch"],
                    "precision": args.precision,
                    # The cell's own training time when it ran now, else the time it took when it was stored.
                    "seconds": round(row["seconds"] if result.cells_reused else time.perf_counter() - started, 1),
                    # Training and validation time summed over the kept history: across every process when the
                    # cell was killed and resumed (mid-training resume), where `seconds` is the last one's only.
                    "train_seconds": round(sum(h["seconds"] for h in row["history"]), 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
