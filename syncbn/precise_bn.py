r"""Distributed PreciseBN: running statistics replaced by exact population statistics.

In eval mode batch norm uses running statistics, an exponential moving average of batch
statistics taken while the weights were still changing; after large-batch or unstable training
they are measurably off (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021). PreciseBN runs a
number of batches through the model with frozen weights and sets every BN layer's buffers to the
mean and unbiased variance of everything its input held, pooled over **all ranks**:

.. math::

    \mu = \frac{1}{n} \sum_{i} x_i, \qquad
    \sigma^2 = \frac{1}{n - 1} \sum_i (x_i - \mu)^2

per channel, over the :math:`n` values (samples times spatial positions) of the batches of all
ranks. Each rank accumulates count, mean and centred sum of squares :math:`M` in float64 with
Chan's merge; the ranks then combine exactly, in two all-reduces over all layers at once:
:math:`n = \sum_r n_r`, :math:`\mu = \sum_r n_r \mu_r / n`, and
:math:`M = \sum_r M_r + n_r (\mu_r - \mu)^2`. Ranks with different numbers of batches (uneven
shards) count each sample as one sample: the statistics are count-weighted, not batch-averaged.

The batches run in training mode, so each BN layer normalizes with the statistics of the current
batch, as it did in training (and SyncBatchNorm with the global batch of its group): the layers
downstream see the inputs they saw in training.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed as sbdist
from .batchnorm import SyncBatchNorm

__all__ = ["precise_bn"]


def precise_bn(
    model: nn.Module,
    data_loader: Iterable,
    num_batches: int,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Set the running mean and variance of every BN layer of ``model`` to population statistics.

    Runs up to ``num_batches`` batches of ``data_loader`` on each rank through ``model`` in
    training mode with gradients off, records the input of every ``nn.BatchNorm*d``,
    ``nn.SyncBatchNorm`` and :class:`syncbn.SyncBatchNorm` layer (with ``track_running_stats``),
    and sets ``running_mean`` and ``running_var`` to the mean and unbiased variance over the
    batches of all ranks of ``process_group`` (default: all ranks). Every rank ends with the same
    buffers. Weights, ``num_batches_tracked`` and each module's train/eval mode are left as they
    were. Padded elements excluded by a :class:`syncbn.SyncBatchNorm` ``mask`` are excluded here
    too.

    Call it on every rank; ``num_batches`` may differ between ranks (``len(data_loader)`` of
    uneven shards). When the model synchronizes in its forward (SyncBatchNorm layers,
    DistributedDataParallel) the ranks step in lockstep, agreeing at each step, with one small
    all-reduce, whether any rank still has a batch: they make as many forward calls as the rank
    with the most batches to give (the maximum over ranks of ``min(num_batches, len(loader))``);
    a rank that is done (its loader exhausted or its ``num_batches`` reached) feeds empty batches
    shaped like its last one. Every rank then needs at least one batch; if one has none, all ranks
    raise the same ``ValueError`` naming it. The statistics count every sample once whichever rank
    held it.

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapping it).
        data_loader: yields batches: a tensor, a tuple or list whose first element is the input,
            or a dict of keyword arguments of ``model``; tensors are moved to the model's device.
        num_batches: at most this many batches of this rank's ``data_loader`` (>= 0, may differ
            between ranks).
        forward: ``forward(model, batch)`` for other batch layouts; it must call ``model``.
        process_group: the ranks to pool over. Default: the whole world.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ValueError(
            f"precise_bn expected num_batches to be an integer >= 0 (got {num_batches!r}); "
            f"e.g. len(data_loader)"
        )
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return
    device = layers[0].running_mean.device
    moments = [_Moments(layer.num_features, device) for layer in layers]
    hooks = [
        layer.register_forward_pre_hook(_recorder(layer, m), with_kwargs=True)
        for layer, m in zip(layers, moments, strict=True)
    ]
    modes = {module: module.training for module in model.modules()}
    tracked = [layer.num_batches_tracked.clone() for layer in layers]
    forward = forward or _default_forward(device)
    try:
        model.train()
        with torch.no_grad():
            lockstep = _synchronizes(model)
            _run(model, data_loader, num_batches, forward, lockstep, process_group, device)
        _pool(moments, process_group)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
        for layer, count in zip(layers, tracked, strict=True):
            layer.num_batches_tracked.copy_(count)
    unseen = []
    with torch.no_grad():
        for layer, m in zip(layers, moments, strict=True):
            n = int(m.count)
            if n < 2:
                unseen.append(getattr(layer, "layer_name", type(layer).__name__))
                continue
            layer.running_mean.copy_(m.mean.to(layer.running_mean.dtype))
            layer.running_var.copy_((m.m2 / (n - 1)).to(layer.running_var.dtype))
    if unseen:
        warnings.warn(
            f"precise_bn left {len(unseen)} BN layer(s) unchanged: they saw fewer than 2 values "
            f"per channel in the batches given (unused in forward?): {', '.join(unseen)}",
            stacklevel=2,
        )


class _Moments:
    """Per-channel count, mean and centred sum of squares in float64 (Chan et al.'s merge)."""

    def __init__(self, channels: int, device: torch.device):
        kw = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros((), **kw)
        self.mean = torch.zeros(channels, **kw)
        self.m2 = torch.zeros(channels, **kw)

    def add(self, rows: Tensor) -> None:
        """Merge ``rows`` of shape ``(C, n)``."""
        n = rows.shape[1]
        if n == 0:
            return
        rows = rows.double()
        mean = rows.mean(1)
        m2 = (rows - mean[:, None]).square().sum(1)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total


def _recorder(layer: _BatchNorm, moments: _Moments):
    def record(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        if mask is not None and isinstance(layer, SyncBatchNorm):
            rows = x.movedim(1, -1)[layer._expand_mask(x, mask)].T  # (C, real elements)
        else:
            rows = x.transpose(0, 1).reshape(x.shape[1], -1)
        moments.add(rows.detach())

    return record


def _synchronizes(model: nn.Module) -> bool:
    """Whether a forward of ``model`` runs collectives, so all ranks must step together."""
    if not sbdist.is_initialized() or sbdist.get_world_size() == 1:
        return False
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    return any(isinstance(m, SyncBatchNorm | nn.SyncBatchNorm) for m in model.modules())


def _run(model, data_loader, num_batches, forward, lockstep: bool, group, device) -> None:
    """Forward up to ``num_batches`` batches of ``data_loader``.

    In lockstep (the forward runs collectives) every rank must make the same number of forward
    calls, whatever its own ``num_batches`` and however many batches its loader holds. Each step
    therefore begins with one all-reduce of two flags per rank, ``(has a batch, cannot make an
    empty one)``: the ranks stop together at the first step where none has a batch, i.e. after
    ``max over ranks of min(num_batches, batches available)`` steps, and a rank without a batch
    of its own feeds an empty one shaped like its last. Every rank leaves the loop at the same
    step, so the pooling all-reduces that follow line up on all of them.
    """
    batches = iter(data_loader)
    if not lockstep:
        for batch in itertools.islice(batches, num_batches):
            forward(model, batch)
        return
    ranks = sbdist.group_ranks(group)
    me = sbdist.get_rank(group)
    taken, template = 0, None
    while True:
        batch = next(batches, None) if taken < num_batches else None
        if batch is not None:
            taken += 1
        else:
            taken = num_batches  # the loader is exhausted: never ask it again
        flags = torch.zeros(2, len(ranks), dtype=torch.int64, device=device)
        flags[0, me] = batch is not None
        flags[1, me] = batch is None and template is None
        dist.all_reduce(flags, group=group)
        has_batch, no_template = flags.tolist()
        if not any(has_batch):
            return
        if any(no_template):
            empty = [rank for rank, flag in zip(ranks, no_template, strict=True) if flag]
            raise ValueError(
                f"precise_bn expected at least one batch on every rank, as the model "
                f"synchronizes in its forward (got none on rank(s) {empty}); give every rank "
                f"data, e.g. with a DistributedSampler"
            )
        if batch is None:
            batch = _empty_like(template)
        template = batch
        forward(model, batch)


def _pool(moments: list[_Moments], group) -> None:
    """Combine every rank's moments exactly: two all-reduces for all layers together."""
    if not sbdist.is_initialized() or sbdist.get_world_size(group) == 1:
        return
    sums = torch.cat([torch.cat([m.count.view(1), m.count * m.mean]) for m in moments])
    dist.all_reduce(sums, group=group)
    spread = []
    offset = 0
    for m in moments:
        count = sums[offset]
        mean = sums[offset + 1 : offset + 1 + m.mean.numel()] / count.clamp(min=1)
        spread.append(m.m2 + m.count * (m.mean - mean).square())
        m.count, m.mean = count, mean
        offset += 1 + m.mean.numel()
    pooled = torch.cat(spread)
    dist.all_reduce(pooled, group=group)
    for m, m2 in zip(moments, pooled.split([m.mean.numel() for m in moments]), strict=True):
        m.m2 = m2


def _default_forward(device: torch.device):
    def forward(model, batch):
        if isinstance(batch, Tensor):
            return model(batch.to(device))
        if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
            return model(batch[0].to(device))
        if isinstance(batch, Mapping):
            return model(**{k: _to(v, device) for k, v in batch.items()})
        raise TypeError(
            f"precise_bn expected batches that are a tensor, an (input, target, ...) tuple or a "
            f"dict of keyword arguments (got {type(batch).__name__}); pass "
            f"forward=lambda model, batch: model(...)"
        )

    return forward


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, Tensor) else value


def _empty_like(batch):
    if isinstance(batch, Tensor):
        return batch[:0]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_empty_like(b) for b in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_empty_like(b) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _empty_like(v) for k, v in batch.items()}
    return batch
