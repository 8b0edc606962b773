"""SparK's sparse encoder, emulated on an unmodified dense timm model.

SparK (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling") has the encoder see only the visible patches, as if it were a sparse network: it replaces every
convolution, pooling and BatchNorm with a sparse version. Here the timm model stays dense and untouched and
`sparse_encoding` emulates sparsity while it is active: every BatchNorm normalises with statistics of visible
positions only (and updates its running statistics from them) and writes zeros at masked positions, and the
output of every pooling layer is multiplied by the mask upsampled to its resolution. In the registered CNNs
every convolution feeds a BatchNorm, so masked positions are exactly zero at every depth where a convolution
reads them, and a visible position never reads anything but zeros from a masked one
(`test_spark_encoder_sees_only_visible_patches` checks this for each family). Nothing is re-registered, so
`backbone.model.state_dict()` keeps timm's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from medpretrain.ssl.spark.geometry import mask_at


def sparse_batch_norm(bn: _BatchNorm, x: Tensor, active: Tensor) -> Tensor:
    """`bn` applied to the visible positions of `x` only (SparK's SparseBatchNorm2d); masked positions → 0.

    `active` is the mask at `x`'s resolution (N, 1, H, W). The module's own parameters and running
    buffers are used and updated exactly as `nn.BatchNorm2d.forward` would, but from visible positions,
    so the running statistics describe real image content rather than a majority of zeros.
    """
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    sel = active[:, 0]
    channels_last = x.permute(0, 2, 3, 1)
    visible = F.batch_norm(
        channels_last[sel],  # (M, C): one row per visible position
        bn.running_mean if use_buffers else None,
        bn.running_var if use_buffers else None,
        bn.weight,
        bn.bias,
        batch_stats,
        factor,
        bn.eps,
    )
    out = torch.zeros(channels_last.shape, dtype=visible.dtype, device=x.device)
    out[sel] = visible
    out = out.permute(0, 3, 1, 2).contiguous()
    if isinstance(bn, BatchNormAct2d):
        out = bn.act(bn.drop(out)) * active.to(out.dtype)  # re-masked: an activation need not map 0 to 0
    return out


@contextmanager
def sparse_encoding(model: nn.Module, active: Tensor) -> Iterator[Callable[[tuple[int, int] | torch.Size], Tensor]]:
    """While inside, `model` behaves as a sparse network that sees only the visible patches of `active`.

    Pooling outputs are re-masked by forward hooks; BatchNorm forwards are swapped, per instance, for
    `sparse_batch_norm`, which reads only visible positions and zeroes the others. Convolution outputs need
    no mask of their own because each feeds a BatchNorm (masking them as well cost a multiplication per
    convolution and its backward, about 5 % of a bf16 SparK step on CPU). Hooks and swaps are undone on
    exit, so the module tree, its state_dict keys and its behaviour outside the block are unchanged.
    Yields the mask-at-size function (cached per size).
    Maps smaller than the mask grid (none in the registered backbones) are left dense.
    """
    cache: dict[tuple[int, int], Tensor] = {}
    grid = active.shape[-2:]

    def at(size: tuple[int, int] | torch.Size) -> Tensor:
        key = (int(size[0]), int(size[1]))
        if key not in cache:
            cache[key] = mask_at(active, key)
        return cache[key]

    def too_small(t: Tensor) -> bool:
        return t.shape[-2] < grid[0] or t.shape[-1] < grid[1]

    def mask_output(_module: nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        if too_small(output):
            return None
        return output * at(output.shape[-2:]).to(output.dtype)

    def sparse_bn_forward(bn: _BatchNorm, x: Tensor) -> Tensor:
        if too_small(x):
            return type(bn).forward(bn, x)
        return sparse_batch_norm(bn, x, at(x.shape[-2:]))

    handles = []
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                # An instance attribute shadows the class's forward; deleting it restores the original.
                module.forward = partial(sparse_bn_forward, module)
                patched.append(module)
            elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
                handles.append(module.register_forward_hook(mask_output))
        yield at
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward


__all__ = ["sparse_batch_norm", "sparse_encoding"]
