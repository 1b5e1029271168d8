"""syncbn: synchronized batch normalization for PyTorch distributed training.

One ``all_reduce`` of ``2C + 2`` values per layer forward and ``2C`` backward, on CPU (gloo) and
CUDA (NCCL), with no device-to-host synchronization.
"""

from .batchnorm import SyncBatchNorm
from .convert import (
    BatchNormNd,
    convert_sync_batchnorm,
    register_converter,
    register_reverter,
    revert_sync_batchnorm,
)
from .distributed import new_sync_group
from .freeze import FrozenBatchNorm, freeze_batchnorm
from .function import SyncBatchNormFunction, sync_batch_norm
from .kernels import raise_device_errors
from .norm_act import BatchNormAct, SyncBatchNormAct
from .precise_bn import precise_bn
from .telemetry import BNTelemetry

__all__ = [
    "BNTelemetry",
    "BatchNormAct",
    "BatchNormNd",
    "FrozenBatchNorm",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "SyncBatchNormFunction",
    "convert_sync_batchnorm",
    "freeze_batchnorm",
    "new_sync_group",
    "precise_bn",
    "raise_device_errors",
    "register_converter",
    "register_reverter",
    "revert_sync_batchnorm",
    "sync_batch_norm",
]

__version__ = "0.1.0"
