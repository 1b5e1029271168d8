"""SyncBatchNorm cases ported from PyTorch's distributed tests (pytorch/pytorch).

Sources: ``torch/testing/_internal/distributed/distributed_test.py`` (the
``test_DistributedDataParallel_SyncBatchNorm*`` family through ``_test_DDP_niter``,
``test_SyncBatchNorm_process_group``, ``test_ddp_uneven_inputs_stop_iteration_sync_bn``,
``test_ddp_sync_bn_training_vs_eval``, ``test_ddp_inference``) and
``test/distributed/test_c10d_common.py`` (``test_sync_batch_norm_only_empty_input``,
``test_sync_batch_norm_empty_input``). PyTorch's ``test/test_nn.py`` cases are in
``test_pytorch_nn.py``.

How the cases are ported, and what every file shares: :mod:`tests.ported.common`.
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import syncbn
from tests.ported.common import PATHS, grad_copies, kernel_path, rank_rows, seeded, state_copy


def _params(module: nn.Module) -> list:
    return [p.detach().clone() for p in module.parameters()]


def _add_grad_step(model: nn.Module) -> None:
    """distributed_test.py's ``_model_step``: ``param += grad``, then drop the gradient."""
    for p in model.parameters():
        if p.grad is not None:
            with torch.no_grad():
                p += p.grad
            p.grad = None


