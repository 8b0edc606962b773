#!/usr/bin/env bash
# Run HERE (the CPU machine, with package registries) before `bench/gpu_check.sh` runs on a lent GPU machine,
# which reaches no registry and sees only the repository: it gathers what that machine lacks into two ignored
# folders that the device call carries (`carry: [".whl", ".gpu-data"]`):
#   .whl/       wheels for Python 3.12 (the GPU image's) of the packages its image does not ship
#   .gpu-data/  the MedMNIST files the check reads (bloodmnist for the reproduction, pneumoniamnist for the slice)
# Together they stay under the device tool's 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
grep -qxF "/.gpu-data/" .git/info/exclude || echo "/.gpu-data/" >> .git/info/exclude
rm -rf .whl .gpu-data && mkdir -p .whl .gpu-data
# Versions pinned to what this project's CI installs; --no-deps: the image has numpy, torch, timm, lightning, ….
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    lightly==1.6.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    medmnist==3.0.2
# (What `medpretrain run` imports beyond the image; the check writes no report, so grad-cam and umap stay behind.)
data="${MEDPRETRAIN_DATA:-../shared/data/medmnist}"
cp "$data/bloodmnist.npz" "$data/pneumoniamnist.npz" .gpu-data/
du -sh .whl .gpu-data
