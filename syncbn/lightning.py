"""A Lightning ``LayerSync`` plugin that installs :class:`syncbn.SyncBatchNorm` for training.

``Trainer(sync_batchnorm=True)`` converts to ``torch.nn.SyncBatchNorm``, which refuses CPU tensors
(gloo) and all-gathers per rank. Lightning's plugin API for exactly this choice is ``LayerSync``:
its ``apply`` runs on the model when a distributed strategy sets up, its ``revert`` when fitting
ends. Here they are :func:`syncbn.convert_sync_batchnorm` and :func:`syncbn.revert_sync_batchnorm`,
so every ``nn.BatchNorm*d`` (and timm's ``BatchNormAct2d``) is synchronized during ``fit`` and the
model holds its original classes again afterwards.

Needs ``lightning`` (``pip install syncbn[lightning]``) or the older ``pytorch_lightning``.

Example::

    >>> from syncbn.lightning import SyncBatchNormPlugin
    >>> trainer = lightning.pytorch.Trainer(
    ...     accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncBatchNormPlugin()]
    ... )
"""

from __future__ import annotations

from torch import nn
from torch.distributed import ProcessGroup

from .convert import convert_sync_batchnorm, revert_sync_batchnorm

try:
    from lightning.pytorch.plugins.layer_sync import LayerSync
except ImportError:  # pragma: no cover - the package's older name
    try:
        from pytorch_lightning.plugins.layer_sync import LayerSync
    except ImportError as error:
        raise ImportError(
            "syncbn.lightning expected the lightning package (got none installed); install it "
            "with pip install 'syncbn[lightning]'"
        ) from error

__all__ = ["SyncBatchNormPlugin"]


class SyncBatchNormPlugin(LayerSync):
    """Lightning ``LayerSync``: :func:`syncbn.convert_sync_batchnorm` on setup, revert after fit.

    Pass it in ``Trainer(plugins=[...])`` instead of ``sync_batchnorm=True`` (the two cannot be
    combined: Lightning refuses a second layer-sync plugin).

    Args:
        process_group: the group each layer synchronizes over (``None``: all ranks), e.g.
            ``syncbn.new_sync_group(8)``; made before the Trainer exists, so usually left ``None``
            and set by a subclass's ``apply`` once the process group is up. Default: ``None``
        strict: refuse BatchNorm subclasses without a known synchronized equivalent (see
            :func:`syncbn.convert_sync_batchnorm`). Default: ``True``
    """

    def __init__(self, process_group: ProcessGroup | None = None, *, strict: bool = True) -> None:
        self.process_group = process_group
        self.strict = strict

    def apply(self, model: nn.Module) -> nn.Module:
        """Every BatchNorm layer of ``model`` as :class:`syncbn.SyncBatchNorm` (or norm + act)."""
        return convert_sync_batchnorm(model, self.process_group, strict=self.strict)

    def revert(self, model: nn.Module) -> nn.Module:
        """The layers :meth:`apply` converted, back to the classes they came from."""
        return revert_sync_batchnorm(model, strict=self.strict)
