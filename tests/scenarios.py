"""Deterministic SyncBN-vs-BatchNorm training scenarios, shared by the tests.

A rank runs :func:`run_sync_bn` inside a gloo group; the test runs :func:`run_reference`, which
feeds the same global batches through ``nn.BatchNorm*d`` in one process, and compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn.kernels import reduce_dims

LR = 0.1


@dataclass(frozen=True)
class Case:
    batch_sizes: tuple[int, ...]  # per global rank
    spatial: tuple[int, ...] = (3, 4)
    dtype: torch.dtype = torch.float64
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    memory_format: torch.memory_format = torch.contiguous_format
    group_size: int | None = None  # None: the whole world is one group
    channels: int = 3
    steps: int = 3
    device: str = "cpu"  # "cuda": rank r runs on GPU r (an NCCL group), or "cuda:0" for all
    # "standin": the CUDA branch on CPU (tests/cuda_standin.py); "standin_compiled": with its
    # per-channel steps compiled, as on CUDA
    kernels: str = "default"
    params: torch.dtype | None = None  # parameter dtype; default: float32, float64 for float64
    constant_channel: bool = False  # channel 0 holds one value on every rank
    force_sync: bool = False  # the synchronized path even in a group of one rank (NCCL tests)

    @property
    def param_dtype(self) -> torch.dtype:
        if self.params is not None:
            return self.params
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def reference_param_dtype(self) -> torch.dtype:
        """nn.BatchNorm's parameters: float32 where ours are half (CPU BN mixes half and float)."""
        return (
            torch.float32
            if self.param_dtype in (torch.float16, torch.bfloat16)
            else (self.param_dtype)
        )

    def groups(self) -> list[list[int]]:
        size = self.group_size or len(self.batch_sizes)
        return [list(range(start, start + size)) for start in range(0, len(self.batch_sizes), size)]


def global_batch(case: Case, step: int, group_id: int, total: int):
    """The input and upstream gradient of one group's global batch; channels differ in scale."""
    gen = torch.Generator().manual_seed(1000 * group_id + step)
    shape = (total, case.channels, *case.spatial)
    scale = torch.arange(1, case.channels + 1, dtype=torch.float64).view(
        -1, *[1] * len(case.spatial)
    )
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + 0.5 * scale
    if case.constant_channel:
        x[:, 0] = 2.5
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(case.dtype), dy.to(case.dtype)


def eval_batch(case: Case) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((4, case.channels, *case.spatial), generator=gen, dtype=torch.float64)
    return x.to(case.dtype)


def _init_params(module: nn.Module, case: Case) -> None:
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1 + 0.1 * torch.arange(case.channels))
            module.bias.copy_(0.1 * torch.arange(case.channels))


def _layout(x: torch.Tensor, case: Case) -> torch.Tensor:
    return x.contiguous(memory_format=case.memory_format)


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_sync_bn(case: Case) -> dict:
    """On one rank: train SyncBatchNorm for ``case.steps`` steps, then evaluate; record all."""
    from tests import cuda_standin

    paths = {"standin": "cuda_branch", "standin_compiled": "cuda_branch_compiled"}
    with cuda_standin.path(paths.get(case.kernels, "cpu")):
        return _run_sync_bn(case)


def _device(case: Case, rank: int) -> torch.device:
    if case.device == "cuda":
        return torch.device("cuda", rank)
    return torch.device(case.device)