class _BatchNormNet(nn.Module):
    """The shape of distributed_test.py's ``BatchNormNet``: Linear, BN1d over (N, 4, 10), Linear,
    softmax."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 40, bias=False)
        self.bn = nn.BatchNorm1d(4, affine=affine)
        self.fc2 = nn.Linear(40, 4, bias=False)

    def forward(self, x):
        h = self.bn(self.fc1(x).view(-1, 4, 10))
        return F.softmax(self.fc2(h.view(-1, 40)), dim=1)


# ------------------------------------------------------------ pytorch: distributed_test.py DDP


def _niter_setup(name: str):
    """(model, input shape, target shape, memory format) of a distributed_test.py scenario."""
    torch.manual_seed(0)
    if name in ("bn_net", "bn_net_no_affine"):
        return _BatchNormNet(affine=name == "bn_net"), (2,), (4,), torch.contiguous_format
    if name == "bn1d":
        return nn.BatchNorm1d(2), (2,), (2,), torch.contiguous_format
    if name == "sbn_2d":  # ONLY_SBN_NET = SyncBatchNorm(2, momentum=0.99)
        return nn.BatchNorm2d(2, momentum=0.99), (2, 4, 4), (2, 4, 4), torch.channels_last
    return nn.BatchNorm3d(2, momentum=0.99), (2, 4, 4, 4), (2, 4, 4, 4), torch.channels_last_3d


def _ddp_niter(path: str, name: str, local_sizes: tuple, iterations: int) -> dict:
    """``_test_DDP_niter``: the plain model on the whole batch and the converted model under DDP
    on this rank's rows, each stepped with ``param += grad``; the input is shuffled each
    iteration and the DDP model is saved and reloaded after the third."""
    with kernel_path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        base, in_shape, out_shape, fmt = _niter_setup(name)
        ddp = DDP(syncbn.convert_sync_batchnorm(copy.deepcopy(base)))
        total = sum(local_sizes)
        gen = seeded(1)
        x = torch.randn(total, *in_shape, generator=gen)
        target = torch.randn(total, *out_shape, generator=gen).contiguous(memory_format=fmt)
        rows = rank_rows(local_sizes, rank)
        loss = nn.MSELoss()
        record = {"base": [], "ddp": [], "format_kept": []}
        for it in range(iterations):
            x = x.contiguous(memory_format=fmt)
            base.train()
            loss(base(x), target).backward()
            ddp.train()
            out = ddp(x[rows])
            # the loss of a mean over the global batch, which DDP's averaging then restores
            (loss(out, target[rows]) * world * local_sizes[rank] / total).backward()
            record["format_kept"].append(out.is_contiguous(memory_format=fmt))
            _add_grad_step(base)
            _add_grad_step(ddp.module)
            record["base"].append(_params(base))
            record["ddp"].append(_params(ddp.module))
            x = x[torch.randperm(total, generator=gen)]  # the source shuffles the input only
            if it == 2:  # save and reload mid-training: the whole DDP model, as the source
                buffer = io.BytesIO()
                torch.save(ddp, buffer)
                buffer.seek(0)
                ddp = torch.load(buffer, weights_only=False)
        record["state_base"] = state_copy(base)
        record["state_ddp"] = state_copy(ddp.module)
        return record


NITER_CASES = {
    # test_DistributedDataParallel_SyncBatchNorm: 2 rows per rank, BatchNormNet, 5 iterations
    "SyncBatchNorm": ("bn_net", (2, 2), 5),
    # test_DistributedDataParallel_SyncBatchNorm_No_Affine: affine=False, 2 iterations
    "No_Affine": ("bn_net_no_affine", (2, 2), 2),
    # test_DistributedDataParallel_SyncBatchNorm_2D_Input: a lone BatchNorm1d on (N, 2)
    "2D_Input": ("bn1d", (2, 2), 5),
    # test_DistributedDataParallel_SyncBatchNorm_Single_Input_Per_Process: one row per rank
    "Single_Input_Per_Process": ("bn1d", (1, 1), 5),
    # test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_gradient: rank r holds r + 2
    "Diff_Input_Sizes_gradient": ("bn_net", (2, 3, 4), 5),
    # test_DistributedDataParallel_SyncBatchNorm_Channels_Last: channels_last and _3d
    "Channels_Last_2d": ("sbn_2d", (2, 2), 5),
    "Channels_Last_3d": ("sbn_3d", (2, 2), 5),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", NITER_CASES)
def test_pytorch_ddp_end_to_end(run_ranks, case, path):
    """Ported from pytorch/pytorch torch/testing/_internal/distributed/distributed_test.py,
    ``test_DistributedDataParallel_SyncBatchNorm`` and its ``_No_Affine``, ``_2D_Input``,
    ``_Single_Input_Per_Process``, ``_Diff_Input_Sizes_gradient`` and ``_Channels_Last``
    variants (through ``_test_DDP_niter``): a model converted and wrapped in DDP, each rank
    on its rows of the batch, keeps exactly the parameters of the plain model trained on the
    whole batch, iteration after iteration, through a save/reload; the output keeps the input's
    memory format. Ported: CPU ranks on gloo instead of one GPU per rank; the reference is
    ``nn.BatchNorm`` (the source's channels-last reference is ``nn.SyncBatchNorm`` fed the
    whole batch on every rank, the same statistics); the DDP model is pickled and reloaded
    through a buffer instead of a file. Running statistics are compared too (the source compares
    parameters only)."""
    name, sizes, iterations = NITER_CASES[case]
    results = run_ranks(_ddp_niter, len(sizes), path, name, sizes, iterations)
    for rank, r in enumerate(results):
        assert all(r["format_kept"]), f"rank {rank}: output lost the input's memory format"
        for it in range(iterations):
            assert_close(r["ddp"][it], r["base"][it], msg=f"rank {rank}, iteration {it}")
        assert r["state_ddp"].keys() == r["state_base"].keys()
        for key, value in r["state_base"].items():
            assert_close(r["state_ddp"][key], value, msg=f"rank {rank}, {key}")


def _running_value_input(rank: int) -> torch.Tensor:
    """Rank i: 2 x 10^(i+1) values per channel, constant within the rank (0.1^(i-1) and
    0.3^(i-1)): all of the variance is between ranks."""
    n = 10 ** (rank + 1)
    return torch.cat(
        [torch.ones(2, 1, n) * 0.1 ** (rank - 1), torch.ones(2, 1, n) * 0.3 ** (rank - 1)], dim=1
    )


def _diff_sizes_running_value(path: str, iterations: int):
    with kernel_path(path):
        model = DDP(syncbn.SyncBatchNorm(2, momentum=0.99))
        x = _running_value_input(dist.get_rank())
        for _ in range(iterations):
            model(x).mean().backward()
        return model.module.running_mean.clone(), model.module.running_var.clone()


@pytest.mark.parametrize("path", PATHS)
def test_pytorch_diff_input_sizes_running_value(run_ranks, path):
    """Ported from pytorch/pytorch torch/testing/_internal/distributed/distributed_test.py,
    ``test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_Running_Value``: ranks holding
    10, 100, 1000 values per row, each rank constant (zero local variance), momentum 0.99; the
    running mean and unbiased running variance converge to those of all values together. 10
    iterations instead of 100 (0.01^10 of the initial buffers is left)."""
    world = 3
    for running_mean, running_var in run_ranks(_diff_sizes_running_value, world, path, 10):
        everything = torch.cat(
            [_running_value_input(r).permute(1, 0, 2).reshape(2, -1) for r in range(world)], 1
        )
        assert_close(running_mean, everything.mean(1))
        assert_close(running_var, everything.var(1))


def _ddp_half(path: str):
    with kernel_path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        model = DDP(syncbn.convert_sync_batchnorm(_BatchNormNet().half()))
        gen = seeded(1)
        x = torch.randn(2 * world, 2, generator=gen).half()
        weights = torch.randn(2 * world, 4, generator=gen).half()
        rows = rank_rows((2,) * world, rank)
        out = model(x[rows])
        out.sum().backward()  # the source's backward: it must not fail on dtypes
        grad_dtypes = [p.grad.dtype for p in model.parameters()]
        model.zero_grad()
        model(x[rows]).mul(weights[rows]).sum().backward()  # one with non-zero gradients
        return {"out": out.detach(), "grad_dtypes": grad_dtypes, "grads": grad_copies(model.module)}


@pytest.mark.parametrize("path", PATHS)
def test_pytorch_ddp_half(run_ranks, path):
    """Ported from pytorch/pytorch torch/testing/_internal/distributed/distributed_test.py,
    ``test_DistributedDataParallel_SyncBatchNorm_half``: a ``model.half()`` converted and wrapped
    in DDP runs forward and backward without a dtype mismatch; the output and every parameter
    gradient are float16. Added: the values against the float32 model on the whole batch."""
    world = 2
    results = run_ranks(_ddp_half, world, path)
    torch.manual_seed(0)
    reference = _BatchNormNet()
    gen = seeded(1)
    x = torch.randn(2 * world, 2, generator=gen).half().float()
    weights = torch.randn(2 * world, 4, generator=gen).half().float()
    out = reference(x)
    reference(x).mul(weights).sum().backward()
    assert_close(torch.cat([r["out"] for r in results]).float(), out, rtol=1e-2, atol=2e-3)
    for r in results:
        assert r["out"].dtype == torch.float16
        assert r["grad_dtypes"] == [torch.float16] * 4
        for ours, ref in zip(r["grads"], grad_copies(reference), strict=True):
            assert ours.dtype == torch.float16
            assert_close(ours.float(), ref / world, rtol=2e-2, atol=2e-3)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)


def _nested_process_group():
    """A group of rank 0 only, created on every rank (new_group is collective)."""
    group = dist.new_group([0])
    model = nn.Sequential(
        OrderedDict(bn=nn.BatchNorm2d(3), layer1=nn.Sequential(_Block(), _Block()))
    )
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model), group)
    layers = [m for m in converted.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    x = torch.randn(4, 3, 2, 2, generator=seeded(0))
    try:
        same = torch.equal(converted.layer1[0].bn1(x), model.layer1[0].bn1(x))
    except ValueError as error:
        same = str(error)
    return len(layers), all(layer.process_group is group for layer in layers), same


def test_pytorch_convert_passes_the_process_group_to_nested_layers(run_ranks):
    """Ported from pytorch/pytorch torch/testing/_internal/distributed/distributed_test.py,
    ``test_SyncBatchNorm_process_group``: converting a model with a process group hands the group
    to layers nested in sub-sub-modules (the source checks ``layer1[0].bn1`` of a ResNet-50; here
    a small model of the same nesting). Added: rank 0, alone in its group, normalizes like
    ``nn.BatchNorm``; rank 1, outside the group, gets an error naming the problem."""
    (n0, all0, same0), (n1, all1, same1) = run_ranks(_nested_process_group, 2)
    assert n0 == n1 == 3 and all0 and all1
    assert same0 is True
    assert "expected this rank to be a member of its process_group" in same1


def _join_stop_iteration(path: str):
    with kernel_path(path):
        rank = dist.get_rank()
        torch.manual_seed(0)
        model = DDP(syncbn.convert_sync_batchnorm(_BatchNormNet()))
        x = torch.randn(10, 2, generator=seeded(rank))
        n, error = 0, None
        try:
            with model.join(throw_on_early_termination=True):
                for _ in range(10 if rank == 0 else 5):
                    model(x).pow(2).sum().backward()
                    _add_grad_step(model)
                    n += 1
        except RuntimeError as exc:
            error = str(exc)
        return n, error, _params(model.module), state_copy(model.module)


@pytest.mark.parametrize("path", PATHS)
def test_pytorch_ddp_join_stops_early_with_syncbn(run_ranks, path):
    """Ported from pytorch/pytorch torch/testing/_internal/distributed/distributed_test.py,
    ``test_ddp_uneven_inputs_stop_iteration_sync_bn``: with uneven inputs under
    ``DDP.join(throw_on_early_termination=True)`` (rank 0 has 10 batches, the others 5) a model
    with SyncBN stops on every rank after 5 iterations, with the rank that ran out raising
    "Rank r exhausted all inputs" and the others "Detected at least one rank that exhausted
    inputs", and the models stay identical across ranks. (``sum()`` of the softmax output has a
    zero gradient, so the loss here is the sum of squares.)"""
    results = run_ranks(_join_stop_iteration, 3, path)
    for rank, (n, error, params, state) in enumerate(results):
        assert n == 5, f"rank {rank} ran {n} iterations"
        expected = (
            "Detected at least one rank that exhausted inputs"
            if rank == 0
            else f"Rank {rank} exhausted all inputs"
        )
        assert error is not None and expected in error, error
        assert_close(params, results[0][2], rtol=0, atol=0)
        for key, value in results[0][3].items():
            assert_close(state[key], value, rtol=0, atol=0, msg=key)


def _gloo_ops(fn) -> list[str]:
    """The collectives the process group's backend ran during ``fn()`` (profiler events)."""
    with torch.profiler.profile() as profile:
        fn()
    return [e.name for e in profile.events() if e.name.startswith("gloo:")]


