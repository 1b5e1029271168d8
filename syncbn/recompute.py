"""Gradient checkpointing: the recomputed forward reuses the first forward's global statistics.

``torch.utils.checkpoint`` (reentrant or not) runs a layer's forward once without keeping its
activations and once more during backward to rebuild them. A BatchNorm layer would then update
its running statistics and ``num_batches_tracked`` twice per step (PyTorch's own layers do:
pytorch#96136), and a synchronized one would also all-reduce twice, hanging when only some ranks
recompute. Here:

- a training forward whose activations may be recomputed (gradients off, as in reentrant
  checkpointing's first pass, or saved-tensor hooks installed, as in the non-reentrant one) keeps
  its global ``(mean, invstd, count)`` on the layer (:math:`2C + 1` values);
- a forward that runs while autograd executes a backward graph is a recomputation: it updates no
  running statistics, and when exactly one kept entry matches its input's shape and dtype it
  normalizes with those statistics through the synchronized autograd function, with no forward
  collective (the backward still all-reduces its two sums, on every rank, as usual). Without a
  unique match (a layer applied twice per step to same-shaped inputs) it reduces again, which is
  exact as long as every rank recomputes.

Kept entries are dropped once consumed and at the first training forward after a recomputation;
at most :data:`MAX_KEPT` per layer remain otherwise (e.g. train-mode forwards under ``no_grad``
with no backward).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .function import SyncBatchNormFunction
from .precision import mixed_parameters

if TYPE_CHECKING:
    from .batchnorm import SyncBatchNorm
    from .function import SyncSpec

__all__ = ["MAX_KEPT", "keep", "local_rerun", "recomputing", "synchronized_rerun"]

MAX_KEPT = 8


def recomputing() -> bool:
    """True while autograd executes a backward graph: a forward now is a checkpoint's rerun."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _may_be_recomputed() -> bool:
    """Gradients off (reentrant checkpoint's first pass) or saved-tensor hooks (non-reentrant)."""
    if torch.compiler.is_compiling():
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return not torch.is_grad_enabled() or hooks is not None


def keep(layer: SyncBatchNorm, input: Tensor, mean: Tensor, invstd: Tensor, count: Tensor) -> None:
    """After a synchronized training forward: keep its statistics if it may be recomputed."""
    if not _may_be_recomputed():
        return
    kept = _kept(layer)
    epoch = layer.__dict__.get("_recompute_epoch", 0)
    while kept and kept[0][0] < epoch:  # from a step whose backward has run
        kept.popleft()
    key = (tuple(input.shape), input.dtype, input.device)
    kept.append((epoch, key, (mean.detach(), invstd.detach(), count.detach())))


def synchronized_rerun(layer: SyncBatchNorm, input: Tensor, spec: SyncSpec) -> Tensor:
    """A recomputation on the synchronized path: the kept statistics, else one more reduction;
    the running statistics and ``num_batches_tracked`` stay as the first forward left them."""
    layer._recompute_epoch = layer.__dict__.get("_recompute_epoch", 0) + 1
    kept = _kept(layer)
    key = (tuple(input.shape), input.dtype, input.device)
    matches = [entry for entry in kept if entry[1] == key]
    if len(matches) == 1:
        kept.remove(matches[0])
        spec = dataclasses.replace(spec, replay=matches[0][2])
    output, *_ = SyncBatchNormFunction.apply(
        input, layer.weight, layer.bias, None, None, 0.0, layer.eps, spec
    )
    return output


def local_rerun(layer: SyncBatchNorm, input: Tensor) -> Tensor:
    """A recomputation on the unsynchronized path (one rank): batch statistics, no update.

    The running statistics still go in, with weight 0 (``running * 1 + batch * 0``: unchanged),
    so that the rerun saves the same tensors for backward as the first forward did, which
    non-reentrant checkpointing checks."""
    weight, bias = layer.weight, layer.bias
    if mixed_parameters(layer):  # FSDP2's bfloat16 parameters next to float32 statistics
        weight, bias = weight.float(), None if bias is None else bias.float()
    return F.batch_norm(
        input, layer.running_mean, layer.running_var, weight, bias, True, 0.0, layer.eps
    )


def _kept(layer: SyncBatchNorm) -> deque:
    kept = layer.__dict__.get("_recompute_kept")
    if kept is None:
        kept = layer.__dict__["_recompute_kept"] = deque(maxlen=MAX_KEPT)
    return kept
