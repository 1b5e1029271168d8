"""``trainer.nonfinite``: what a step with a NaN/Inf loss or gradient does, and what it costs.

- ``stop`` (default) costs nothing per step. The global loss of every step is read at the next
  sync point (:mod:`.steplog`, at most ``trainer.sync_every`` steps later, and always before an
  evaluation or a checkpoint); the first non-finite one ends the run there with exit code 65,
  naming the step. The steps in between still ran (on a model that is no longer finite, which is
  never evaluated or checkpointed): up to ``sync_every - 1`` wasted steps.
- ``skip`` drops the update of a step whose gradients are not finite, on the device, with no
  host sync: :class:`SkipGuard` computes the gradients' total norm (after DDP's all-reduce, so
  every rank reaches the same verdict), hands the verdict to a fused optimizer as ``found_inf``
  (the protocol ``torch.amp.GradScaler`` uses: the fused kernel leaves weights, momentum and
  step counts as they were) and puts back the BatchNorm buffers the bad forward changed
  (``torch.where``). Per step that is one norm over the gradients, a copy of every buffer (the
  BN statistics: small) and one ``where`` per buffer. Skipped steps are reported at the next sync
  point; more than ``trainer.max_consecutive_skips`` in a row stop the run there (exit 65). An
  optimizer without a fused implementation falls back to reading the verdict on the host (one
  sync per step).
"""

from __future__ import annotations

import torch
from torch import nn


def total_norm(parameters) -> torch.Tensor:
    """The 2-norm of all gradients together, as a device tensor (inf/nan when any is)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class SkipGuard:
    """Makes an optimizer step a no-op, on the device, when the gradients are not finite."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.buffers = list(model.buffers())
        self.parameters = [p for g in optimizer.param_groups for p in g["params"]]
        self.fused = bool(optimizer.defaults.get("fused"))
        self._saved: list[torch.Tensor] = []

    def begin(self) -> None:
        """Before the step's first forward: remember the buffers it may change."""
        self._saved = [b.detach().clone() for b in self.buffers]

    def step(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor | None = None):
        """``optimizer.step()`` unless the gradients (of total norm ``norm``, computed here when
        None) are not finite; returns the verdict as a device tensor (1.0: skipped)."""
        if norm is None:
            norm = total_norm(self.parameters)
        found_inf = (~torch.isfinite(norm)).float()
        if self.fused:
            optimizer.found_inf = found_inf  # fused kernels skip the update on the device
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not found_inf.item():  # the fallback: one host sync per step
            optimizer.step()
        bad = found_inf.bool()
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self._saved, strict=True):
                buffer.copy_(torch.where(bad, saved, buffer))
        self._saved = []
        return found_inf
