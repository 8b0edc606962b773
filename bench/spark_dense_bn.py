"""Give a SparK checkpoint made before `SparK.finalize` existed that end-of-training step, without re-training.

`finalize` re-estimates the encoder's BatchNorm statistics on whole training images (see its docstring). It
runs after the last epoch and changes nothing else, so applying it to an older checkpoint gives what the
current pipeline produces for the same request; the result is written under the name that request has now
(its identity includes `dense_bn_stats`), where `pretrain` and `bench/ssl_linear.py` find and reuse it:
    python bench/spark_dense_bn.py runs/bench-spark30/ssl/spark-resnet18-bloodmnist-px28-e30-7e133f643f61.pt
    python bench/ssl_linear.py --dataset bloodmnist --epochs 30 --methods spark --precision bf16-mixed \
        --fractions 0.01 --seeds 3 --out runs/bench-spark30
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medpretrain.backbones import create_backbone
from medpretrain.data import load_unlabeled
from medpretrain.inits import save_checkpoint
from medpretrain.pretrain import PretrainRequest
from medpretrain.ssl.spark import SparK, SparKConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a finished SparK checkpoint (.pt)")
    args = parser.parse_args()
    old = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    ident = old["config"]
    if ident.get("method") != "spark" or "dense_bn_stats" in ident["config"]:
        raise SystemExit(f"error: {args.checkpoint} is not a SparK checkpoint from before dense_bn_stats")
    fields = ("dataset", "method", "backbone", "epochs", "init", "size", "image_size", "small_stem", "seed")
    request = PretrainRequest(**{k: ident[k] for k in fields}, hparams={}, precision=ident.get("precision", "auto"))
    request.dataset = ident["dataset"].split("-")[0]  # the identity holds the dataset's content key
    data_name, data_key, images = load_unlabeled(request.dataset, size=request.size, image_size=request.image_size)
    if data_key != ident["dataset"]:
        raise SystemExit(f"error: dataset key {data_key} is not the checkpoint's {ident['dataset']}")
    request.hparams = {k: v for k, v in ident["config"].items() if v != SparKConfig.model_fields[k].default}
    backbone = create_backbone(request.backbone, small_stem=request.small_stem)
    backbone.model.load_state_dict(old["backbone"])
    config = SparKConfig(**ident["config"])
    method = SparK(backbone, config, channels=int(images.shape[1]), image_size=ident["image_size"])
    method.finalize(images, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backbone.cpu()
    out = args.checkpoint.with_name(request.name(data_name, data_key) + ".pt")
    save_checkpoint(
        out, backbone, image_size=ident["image_size"], method="spark", config=request.identity(data_key),
        history=old["history"],
    )  # fmt: skip
    print(out)


if __name__ == "__main__":
    main()
