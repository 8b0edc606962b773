"""The `medpretrain` command line. The only place that turns MedpretrainError into a one-line message."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from medpretrain.cli_export import export_command
from medpretrain.cli_support import parse_hparams
from medpretrain.errors import MedpretrainError

app = typer.Typer(
    help="ImageNet transfer vs self-supervised pre-training for medical imaging, compared at every label budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Logs and CI capture output without a terminal; the summary table needs more than the default 80 columns.
# markup=False: what we print is full of brackets that rich would take for style tags and delete — subset
# specs (`pneumoniamnist[train=200]`), extras (`medpretrain[ray]`), paths, hyper-parameter lists — and that
# includes table cells built elsewhere (summary.py). Styles are opted into per call, with the text escaped.
console = Console(width=None if sys.stdout.isatty() else 160, markup=False)
err_console = Console(stderr=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(command: F) -> F:
    """Expected failures print one line on stderr and exit with code 2; bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MedpretrainError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True, highlight=False, markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished cells are kept in the results store; re-run to continue")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def log(message: str) -> None:
    """Progress messages from the library, on stderr, printed literally (they carry specs and paths) and
    unwrapped, so one message stays one line for grep and logs."""
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)


@app.command()
@handle_errors
def datasets(
    size: Annotated[int, typer.Option(help="MedMNIST image size to look for: 28, 64, 128 or 224.")] = 28,
) -> None:
    """List every known dataset: available here or not, where it was looked for, images per split, task."""
    from medpretrain.cli_support import datasets_table

    console.print(datasets_table(size))
    console.print(
        "A folder (one sub-folder per class) or a CSV manifest (path,label[,split]) is accepted as --dataset too."
    )