def _run_sync_bn(case: Case) -> dict:
    rank = dist.get_rank()
    group = syncbn.new_sync_group(case.group_size) if case.group_size else None
    group_id, members = next((i, g) for i, g in enumerate(case.groups()) if rank in g)
    sizes = [case.batch_sizes[r] for r in members]
    start = sum(sizes[: members.index(rank)])
    stop = start + case.batch_sizes[rank]

    device = _device(case, rank)
    bn = syncbn.SyncBatchNorm(
        case.channels,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track_running_stats,
        process_group=group,
        device=device,
        dtype=case.param_dtype,
    )
    bn._always_sync = case.force_sync
    _init_params(bn, case)
    record = {"steps": []}
    for step in range(case.steps):
        x_all, dy_all = global_batch(case, step, group_id, sum(sizes))
        x = _layout(x_all[start:stop].to(device), case).requires_grad_()
        y = bn(x)
        y.backward(_layout(dy_all[start:stop].to(device), case))
        step_record = {
            "y": y.detach(),
            "dx": x.grad,
            "channels_last": y.is_contiguous(memory_format=case.memory_format),
        }
        if case.affine:
            step_record["dw"], step_record["db"] = bn.weight.grad.clone(), bn.bias.grad.clone()
            for p in (bn.weight, bn.bias):  # what DDP + SGD do: sum over the group, then step
                dist.all_reduce(p.grad, group=group)
                with torch.no_grad():
                    p -= LR * p.grad
                p.grad = None
        step_record["state"] = _state(bn)
        record["steps"].append(step_record)
    bn.eval()
    record["eval"] = bn(_layout(eval_batch(case).to(device), case)).detach()
    return to_cpu(record)


def to_cpu(value):
    """Records travel back to the test process as CPU tensors."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


def reference_class(num_dims: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[num_dims]


def closed_form(x, g, w=None, b=None, eps: float = 1e-5) -> dict:
    """apex's float64 reference formulas for BN over dim 1, forward and backward (``w``, ``b``:
    ones and zeros when ``None``)."""
    x, g = x.double(), g.double()
    dims = reduce_dims(x)
    shape = (-1,) + (1,) * (x.dim() - 2)
    w = torch.ones(x.shape[1], dtype=x.dtype) if w is None else w.double()
    b = torch.zeros(x.shape[1], dtype=x.dtype) if b is None else b.double()
    m = x.mean(dims)
    var = x.var(dims, unbiased=False)
    xmu = x - m.view(shape)
    rstd = torch.rsqrt(var + eps).view(shape)
    mean_dy = g.mean(dims).view(shape)
    mean_dy_xmu = (xmu * g).mean(dims).view(shape)
    return {
        "mean": m,
        "var": var,
        "unbiased_var": x.var(dims, unbiased=True),
        "x_hat": xmu * rstd,
        "y": w.view(shape) * xmu * rstd + b.view(shape),
        "grad_bias": g.sum(dims),
        "grad_weight": (xmu * rstd * g).sum(dims),
        "grad_input": (g - mean_dy - xmu / (var.view(shape) + eps) * mean_dy_xmu)
        * rstd
        * w.view(shape),
    }


def _absolute_terms(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per channel :math:`\sum |g \hat x|` and :math:`\sum |g|` (float64): the scale of the
    rounding error of a half-precision reduction of :math:`\partial L/\partial\gamma` and
    :math:`\partial L/\partial\beta`."""
    g = dy.double().abs()
    return (g * closed_form(x, dy)["x_hat"].abs()).sum(reduce_dims(x)), g.sum(reduce_dims(x))


def run_reference(case: Case, group_id: int, members: list[int]) -> dict:
    """``nn.BatchNorm*d`` on each step's concatenated group batch, with the same SGD updates."""
    sizes = [case.batch_sizes[r] for r in members]
    bn = reference_class(2 + len(case.spatial))(
        case.channels,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track_running_stats,
        dtype=case.reference_param_dtype,
    )
    _init_params(bn, case)
    record = {"steps": []}
    for step in range(case.steps):
        x_all, dy_all = global_batch(case, step, group_id, sum(sizes))
        x_all = x_all.clone().requires_grad_()
        y = bn(x_all)
        y.backward(dy_all)
        step_record = {"y": y.detach(), "dx": x_all.grad}
        if case.affine:
            step_record["dw"], step_record["db"] = bn.weight.grad.clone(), bn.bias.grad.clone()
            step_record["dw_abs"], step_record["db_abs"] = _absolute_terms(x_all, dy_all)
            for p in (bn.weight, bn.bias):
                with torch.no_grad():
                    p -= LR * p.grad
                p.grad = None
        step_record["state"] = _state(bn)
        record["steps"].append(step_record)
    bn.eval()
    record["eval"] = bn(eval_batch(case)).detach()
    return record
