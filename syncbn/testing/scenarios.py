"""Deterministic SyncBN-vs-BatchNorm training scenarios, shared by the tests and the GPU scripts.

A rank runs :func:`run_sync_bn` inside a gloo group; the test runs :func:`run_reference`, which
feeds the same global batches through ``nn.BatchNorm*d`` in one process, and compares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

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
    # "standin": the CUDA branch on CPU (syncbn/testing/cuda_standin.py); "standin_compiled":
    # with its per-channel steps compiled, as on CUDA; "triton": the Triton kernels on CPU
    # through Triton's interpreter (on CUDA: the default there); "aten": PyTorch's CUDA kernels
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
    from syncbn.testing import cuda_standin

    paths = {
        "standin": "cuda_branch",
        "standin_compiled": "cuda_branch_compiled",
        "triton": "triton",
        "aten": "aten",
    }
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


# ----------------------------------------------------------------- checking against the reference

TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 3e-2},
    torch.float16: {"rtol": 2e-3, "atol": 3e-3},
}


def check_against_reference(results: list[dict], case: Case) -> None:
    tol = TOLERANCES[case.dtype]
    state_tol = TOLERANCES[case.param_dtype]
    for group_id, members in enumerate(case.groups()):
        ref = run_reference(case, group_id, members)
        drift = {"weight": 0.0, "bias": 0.0}  # bound on the SGD-updated parameters' error so far
        for step, ref_step in enumerate(ref["steps"]):
            ranks = [results[r]["steps"][step] for r in members]
            where = f"group {group_id}, step {step}"
            assert_close(torch.cat([r["y"] for r in ranks]), ref_step["y"], **tol, msg=_at(where))
            assert_close(torch.cat([r["dx"] for r in ranks]), ref_step["dx"], **tol, msg=_at(where))
            assert all(r["channels_last"] for r in ranks), "output lost the input memory format"
            if case.affine:
                for key in ("dw", "db"):
                    total = torch.stack([r[key].to(ref_step[key].dtype) for r in ranks]).sum(0)
                    if _half_precision_reduction(case):
                        bound = _summation_error_bound(case, ref_step[f"{key}_abs"])
                        _assert_within(total, ref_step[key], bound, f"{key}, {where}")
                        drift["weight" if key == "dw" else "bias"] += LR * bound
                    else:
                        assert_close(total, ref_step[key], **state_tol, msg=_at(f"{key}, {where}"))
            for rank_step in ranks:
                assert rank_step["state"].keys() == ref_step["state"].keys()
                for key, value in ref_step["state"].items():
                    ours = rank_step["state"][key].to(value.dtype)  # half parameters: as float
                    if key in drift and _half_precision_reduction(case):  # w -= LR * dw
                        bound = drift[key] + state_tol["atol"] + state_tol["rtol"] * value.abs()
                        _assert_within(ours, value, bound, f"{key}, {where}")
                    else:
                        assert_close(ours, value, **state_tol, msg=_at(f"{key}, {where}"))
        if case.track_running_stats:  # eval normalizes with the (global) running statistics
            for r in members:
                assert_close(results[r]["eval"], ref["eval"], **tol)


def _half_precision_reduction(case: Case) -> bool:
    r"""Whether the parameter gradients come from PyTorch's fused CUDA reduction of half-precision
    input (``batch_norm_backward_reduce``). Its NCHW kernel rounds every product
    :math:`g (x - \mu)` and the partial sums of its tree reduction to the input's dtype
    (``Float2(scalar_t, scalar_t)`` in Normalization.cuh), so float32 parameters do not get
    float32 gradients: torch.nn.SyncBatchNorm computes them with the same kernel."""
    if not case.device.startswith("cuda") or case.dtype not in (torch.float16, torch.bfloat16):
        return False
    from syncbn import kernels

    # the Triton kernels (the default on CUDA where triton imports) accumulate in float32
    return case.kernels == "aten" or (case.kernels == "default" and not kernels.triton_kernel_set())


def _summation_error_bound(case: Case, absolute_terms: torch.Tensor) -> torch.Tensor:
    r"""Per channel, the textbook bound on a pairwise sum of :math:`n` terms rounded to a
    precision of unit roundoff :math:`u`: :math:`(\lceil \log_2 n \rceil + 2)\, u \sum_i |t_i|`
    (one rounding per tree level, plus those of each product and of a half-precision result);
    :math:`u` of the input's dtype, :math:`n` the values per channel on the largest rank."""
    per_channel = max(case.batch_sizes) * math.prod(case.spatial)
    roundoff = torch.finfo(case.dtype).eps / 2
    return (math.ceil(math.log2(max(per_channel, 2))) + 2) * roundoff * absolute_terms


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, where: str) -> None:
    error = (actual.double() - expected.double()).abs()
    assert (error <= bound).all(), (
        f"{where}: error {error.tolist()} exceeds the half-precision summation bound "
        f"{bound.tolist()} (ours {actual.tolist()}, nn.BatchNorm {expected.tolist()})"
    )