@app.command()
@handle_errors
def evaluate(
    dataset: Annotated[
        str, typer.Option(help="MedMNIST flag (see `medpretrain datasets`), image folder or CSV manifest.")
    ],
    init: Annotated[
        list[str], typer.Option(help="scratch, imagenet, noise (the control), timm:MODEL or a checkpoint. Repeatable.")
    ] = ["scratch"],  # noqa: B006  (typer reads list defaults this way)
    backbone: Annotated[str, typer.Option(help="resnet18, resnet50, efficientnet_lite0, …")] = "resnet18",
    protocol: Annotated[
        list[str], typer.Option(help="linear, knn, finetune, or the fusions concat and dvme. Repeatable.")
    ] = ["linear"],  # noqa: B006
    source: Annotated[
        list[str],
        typer.Option(help="Fusion (dvme, concat): an init whose features it combines. Repeat; default: every --init."),
    ] = [],  # noqa: B006
    fraction: Annotated[list[float], typer.Option(help="Fraction of training labels, 0 < f ≤ 1. Repeatable.")] = [],  # noqa: B006
    shots: Annotated[list[int], typer.Option(help="Labeled images per class. Repeatable.")] = [],  # noqa: B006
    imbalance: Annotated[
        list[float], typer.Option(help="Exact most/least frequent class ratio of the labels (1: balanced). Repeatable.")
    ] = [],  # noqa: B006
    mitigation: Annotated[
        list[str], typer.Option(help="Linear/finetune: none, class_weighted, balanced_sampler, logit_adjustment.")
    ] = [],  # noqa: B006
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0 … N-1): subset draw, init and training.")] = 1,
    size: Annotated[int, typer.Option(help="Source resolution of MedMNIST files: 28, 64, 128 or 224.")] = 28,
    image_size: Annotated[
        int | None,
        typer.Option(help="Resolution the network sees. Default: native, 112 for ImageNet inits, a checkpoint's own."),
    ] = None,
    small_stem: Annotated[
        bool | None,
        typer.Option(
            "--small-stem/--standard-stem",
            help="ResNet 3×3 stem without max-pool for 28–64 px (≈7× slower on CPU). "
            "Default: a checkpoint's own, else standard.",
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Fine-tuning: at least this many epochs (default 10).")] = None,
    min_steps: Annotated[
        int | None, typer.Option(help="Fine-tuning: at least this many optimiser steps (default 500).")
    ] = None,
    lr: Annotated[
        list[float],
        typer.Option(help="Fine-tuning learning rate; repeat for a grid chosen on validation (default 1e-3, 1e-4)."),
    ] = [],  # noqa: B006
    batch_size: Annotated[int | None, typer.Option(help="Fine-tuning batch size (capped at the labels).")] = None,
    class_weighted: Annotated[bool, typer.Option(help="Class-weighted fine-tuning loss.")] = False,
    bn_adapt: Annotated[
        bool,
        typer.Option(help="Linear/kNN: re-estimate BatchNorm statistics on the training images, for every init."),
    ] = False,
    validation: Annotated[
        str,
        typer.Option(help="full: the whole validation split; matched: the budget's proportion of it (stratified)."),
    ] = "full",
    resize: Annotated[
        str,
        typer.Option(help="How images reach --image-size: bilinear, nearest (MedMNIST v2 224) or pad (MedMNIST+)."),
    ] = "bilinear",
    hflip: Annotated[
        float | None,
        typer.Option(help="Flip probability of training views. Default: 0.5, or 0 when class names mark left/right."),
    ] = None,
    input_norm: Annotated[
        str,
        typer.Option(help="Input normalisation of every network: imagenet (mean/std) or half ((x - 0.5) / 0.5)."),
    ] = "imagenet",
    out: Annotated[Path, typer.Option(help="Run directory: results.db, predictions, feature cache, splits.")] = Path(
        "runs/latest"
    ),
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the rows as a JSON list here.")] = None,
    executor: Annotated[str, typer.Option(help="local (in this process) or ray (one task per cell).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: a local Ray instance.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate initializations on a dataset at label budgets; results go to <out>/results.db.

    The options become a study (the same planner, cell keys and executors as `medpretrain run`), so
    `--executor ray` works here too and `medpretrain report <out>` reports the result.
    """
    from medpretrain.adhoc import evaluation_study
    from medpretrain.api import run as run_study
    from medpretrain.store import export_json
    from medpretrain.summary import print_summary

    # The same study as `mp.evaluate` (adhoc.py); everything checkable without data fails there, before any image.
    study = evaluation_study(
        dataset, init=init, backbone=backbone, protocol=protocol, source=source, fraction=fraction, shots=shots,
        imbalance=imbalance, mitigation=mitigation, seeds=seeds, size=size, image_size=image_size,
        small_stem=small_stem, epochs=epochs, min_steps=min_steps, lr=lr, batch_size=batch_size,
        class_weighted=class_weighted, bn_adapt=bn_adapt, validation=validation, resize=resize, hflip=hflip,
        input_norm=input_norm, executor=executor,
    )  # fmt: skip
    result = run_study(study, out, executor=executor, address=address, progress=progress, log=log).result
    print_summary(result.rows, console)
    console.print(f"results: {Path(out) / 'results.db'}")
    if json_path is not None:
        console.print(f"rows: {export_json(result.rows, json_path)}")


@app.command()
@handle_errors
def methods() -> None:
    """Every self-supervised pre-training method, one line each, with its default hyper-parameters."""
    from medpretrain.cli_support import methods_table

    console.print(methods_table())


@app.command()
@handle_errors
def pretrain(
    dataset: Annotated[str, typer.Option(help="Dataset whose training images are pre-trained on (labels unused).")],
    method: Annotated[str, typer.Option(help="Pre-training method (see `medpretrain methods`).")],
    backbone: Annotated[str, typer.Option(help="resnet18, resnet50, efficientnet_lite0, vit_tiny.")] = "resnet18",
    epochs: Annotated[int, typer.Option(min=1, help="Pre-training epochs.")] = 50,
    init: Annotated[
        str, typer.Option(help="Starting weights: scratch, imagenet (continued pre-training) or a checkpoint.")
    ] = "scratch",
    unlabeled_from: Annotated[
        str | None,
        typer.Option(help="Pre-train on another MedMNIST flag or image folder (labels not needed) than --dataset."),
    ] = None,
    size: Annotated[int, typer.Option(help="Source resolution of MedMNIST files: 28, 64, 128 or 224.")] = 28,
    image_size: Annotated[int | None, typer.Option(help="Resolution the network sees (default: native).")] = None,
    small_stem: Annotated[
        bool, typer.Option("--small-stem/--standard-stem", help="ResNet 3×3 stem without max-pool for 28–64 px.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the method's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate per 256 images (default: the method's).")] = None,
    hp: Annotated[list[str], typer.Option(help="Any method hyper-parameter as key=value. Repeatable.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed for weights, batches and views.")] = 0,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (mixed on GPU, fp32 on CPU), 32-true, bf16-mixed (also on CPUs with bf16 units) or 16-mixed."
        ),
    ] = "auto",
    hflip: Annotated[
        float | None,
        typer.Option(help="Flip probability of the views. Default: 0.5; 0 when --dataset's classes mark left/right."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for checkpoints and logs.")] = Path("runs/ssl"),
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same request.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard an interrupted run of the same request.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Self-supervised pre-training; prints the checkpoint path as the last line of stdout.

    The same request again reuses the finished checkpoint (files are named by a hash of the request).
    """
    from medpretrain.backbones import get_spec
    from medpretrain.data import check_spec
    from medpretrain.inits import parse_init
    from medpretrain.pretrain import PretrainRequest, target_hflip
    from medpretrain.pretrain import pretrain as run_pretraining
    from medpretrain.ssl import method_config

    # Everything checkable without data fails here, before images are loaded and the progress bar starts.
    for spec in dict.fromkeys(s for s in (dataset, unlabeled_from) if s is not None):
        check_spec(spec, size=size)
    get_spec(backbone)
    parse_init(init)
    hparams = parse_hparams(hp)
    hparams.update({k: v for k, v in {"batch_size": batch_size, "lr": lr}.items() if v is not None})
    method_config(method, hparams)
    request = PretrainRequest(
        dataset=unlabeled_from or dataset,
        method=method,
        backbone=backbone,
        epochs=epochs,
        init=init,
        size=size,
        image_size=image_size,
        small_stem=small_stem,
        seed=seed,
        hparams=hparams,
        precision=precision,
        # With another source, the target's laterality still forbids flips (pretrain() checks the source's own).
        hflip=target_hflip(hflip, dataset, size, out / "splits") if unlabeled_from else hflip,
    )
    path = run_pretraining(request, out, resume=resume, restart=restart, progress=progress, log=log)
    print(path)


@app.command()
@handle_errors
def run(
    study_file: Annotated[
        Path | None,
        typer.Argument(help="Study YAML (datasets, inits, protocols, budgets, seeds…).", show_default=False),
    ] = None,
    preset: Annotated[str | None, typer.Option(help="A shipped study, e.g. quick (--list-presets).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory: results.db, predictions, checkpoints, report.html.")] = Path(
        "runs/study"
    ),
    executor: Annotated[str, typer.Option(help="local (in this process) or ray (one task per cell).")] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (e.g. auto); default: start a local Ray instance.")
    ] = None,
    report: Annotated[bool, typer.Option(help="Write report.html when the study is done.")] = True,
    list_presets: Annotated[bool, typer.Option("--list-presets", help="Print the shipped presets and exit.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Run a whole study — pre-train, evaluate every cell, write the report — resumable at any point.

    Killed at any moment, the same command again skips the finished cells and pre-training epochs.
    Examples: `medpretrain run --preset quick --out runs/quick`; `medpretrain run study.yaml --out runs/mine`.
    """
    from medpretrain.study import load_study, preset_names, preset_text

    if list_presets:
        for name in preset_names():
            console.rule(f"preset: {name}")  # console prints literally (markup=False)
            console.print(preset_text(name), highlight=False, markup=False)
        return
    study = load_study(study_file, preset=preset)
    from medpretrain.api import run as run_study  # mp.run: the same path from Python
    from medpretrain.summary import print_summary

    handle = run_study(study, out, executor=executor, address=address, progress=progress, log=log)
    result = handle.result
    print_summary(result.rows, console)
    console.print(f"results: {Path(out) / 'results.db'} ({result.cells_run} cells run, {result.cells_reused} reused)")
    if report:
        console.print(f"report: {handle.report()}")


@app.command(name="report")
@handle_errors
def report_command(
    out: Annotated[Path, typer.Argument(help="A run directory written by `medpretrain run` or `evaluate`.")],
) -> None:
    """(Re)build <out>/report.html from the results store: curves, tables, tests, Grad-CAM, UMAP, advice."""
    from medpretrain.report import build_report

    if not (out / "results.db").exists():
        raise MedpretrainError(f"{out} has no results.db", "give the --out folder of a `medpretrain run`")
    console.print(f"report: {build_report(out)}")


@app.command()
@handle_errors
def forecast(
    out: Annotated[Path, typer.Argument(help="A run directory written by `medpretrain run` or `evaluate`.")],
    target: Annotated[
        list[str] | None,
        typer.Option(help="metric=level, repeatable (default: the study's targets, else auc=0.9 and auc=0.95)."),
    ] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the rows as a JSON list here.")] = None,
) -> None:
    """Labels each init needs to reach a target metric, from learning curves fitted to the run (as in the report).

    Example: `medpretrain forecast runs/quick --target auc=0.95 --json forecast.json`.
    """
    from medpretrain.report.forecast import forecasts, parse_targets, print_table
    from medpretrain.report.run import Run

    rows = forecasts(Run(out), parse_targets(target or []) or None)
    print_table(rows, console)
    if json_file is not None:
        from medpretrain.atomic import write_text

        write_text(json_file, json.dumps(rows, indent=1) + "\n")
        console.print(f"forecasts: {json_file}")


app.command(name="export")(handle_errors(export_command))


def main() -> None:  # pragma: no cover - console-script shim for `python -m medpretrain`
    app()
    sys.exit(0)