def _train_vs_eval(path: str):
    with kernel_path(path):
        rank = dist.get_rank()
        torch.manual_seed(rank)
        # track_running_stats=False: batch statistics in eval too, which must stay local
        trained = syncbn.SyncBatchNorm(2, momentum=0.99, track_running_stats=False)
        served = syncbn.SyncBatchNorm(2, momentum=0.99, track_running_stats=False)
        served_local = copy.deepcopy(served)
        ddp_trained, ddp_served = DDP(trained), DDP(served)

        def train():
            for _ in range(6):
                ddp_trained(torch.randn(10, 2, 4, 4)).sum().backward()

        result = {"train": _gloo_ops(train), "eval": None, "inference_equal": None}
        if rank == 0:  # only rank 0 evaluates: any collective would wait for rank 1 forever
            trained.eval()

            def evaluate():
                for _ in range(6):
                    trained(torch.randn(10, 2, 4, 4)).sum().backward()

            result["eval"] = _gloo_ops(evaluate)
            ddp_served.eval()
            served_local.eval()
            inputs = [torch.randn(10, 2, 4, 4) for _ in range(6)]
            result["inference_equal"] = all(
                torch.equal(ddp_served(x), served_local(x)) for x in inputs
            )
        return result


@pytest.mark.parametrize("path", PATHS)
def test_pytorch_ddp_sync_bn_training_vs_eval_and_inference(run_ranks, path):
    """Ported from pytorch/pytorch torch/testing/_internal/distributed/distributed_test.py,
    ``test_ddp_sync_bn_training_vs_eval`` (SyncBN with ``track_running_stats=False`` under DDP:
    training synchronizes, counted in the profiler; then rank 0 alone runs eval forward and
    backward and no collective runs; skipped upstream since pytorch#113620, the behaviour it
    asserts is still the documented one) and ``test_ddp_inference`` (only rank 0 runs 6 eval
    forwards of the DDP-wrapped layer, without hanging, equal to a local copy). The source
    counts ``all_gather`` (torch's SyncBN); ours runs ``all_reduce``. A short process-group
    timeout turns a regression (a hang) into a failure."""
    results = run_ranks(_train_vs_eval, 2, path, timeout=20)
    for r in results:
        # 6 forward and 6 backward all_reduces of the layer, plus DDP's own
        assert r["train"].count("gloo:all_reduce") >= 12, r["train"]
    assert results[0]["eval"] == []
    assert results[0]["inference_equal"] is True