def _at(where: str):
    """An ``assert_close`` message that keeps torch's numbers (greatest differences) after
    saying where the mismatch is."""
    return lambda details: f"{where}: {details}"


# The CUDA branch's scenarios: run through the stand-in on CPU (tests/layer/test_cuda_branch.py)
# and on a GPU (tests/gpu/test_cuda.py).
SCENARIOS = {
    "float32_2d": Case((3, 5), spatial=(4, 5), dtype=torch.float32),
    "float64_uneven_momentum_none": Case((1, 6, 2), dtype=torch.float64, momentum=None),
    "float16_input_float32_params": Case((3, 2), dtype=torch.float16),
    "bfloat16_input_float32_params_3d": Case((2, 3), spatial=(2, 3, 2), dtype=torch.bfloat16),
    "float16_params": Case((3, 2), dtype=torch.float16, params=torch.float16),
    "bfloat16_params_channels_last": Case(
        (2, 3),
        spatial=(3, 3),
        dtype=torch.bfloat16,
        params=torch.bfloat16,
        memory_format=torch.channels_last,
    ),
    "channels_last_2d": Case(
        (2, 3), spatial=(3, 4), dtype=torch.float32, memory_format=torch.channels_last
    ),
    "channels_last_3d": Case((2, 3), spatial=(2, 3, 2), memory_format=torch.channels_last_3d),
    "N_C": Case((3, 5), spatial=(), dtype=torch.float32),
    "N_C_1_1": Case((3, 5), spatial=(1, 1), dtype=torch.float32),
    "affine_false_N_C": Case((3, 5), spatial=(), dtype=torch.float32, affine=False),
    "affine_false_channels_last": Case(
        (2, 3),
        spatial=(3, 3),
        dtype=torch.float32,
        affine=False,
        memory_format=torch.channels_last,
    ),
    "affine_false_N_C_1_1": Case((2, 4), spatial=(1, 1), dtype=torch.float32, affine=False),
    "no_running_stats": Case((2, 3), dtype=torch.float32, track_running_stats=False),
    "momentum_none_affine_false": Case((2, 3), momentum=None, affine=False),
    "empty_rank": Case((4, 0, 2), dtype=torch.float32),
    "empty_rank_channels_last": Case(
        (0, 3), spatial=(2, 2), dtype=torch.float32, memory_format=torch.channels_last
    ),
    "constant_channel": Case((3, 4), dtype=torch.float32, constant_channel=True),
    "constant_channel_N_C_1_1": Case((2, 2), spatial=(1, 1), constant_channel=True),
    "one_value_per_rank_N_C": Case((1, 1), spatial=()),
    "one_value_per_rank_N_C_1_1": Case((1, 1, 1), spatial=(1, 1), dtype=torch.float32),
}
