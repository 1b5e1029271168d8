"""What the ported test files share: the two kernel paths and small helpers. No tests here.

The files in ``tests/ported/`` hold SyncBatchNorm cases ported from other projects' test
suites, one file per source (``test_pytorch_distributed.py``, ``test_pytorch_nn.py``,
``test_apex.py``, ``test_mmcv.py``, ``test_fairscale.py``, ``test_lightning.py``,
``test_keras.py``), run against our layer.

Each test names its source (repository, file, test) in its docstring and says where the port
differs. The cases are our own code: they keep the source's shapes, dtypes, batch splits, process
groups, momentum, train/eval switches and the behaviour it asserts, and compare against
``nn.BatchNorm*d`` on the concatenated batch (or closed-form float64 formulas where the source
does). Where a source's expectation differs from ``nn.BatchNorm``'s documented behaviour (Keras
keeps a biased moving variance, mmcv reduces parameter gradients inside the layer), the test
follows ``nn.BatchNorm`` and says so.

Every case runs on real gloo ranks (``run_ranks``), on the CPU path and, where kernels are
involved, on the CUDA branch through the CPU model of PyTorch's CUDA kernels
(``syncbn/testing/cuda_standin.py``). One task per source test keeps the spawning cost low: loops
over shapes, dtypes and group sizes run inside the ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from syncbn.testing import cuda_standin

__all__ = [
    "PATHS",
    "grad_copies",
    "kernel_path",
    "rank_rows",
    "reference_bn",
    "seeded",
    "state_copy",
]

# the kernel paths every case runs on: the CPU path, and the CUDA branch through the stand-in
PATHS = ["cpu", "cuda_branch"]

# ``with kernel_path(name):`` runs the layer on the named path inside a rank
kernel_path = cuda_standin.path


def rank_rows(sizes, rank: int) -> slice:
    """This rank's rows of a global batch split into consecutive blocks of ``sizes``."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def state_copy(module: nn.Module) -> dict:
    """A detached copy of ``module``'s state_dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def grad_copies(module: nn.Module) -> list:
    """A detached copy of each parameter's gradient (``None`` where there is none)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in module.parameters()]


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the same draws on every rank and in the reference."""
    return torch.Generator().manual_seed(seed)


def reference_bn(dims: int, channels: int, **kwargs) -> nn.Module:
    """The ``nn.BatchNorm1d/2d/3d`` that takes input of ``dims`` dimensions."""
    return {3: nn.BatchNorm1d, 2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims](
        channels, **kwargs
    )