# --------------------------------------------------------------- pytorch: test_c10d_common.py


def _empty_inputs(path: str, model_name: str):
    with kernel_path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        if model_name == "bn":
            model, shape, rows = nn.Sequential(nn.BatchNorm2d(2)), (2, 11, 13), 1
            cases = [(rows, True), (rows, False), (0, True), (0, False)]
        else:
            model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Linear(28, 2))
            shape, rows = (2, 30, 30), 3
            cases = [(rows, True), (0, True)]
        model = DDP(model)
        model = syncbn.convert_sync_batchnorm(model)  # converted after wrapping, as the source
        model.train()
        records = []
        for batch, needs_grad in cases:
            x = torch.zeros(0 if rank == 0 else batch, *shape, requires_grad=needs_grad)
            y = model(x)
            y.sum().backward()
            records.append({"y": y.detach(), "grads": grad_copies(model.module), "world": world})
            model.zero_grad(set_to_none=True)
        return records, sum(isinstance(m, syncbn.SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model_name", ["bn", "conv_bn_linear"])
def test_c10d_sync_batch_norm_empty_input(run_ranks, model_name, path):
    """Ported from pytorch/pytorch test/distributed/test_c10d_common.py,
    ``test_sync_batch_norm_only_empty_input`` (a lone BatchNorm2d(2); rank 0 empty, the others
    one zero image of 11x13; the input with and without ``requires_grad``; then every rank
    empty) and ``test_sync_batch_norm_empty_input`` (Conv2d, BatchNorm2d, Linear on 30x30 zero
    images, three per rank but none on rank 0; then every rank empty). The models are wrapped in
    DDP and converted afterwards, as the source does. Asserted as there: no NaN in outputs or
    parameter gradients. Added: outputs and gradients equal the plain model's on the concatenated
    batch (gradients divided by the world size, as DDP averages). Ported on 2 ranks for the lone
    BN (as the source) and 3 for the conv model."""
    world = 2 if model_name == "bn" else 3
    results = run_ranks(_empty_inputs, world, path, model_name)
    assert all(converted == 1 for _, converted in results)
    torch.manual_seed(0)
    if model_name == "bn":
        model, shape, rows = nn.Sequential(nn.BatchNorm2d(2)), (2, 11, 13), 1
        cases = [rows, rows, 0, 0]
    else:
        model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Linear(28, 2))
        shape, rows = (2, 30, 30), 3
        cases = [rows, 0]
    # The conv model's BN channels are constant (the conv bias): x_hat is 0 up to the rounding
    # of the mean, amplified by 1/sqrt(eps) ~ 316 in nn.BatchNorm and in ours alike, so its
    # gradients are compared to that noise level (the lone BN's zeros have an exact mean).
    atol = 1e-5 if model_name == "bn" else 2e-3
    for step, batch in enumerate(cases):
        model.zero_grad(set_to_none=True)
        y = model(torch.zeros((world - 1) * batch, *shape))
        y.sum().backward()
        ours = [r[step] for r, _ in results]
        got = torch.cat([r["y"] for r in ours])
        assert not got.isnan().any()
        assert_close(got, y.detach(), msg=f"step {step}")
        for r in ours:
            for g, ref in zip(r["grads"], grad_copies(model), strict=True):
                assert not g.isnan().any()
                assert_close(g, ref / world, rtol=1e-5, atol=atol, msg=f"step {step}")
