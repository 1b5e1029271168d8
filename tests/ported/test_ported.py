"""SyncBatchNorm cases ported from other projects' test suites, run against our layer.

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

import copy
import io
import itertools
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close
from torch.utils.data import DataLoader, DistributedSampler

import syncbn
from syncbn.testing import cuda_standin
from syncbn.testing.scenarios import closed_form

PATHS = ["cpu", "cuda_branch"]
EPS = 1e-5


# ------------------------------------------------------------------------------------ helpers


_path = cuda_standin.path


def _rows(sizes, rank: int) -> slice:
    """This rank's rows of a global batch split into consecutive blocks of ``sizes``."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _grads(module: nn.Module) -> list:
    return [None if p.grad is None else p.grad.detach().clone() for p in module.parameters()]


def _params(module: nn.Module) -> list:
    return [p.detach().clone() for p in module.parameters()]


def _add_grad_step(model: nn.Module) -> None:
    """distributed_test.py's ``_model_step``: ``param += grad``, then drop the gradient."""
    for p in model.parameters():
        if p.grad is not None:
            with torch.no_grad():
                p += p.grad
            p.grad = None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_bn(dims: int, channels: int, **kwargs) -> nn.Module:
    return {3: nn.BatchNorm1d, 2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims](
        channels, **kwargs
    )


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
    with _path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        base, in_shape, out_shape, fmt = _niter_setup(name)
        ddp = DDP(syncbn.convert_sync_batchnorm(copy.deepcopy(base)))
        total = sum(local_sizes)
        gen = _gen(1)
        x = torch.randn(total, *in_shape, generator=gen)
        target = torch.randn(total, *out_shape, generator=gen).contiguous(memory_format=fmt)
        rows = _rows(local_sizes, rank)
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
        record["state_base"] = _state(base)
        record["state_ddp"] = _state(ddp.module)
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
    with _path(path):
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
    with _path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        model = DDP(syncbn.convert_sync_batchnorm(_BatchNormNet().half()))
        gen = _gen(1)
        x = torch.randn(2 * world, 2, generator=gen).half()
        weights = torch.randn(2 * world, 4, generator=gen).half()
        rows = _rows((2,) * world, rank)
        out = model(x[rows])
        out.sum().backward()  # the source's backward: it must not fail on dtypes
        grad_dtypes = [p.grad.dtype for p in model.parameters()]
        model.zero_grad()
        model(x[rows]).mul(weights[rows]).sum().backward()  # one with non-zero gradients
        return {"out": out.detach(), "grad_dtypes": grad_dtypes, "grads": _grads(model.module)}


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
    gen = _gen(1)
    x = torch.randn(2 * world, 2, generator=gen).half().float()
    weights = torch.randn(2 * world, 4, generator=gen).half().float()
    out = reference(x)
    reference(x).mul(weights).sum().backward()
    assert_close(torch.cat([r["out"] for r in results]).float(), out, rtol=1e-2, atol=2e-3)
    for r in results:
        assert r["out"].dtype == torch.float16
        assert r["grad_dtypes"] == [torch.float16] * 4
        for ours, ref in zip(r["grads"], _grads(reference), strict=True):
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
    x = torch.randn(4, 3, 2, 2, generator=_gen(0))
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
    with _path(path):
        rank = dist.get_rank()
        torch.manual_seed(0)
        model = DDP(syncbn.convert_sync_batchnorm(_BatchNormNet()))
        x = torch.randn(10, 2, generator=_gen(rank))
        n, error = 0, None
        try:
            with model.join(throw_on_early_termination=True):
                for _ in range(10 if rank == 0 else 5):
                    model(x).pow(2).sum().backward()
                    _add_grad_step(model)
                    n += 1
        except RuntimeError as exc:
            error = str(exc)
        return n, error, _params(model.module), _state(model.module)


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
    with _path(path):
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
    with _path(path):
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
            records.append({"y": y.detach(), "grads": _grads(model.module), "world": world})
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
            for g, ref in zip(r["grads"], _grads(model), strict=True):
                assert not g.isnan().any()
                assert_close(g, ref / world, rtol=1e-5, atol=atol, msg=f"step {step}")


# ------------------------------------------------------------------- pytorch: test/test_nn.py


def _stats_not_tracked(path: str):
    with _path(path):
        rank = dist.get_rank()
        bn = syncbn.SyncBatchNorm(4)
        bn.track_running_stats = False  # buffers exist but must not move
        before = _state(bn)
        y = bn(torch.rand(32, 4, generator=_gen(10))[_rows((16, 16), rank)])
        return before, _state(bn), y.detach()


@pytest.mark.parametrize("path", PATHS)
def test_nn_buffers_not_updated_when_stats_are_not_tracked(run_ranks, path):
    """Ported from pytorch/pytorch test/test_nn.py,
    ``test_batchnorm_buffer_update_when_stats_are_not_tracked``: a layer built with running
    statistics whose ``track_running_stats`` is then set to False updates none of its buffers in
    a training forward (num_batches_tracked included). The (32, 4) input is split over 2 ranks;
    added: the output is ``nn.BatchNorm1d``'s with batch statistics of the whole batch."""
    reference = nn.BatchNorm1d(4)
    reference.track_running_stats = False
    expected = reference(torch.rand(32, 4, generator=_gen(10)))
    results = run_ranks(_stats_not_tracked, 2, path)
    for before, after, _ in results:
        for key, value in before.items():
            assert torch.equal(after[key], value), key
    assert_close(torch.cat([y for *_, y in results]), expected.detach())


def _one_value_per_channel(path: str):
    with _path(path):
        x = torch.rand(10, generator=_gen(0))[None, :, None]  # (1, 10, 1): one value per channel
        try:
            syncbn.SyncBatchNorm(10)(x if dist.get_rank() == 0 else x[:0])
        except (ValueError, RuntimeError) as error:
            return type(error).__name__, str(error)
        return None, "no error"


@pytest.mark.parametrize("path", PATHS)
def test_nn_one_value_per_channel_is_an_error(run_ranks, path):
    """Ported from pytorch/pytorch test/test_nn.py,
    ``test_batchnorm_raises_error_if_less_than_one_value_per_channel``: an input of shape
    (1, 10, 1) in training raises ValueError. Here the global batch is that input on rank 0 and
    nothing on rank 1: every rank raises. On the CUDA branch the check is a device-side
    assertion (README, Failing loudly), which on CPU raises RuntimeError with the same text."""
    for kind, message in run_ranks(_one_value_per_channel, 2, path):
        assert "expected more than 1 value per channel" in message, message
        assert kind == ("ValueError" if path == "cpu" else "RuntimeError")


NHWC_SHAPES = [(4, 8, 5, 5), (4, 1, 9, 9), (4, 9, 1, 1)]
NHWC_DTYPES = [("float32", False), ("bfloat16", False), ("bfloat16", True)]


def _nhwc_data(case: int, shape, dtype_name: str, mixed: bool):
    gen = _gen(100 + case)
    dtype = getattr(torch, dtype_name)
    x = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.rand(shape[1], generator=gen)
    bias = torch.rand(shape[1], generator=gen)
    return x, grad, weight, bias


def _nhwc_layer(bn: nn.Module, x, weight, bias, mixed: bool) -> nn.Module:
    """``bn`` in ``x``'s dtype with the case's parameters; float32 parameters when ``mixed``."""
    bn = bn.to(x.dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn.float() if mixed else bn


def _nhwc(path: str):
    with _path(path):
        rank = dist.get_rank()
        records = []
        cases = itertools.product(NHWC_SHAPES, NHWC_DTYPES)
        for case, (shape, (dtype_name, mixed)) in enumerate(cases):
            x, grad, weight, bias = _nhwc_data(case, shape, dtype_name, mixed)
            bn = _nhwc_layer(syncbn.SyncBatchNorm(shape[1]), x, weight, bias, mixed)
            rows = _rows((2, 2), rank)
            xl = x[rows].contiguous(memory_format=torch.channels_last).requires_grad_()
            out = bn(xl)
            out.backward(grad[rows].contiguous(memory_format=torch.channels_last))
            records.append(
                {
                    "y": out.detach(),
                    "channels_last": out.is_contiguous(memory_format=torch.channels_last),
                    "dx": xl.grad,
                    "grads": _grads(bn),
                }
            )
        return records


@pytest.mark.parametrize("path", PATHS)
def test_nn_batchnorm_nhwc(run_ranks, path):
    """Ported from pytorch/pytorch test/test_nn.py, ``test_batchnorm_nhwc_cpu``: channels_last
    input of shapes (4, 8, H, W), (4, 1, 9, 9) (one channel) and (4, 9, 1, 1), in float32,
    bfloat16, and bfloat16 input with float32 parameters; the output stays channels_last and
    output, input gradient and parameter gradients equal ``nn.BatchNorm2d`` on the contiguous
    input. Here the batch of 4 is split over 2 ranks (parameter gradients summed over ranks) and
    the first shape is 5x5 instead of 10x10; the tolerance is bfloat16's where it is used."""
    results = run_ranks(_nhwc, 2, path)
    cases = list(itertools.product(NHWC_SHAPES, NHWC_DTYPES))
    for i, (shape, (dtype_name, mixed)) in enumerate(cases):
        x, grad, weight, bias = _nhwc_data(i, shape, dtype_name, mixed)
        reference = _nhwc_layer(nn.BatchNorm2d(shape[1]), x, weight, bias, mixed)
        x = x.clone().requires_grad_()
        out = reference(x)
        out.backward(grad)
        where = f"{shape} {dtype_name} mixed={mixed}"
        tol = {} if dtype_name == "float32" else {"rtol": 2e-2, "atol": 3e-2}
        ranks = [r[i] for r in results]
        assert all(r["channels_last"] for r in ranks), where
        assert_close(torch.cat([r["y"] for r in ranks]), out.detach(), **tol, msg=where)
        assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, **tol, msg=where)
        for k, ref in enumerate(_grads(reference)):
            total = sum(r["grads"][k].float() for r in ranks)
            assert_close(total, ref.float(), **tol, msg=where)


def _non_contiguous(path: str):
    with _path(path):
        x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
        bn = syncbn.SyncBatchNorm(2)
        with torch.no_grad():
            bn.weight.uniform_(generator=_gen(3))
            bn.bias.uniform_(generator=_gen(4))
        records = []
        for training in (True, False):
            bn.train(training)
            y = bn(x)
            records.append((y, y.is_contiguous(memory_format=torch.channels_last)))
        return records


@pytest.mark.parametrize("path", PATHS)
def test_nn_batchnorm_non_contiguous(run_ranks, path):
    """Ported from pytorch/pytorch test/test_nn.py, ``test_batchnorm_non_contig_cpu``: a
    permuted (non-contiguous, channels-last-strided) input of shape (1, 2, 3, 1) gives a
    channels_last output equal to ``nn.BatchNorm2d`` on the contiguous input. The source runs
    eval mode; here also training mode, with the same tensor on 2 ranks (a global batch of 2)."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    reference = nn.BatchNorm2d(2)
    with torch.no_grad():
        reference.weight.uniform_(generator=_gen(3))
        reference.bias.uniform_(generator=_gen(4))
    expected_train = reference(torch.cat([x, x]).contiguous())[:1]
    reference.eval()
    expected_eval = reference(x.contiguous())
    for records in run_ranks(_non_contiguous, 2, path):
        (y_train, cl_train), (y_eval, cl_eval) = records
        assert cl_train and cl_eval
        assert_close(y_train, expected_train)
        assert_close(y_eval, expected_eval)


def _half_input(path: str):
    with _path(path):
        rank = dist.get_rank()
        gen = _gen(5)
        x = torch.randn(8, 3, 6, 6, generator=gen).half()
        grad = torch.randint(1, 10, (4, 3, 2, 2), generator=gen).half()
        xi = torch.randint(1, 10, (4, 3, 2, 2), generator=gen).half()
        rows = _rows((4, 4), rank)
        # test_batchnorm_nonaffine_cuda_half_input: half input, float32 statistics, no affine
        m = syncbn.SyncBatchNorm(3, affine=False)
        train_out = m(x[rows])
        m.eval()
        eval_out = m(x[rows])
        # test_batchnorm_cudnn_half: a half module vs a float module on half integer input
        rows2 = _rows((2, 2), rank)
        half = syncbn.SyncBatchNorm(3).half()
        inp = xi[rows2].clone().requires_grad_()
        out_half = half(inp)
        out_half.backward(grad[rows2])
        grad_half = inp.grad.clone()
        inp.grad = None
        out_float = half.float()(inp)
        out_float.backward(grad[rows2])
        return {
            "train": train_out,
            "eval": eval_out,
            "running": (m.running_mean.clone(), m.running_var.clone()),
            "out_half": out_half.detach(),
            "out_float": out_float.detach(),
            "grad_half": grad_half,
            "grad_float": inp.grad.clone(),
        }


@pytest.mark.parametrize("path", PATHS)
def test_nn_half_input(run_ranks, path):
    """Ported from pytorch/pytorch test/test_nn.py, ``test_batchnorm_nonaffine_cuda_half_input``
    (float16 input, ``affine=False`` with float32 running statistics: the output is float16 in
    training and in eval) and ``test_batchnorm_cudnn_half`` (integer-valued float16 input through
    a ``.half()`` layer and through the same layer made ``.float()``: both outputs float16 and
    equal, input gradients equal to 1e-3). Split over 2 ranks; added: the values against
    ``nn.BatchNorm2d`` in float32 on the whole batch."""
    results = run_ranks(_half_input, 2, path)
    gen = _gen(5)
    x = torch.randn(8, 3, 6, 6, generator=gen).half().float()
    reference = nn.BatchNorm2d(3, affine=False)
    expected_train = reference(x)
    reference.eval()
    expected_eval = reference(x)
    for r in results:
        for key in ("train", "eval", "out_half", "out_float"):
            assert r[key].dtype == torch.float16, key
        assert_close(r["running"][0], reference.running_mean)
        assert_close(r["running"][1], reference.running_var)
        assert_close(r["out_half"], r["out_float"], rtol=2e-3, atol=2e-3)
        assert_close(r["grad_half"].float(), r["grad_float"].float(), rtol=0, atol=1e-3)
    tol = {"rtol": 2e-3, "atol": 3e-3}
    assert_close(torch.cat([r["train"] for r in results]).float(), expected_train, **tol)
    assert_close(torch.cat([r["eval"] for r in results]).float(), expected_eval, **tol)


# ----------------------------------------------------------- NVIDIA/apex synced_batchnorm tests


def _apex_data(shape, seed: int, dtype=torch.float32):
    gen = _gen(seed)
    inp = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    return inp, grad, weight, bias


APEX_SINGLE_SHAPE = (5, 10, 16, 16)


def _apex_single(path: str, force_sync: bool):
    with _path(path):
        inp, grad, weight, bias = _apex_data(APEX_SINGLE_SHAPE, 1)
        records = {}
        for fmt in (torch.contiguous_format, torch.channels_last):
            sbn = syncbn.SyncBatchNorm(10, momentum=1.0)
            sbn._always_sync = force_sync
            with torch.no_grad():
                sbn.weight.copy_(weight)
                sbn.bias.copy_(bias)
            x = inp.clone(memory_format=fmt).requires_grad_()
            y = sbn(x)
            y.backward(grad.contiguous(memory_format=fmt))
            _, mean, var, _ = syncbn.sync_batch_norm(inp, weight, bias)
            records[str(fmt)] = {
                "y": y.detach(),
                "grad_input": x.grad,
                "grad_weight": sbn.weight.grad,
                "grad_bias": sbn.bias.grad,
                "running_mean": sbn.running_mean.clone(),
                "running_var": sbn.running_var.clone(),
                "mean": mean,
                "var": var,
            }
        return records


@pytest.mark.parametrize("path, force_sync", [("cpu", False), ("cpu", True), ("cuda_branch", True)])
def test_apex_single_rank_againstclosed_form(run_ranks, path, force_sync):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/single_gpu_unit_test.py and
    python_single_gpu_unit_test.py: one process, input (5, 10, 16, 16), momentum 1.0; mean,
    biased variance, output, input/weight/bias gradients and running statistics (unbiased
    variance) against apex's float64 closed-form formulas, within apex's 1e-5; and the same with
    a channel-last layout (apex's ``channel_last=True``: here a channels_last tensor). Run on a
    one-rank group both as it is (the layer is ``nn.BatchNorm``) and with the synchronized path
    forced (``_always_sync``); mean and variance come from ``syncbn.sync_batch_norm``."""
    results = run_ranks(_apex_single, 1, path, force_sync)[0]
    inp, grad, weight, bias = _apex_data(APEX_SINGLE_SHAPE, 1)
    ref = closed_form(inp, grad, weight, bias)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for fmt, r in results.items():
        for key, expected in [
            ("mean", ref["mean"]),
            ("var", ref["var"]),
            ("y", ref["y"]),
            ("grad_input", ref["grad_input"]),
            ("grad_weight", ref["grad_weight"]),
            ("grad_bias", ref["grad_bias"]),
            ("running_mean", ref["mean"]),
            ("running_var", ref["unbiased_var"]),
        ]:
            assert_close(r[key].double(), expected, **tol, msg=f"{fmt}: {key}")


APEX_TWO_SHAPE = (16, 10, 12, 12)
APEX_ERROR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.float64: 1e-8}


def _apex_two(path: str, dtype_name: str):
    with _path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        dtype = getattr(torch, dtype_name)
        inp, grad, weight, bias = _apex_data(APEX_TWO_SHAPE, 18, dtype)
        n = APEX_TWO_SHAPE[0]
        rows = slice(rank * n // world, (rank + 1) * n // world)
        sbn = syncbn.SyncBatchNorm(10, momentum=1.0).to(dtype)
        with torch.no_grad():
            sbn.weight.copy_(weight)
            sbn.bias.copy_(bias)
        _, mean, var, _ = syncbn.sync_batch_norm(inp[rows], weight, bias)
        return {"mean": mean, "var": var, **_one_ddp_sgd_step(sbn, inp[rows], grad[rows])}


def _one_ddp_sgd_step(sbn, x, grad) -> dict:
    """apex's step: the layer under DDP over the whole world, one backward of ``grad``, SGD with
    lr 1.0; the layer's output, input gradient, running statistics and parameters after it."""
    ddp = DDP(sbn)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    x = x.clone().requires_grad_()
    y = ddp(x)
    y.backward(grad)
    opt.step()
    return {
        "y": y.detach(),
        "grad_input": x.grad,
        "running_mean": sbn.running_mean.clone(),
        "running_var": sbn.running_var.clone(),
        "weight": sbn.weight.detach().clone(),
        "bias": sbn.bias.detach().clone(),
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "float64"])
def test_apex_two_ranks_againstclosed_form(run_ranks, dtype_name, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/two_gpu_unit_test.py (run by
    unit_test.sh in fp32 and ``--fp16``; ``--fp64`` exists too): the batch split in two
    consecutive halves, parameters and input in the dtype (``model.half()``/``.double()``),
    momentum 1.0, DDP and one SGD step with lr 1.0; global mean and biased variance, each rank's
    output and input gradient, running statistics and the parameters after the step (BN's
    gradient divided by the world size, apex's compensation for DDP's averaging) against the
    float64 closed form, with apex's errors (1e-5, 1e-3, 1e-8 as rtol and atol). Shrunk from
    (32, 10, 40, 40) to (16, 10, 12, 12)."""
    world = 2
    dtype = getattr(torch, dtype_name)
    results = run_ranks(_apex_two, world, path, dtype_name)
    inp, grad, weight, bias = _apex_data(APEX_TWO_SHAPE, 18, dtype)
    ref = closed_form(inp, grad, weight, bias)
    err = APEX_ERROR[dtype]
    tol = {"rtol": err, "atol": err}
    n = APEX_TWO_SHAPE[0]
    for rank, r in enumerate(results):
        rows = slice(rank * n // world, (rank + 1) * n // world)
        checks = [
            ("mean", ref["mean"]),
            ("var", ref["var"]),
            ("y", ref["y"][rows]),
            ("grad_input", ref["grad_input"][rows]),
            ("running_mean", ref["mean"]),
            ("running_var", ref["unbiased_var"]),
            ("weight", weight.double() - ref["grad_weight"] / world),
            ("bias", bias.double() - ref["grad_bias"] / world),
        ]
        for key, expected in checks:
            assert_close(r[key].double(), expected, **tol, msg=f"rank {rank}: {key}")


def _apex_conv_model() -> nn.Module:
    torch.manual_seed(2809)
    return nn.Sequential(nn.Conv2d(3, 6, 3, 1, 1), nn.BatchNorm2d(6))


def _apex_diff_batch_data(sizes):
    gen = _gen(2809)
    x = [
        torch.randn(n, 3, 8, 8, generator=gen) * (50.0 if r == 0 else 1.0)
        for r, n in enumerate(sizes)
    ]
    g = [torch.randint(0, 10, (n, 6, 8, 8), generator=gen).float() / 10.0 for n in sizes]
    return x, g


def _apex_diff_batch(path: str, sizes):
    with _path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        ddp = DDP(syncbn.convert_sync_batchnorm(_apex_conv_model()))
        xs, gs = _apex_diff_batch_data(sizes)
        x = xs[rank].clone().requires_grad_()
        out = ddp(x)
        out.backward(gs[rank] * world / sum(sizes))  # apex's weighted_gradient
        bn = ddp.module[1]
        return {
            "y": out.detach(),
            "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone(),
            "bn_weight_grad": bn.weight.grad.clone(),
            "conv_weight_grad": ddp.module[0].weight.grad.clone(),
        }


@pytest.mark.parametrize("path", PATHS)
def test_apex_two_ranks_different_batch_sizes(run_ranks, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/
    two_gpu_test_different_batch_size.py: Conv2d(3, 6) then SyncBN(6) under DDP, rank 0 with 16
    images scaled by 50 and rank 1 with 8; the upstream gradient weighted by W/N so that DDP's
    average is the gradient of the whole batch. Output, running statistics, BN weight gradient
    (1e-6) and conv weight gradient (1e-5) against the same model on the concatenated batch."""
    sizes = (16, 8)
    results = run_ranks(_apex_diff_batch, 2, path, sizes)
    model = _apex_conv_model()
    xs, gs = _apex_diff_batch_data(sizes)
    out = model(torch.cat(xs))
    out.backward(torch.cat(gs) / sum(sizes))
    tol = {"rtol": 1e-5, "atol": 1e-5}
    assert_close(torch.cat([r["y"] for r in results]), out.detach(), **tol)
    for r in results:
        assert_close(r["running_mean"], model[1].running_mean, **tol)
        assert_close(r["running_var"], model[1].running_var, **tol)
        assert_close(r["bn_weight_grad"], model[1].weight.grad, rtol=1e-6, atol=1e-6)
        assert_close(r["conv_weight_grad"], model[0].weight.grad, **tol)


APEX_GROUP_SHAPE = (8, 10, 6, 6)


def _apex_group_data(group_id: int):
    """apex seeds the data by group (18 + local_rank // group_size); the parameters here come
    from one seed on every rank (apex's differ per group until DDP broadcasts rank 0's)."""
    inp, grad, _, _ = _apex_data(APEX_GROUP_SHAPE, 18 + group_id)
    _, _, weight, bias = _apex_data(APEX_GROUP_SHAPE, 99)
    return inp, grad, weight, bias


def _apex_groups(path: str, group_size: int):
    with _path(path):
        rank = dist.get_rank()
        group = syncbn.new_sync_group(group_size)
        inp, grad, weight, bias = _apex_group_data(rank // group_size)
        n = APEX_GROUP_SHAPE[0]
        local = rank % group_size
        rows = slice(local * n // group_size, (local + 1) * n // group_size)
        sbn = syncbn.SyncBatchNorm(10, momentum=1.0, process_group=group)
        with torch.no_grad():
            sbn.weight.copy_(weight)
            sbn.bias.copy_(bias)
        return _one_ddp_sgd_step(sbn, inp[rows], grad[rows])  # DDP over the whole world


@pytest.mark.parametrize("path", PATHS)
def test_apex_process_groups(run_ranks, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/test_groups.py (group_size=2
    on 4 processes): each group of 2 consecutive ranks normalizes its own batch (data seeded by
    group), DDP averages gradients over all 4 ranks, momentum 1.0, one SGD step with lr 1.0.
    Each rank's output and input gradient and its group's running statistics against the float64
    closed form of its group's batch (apex's 1e-5); the parameters after the step move by the
    world average of both groups' gradients (apex's bn-vs-sbn comparison). Shrunk from
    (32, 10, 40, 40) to (8, 10, 6, 6)."""
    world, group_size = 4, 2
    results = run_ranks(_apex_groups, world, path, group_size)
    n = APEX_GROUP_SHAPE[0]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    refs = [closed_form(*_apex_group_data(g)) for g in range(world // group_size)]
    _, _, weight, bias = _apex_group_data(0)
    for rank, r in enumerate(results):
        ref = refs[rank // group_size]
        local = rank % group_size
        rows = slice(local * n // group_size, (local + 1) * n // group_size)
        for key, expected in [
            ("y", ref["y"][rows]),
            ("grad_input", ref["grad_input"][rows]),
            ("running_mean", ref["mean"]),
            ("running_var", ref["unbiased_var"]),
            ("weight", weight.double() - sum(f["grad_weight"] for f in refs) / world),
            ("bias", bias.double() - sum(f["grad_bias"] for f in refs) / world),
        ]:
            assert_close(r[key].double(), expected, **tol, msg=f"rank {rank}: {key}")


def _apex_1d(path: str):
    with _path(path):
        rank = dist.get_rank()
        model = syncbn.SyncBatchNorm(4)
        with torch.no_grad():
            model.weight.uniform_(generator=_gen(1))
            model.bias.uniform_(generator=_gen(2))
        initial = _state(model)
        data = torch.rand(8, 4, generator=_gen(3))
        out = model(data[_rows((4, 4), rank)])
        return initial, out.detach(), _state(model)


@pytest.mark.parametrize("path", PATHS)
def test_apex_batchnorm1d(run_ranks, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/test_batchnorm1d.py: a
    SyncBatchNorm(4) with uniform weight and bias on (8, 4) input (here split over 2 ranks);
    ``nn.BatchNorm1d`` loaded with its state_dict gives the same output and running
    statistics."""
    results = run_ranks(_apex_1d, 2, path)
    reference = nn.BatchNorm1d(4)
    reference.load_state_dict(results[0][0])
    expected = reference(torch.rand(8, 4, generator=_gen(3)))
    assert_close(torch.cat([r[1] for r in results]), expected.detach())
    for _, _, state in results:
        for key, value in reference.state_dict().items():
            assert_close(state[key], value, msg=key)


# ------------------------------------------------------- open-mmlab/mmcv tests/test_ops/test_syncbn


MMCV_WEIGHT = torch.tensor([0.2, 0.5, 0.7])


def _mmcv_data(rows: int, half: bool):
    gen = _gen(9)
    x = torch.rand(rows, 3, 2, 3, generator=gen)
    y_bp = torch.rand(rows, 3, 2, 3, generator=gen)
    return (x.half(), y_bp.half()) if half else (x, y_bp)


def _mmcv_train(path: str, half: bool, rows: int):
    with _path(path):
        rank = dist.get_rank()
        x, y_bp = _mmcv_data(rows, half)
        local = slice(rank * 4, rank * 4 + 4)
        results = {}
        for size in (1, 2, 4):
            group = syncbn.new_sync_group(size)
            sbn = syncbn.SyncBatchNorm(3, process_group=group)  # float32: mixed with half input
            with torch.no_grad():
                sbn.weight.copy_(MMCV_WEIGHT)
            sx = x[local].clone().requires_grad_()
            sy = sbn(sx)
            sy.backward(y_bp[local])
            param_grads = []
            for p in (sbn.weight, sbn.bias):  # what DDP within the group makes of them
                g = p.grad.clone()
                if size > 1:
                    dist.all_reduce(g, group=group)
                param_grads.append(g / size)
            results[size] = {
                "y": sy.detach(),
                "x_grad": sx.grad,
                "w_grad": param_grads[0],
                "b_grad": param_grads[1],
                "running_mean": sbn.running_mean.clone(),
                "running_var": sbn.running_var.clone(),
            }
        return results


def _check_mmcv(results, rows: int, half: bool):
    x, y_bp = _mmcv_data(rows, half)
    x, y_bp = x.float(), y_bp.float()
    for size in (1, 2, 4):
        for rank, r in enumerate(results):
            r = r[size]
            group = rank // size
            per = 4 * size
            gx = x[group * per : (group + 1) * per].clone().requires_grad_()
            bn = nn.BatchNorm2d(3)
            with torch.no_grad():
                bn.weight.copy_(MMCV_WEIGHT)
            y = bn(gx)
            y.backward(y_bp[group * per : (group + 1) * per])
            mine = slice((rank % size) * 4, (rank % size) * 4 + 4)
            where = f"group size {size}, rank {rank}"
            tol = {"rtol": 1e-3, "atol": 1e-8}
            assert_close(r["running_mean"], bn.running_mean, **tol, msg=where)
            assert_close(r["running_var"], bn.running_var, **tol, msg=where)
            assert_close(r["y"].float(), y.detach()[mine], **tol, msg=where)
            assert_close(r["w_grad"], bn.weight.grad / size, **tol, msg=where)
            assert_close(r["b_grad"], bn.bias.grad / size, **tol, msg=where)
            assert_close(r["x_grad"].float(), gx.grad[mine], rtol=1e-2, atol=1e-8, msg=where)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_mmcv_syncbn_groups_of_1_2_4(run_ranks, half, path):
    """Ported from open-mmlab/mmcv tests/test_ops/test_syncbn.py, ``test_syncbn_1/2/4`` and
    ``test_syncbn_1/2/4_half`` (``_test_syncbn_train``): 4 ranks with 4 images each of a shared
    (16, 3, 2, 3) batch, synchronized in groups of 1, 2 and 4, weight (0.2, 0.5, 0.7), float32
    parameters with float32 or float16 input; running statistics, outputs, parameter and input
    gradients against ``nn.BatchNorm2d`` on the group's batch with mmcv's tolerances (rtol 1e-3,
    input gradient 1e-2). mmcv's layer all-reduces the weight and bias gradients and divides by
    the group size; ours keeps each rank's share, as ``nn.SyncBatchNorm`` does, and DDP's
    averaging gives the same number: here that average is taken over the group and compared with
    mmcv's expectation (BN's gradient / group size)."""
    _check_mmcv(run_ranks(_mmcv_train, 4, path, half, 16), 16, half)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_mmcv_syncbn_empty_groups_of_1_2_4(run_ranks, half, path):
    """Ported from open-mmlab/mmcv tests/test_ops/test_syncbn.py, ``test_syncbn_empty_1/2/4``
    and their ``_half`` variants (``_test_syncbn_empty_train``, mmcv's ``stats_mode='N'``): every
    rank empty, groups of 1, 2 and 4; like ``nn.BatchNorm2d`` on the empty batch: empty output
    and input gradient, zero parameter gradients, running statistics untouched."""
    _check_mmcv(run_ranks(_mmcv_train, 4, path, half, 0), 0, half)


# ------------------------------------------ facebookresearch/fairscale test_sync_batchnorm.py

FAIRSCALE_SHAPES = [(4, 3, 4), (4, 3, 4, 4), (4, 3, 4, 4, 4)]


def _fairscale_single(path: str, force_sync: bool):
    with _path(path):
        torch.manual_seed(dist.get_rank())
        records = []
        for shape in FAIRSCALE_SHAPES:
            x = torch.randn(shape)
            yh = torch.randn_like(x)
            sides = {}
            for name, bn in (("torch", _reference_bn(len(shape), 3)), ("ours", None)):
                if bn is None:
                    bn = syncbn.SyncBatchNorm(3)
                    bn._always_sync = force_sync
                xx = x.detach().clone().requires_grad_()
                y = bn(xx)
                y.backward(yh)
                sides[name] = {
                    "y": y.detach(),
                    "x_grad": xx.grad,
                    "weight_grad": bn.weight.grad,
                    "bias_grad": bn.bias.grad,
                    **_state(bn),
                }
            records.append(sides)
        return records


@pytest.mark.parametrize("path, force_sync", [("cpu", False), ("cpu", True), ("cuda_branch", True)])
def test_fairscale_parity_with_batchnorm_on_one_rank(run_ranks, path, force_sync):
    """Ported from facebookresearch/fairscale tests/experimental/nn/test_sync_batchnorm.py,
    ``parity1d_bn``, ``parity2d_bn``, ``parity3d_bn`` (``world_size=1``): in a one-rank process
    group the layer matches ``BatchNorm1d/2d/3d`` on (4, 3, 4[, 4[, 4]]) input: output, running
    statistics, weight and bias gradients (``allclose`` defaults) and input gradient (atol 1e-7).
    Run as it is (then it is ``nn.BatchNorm``) and with the synchronized path forced."""
    for i, sides in enumerate(run_ranks(_fairscale_single, 1, path, force_sync)[0]):
        ours, ref = sides["ours"], sides["torch"]
        for key, value in ref.items():
            tol = {"rtol": 1e-5, "atol": 1e-7 if key == "x_grad" else 1e-8}
            assert_close(ours[key], value, **tol, msg=f"{FAIRSCALE_SHAPES[i]}: {key}")


def _fairscale_data(rank: int, shape, scaled: bool):
    torch.manual_seed(rank)
    x = torch.randn(shape) * (rank if scaled else 1)
    return x, torch.randn_like(x)


def _fairscale_ddp(path: str):
    with _path(path):
        rank = dist.get_rank()
        records = []
        for shape, scaled in zip(FAIRSCALE_SHAPES, (False, True, True), strict=True):
            x, yh = _fairscale_data(rank, shape, scaled)
            ddp = DDP(syncbn.SyncBatchNorm(3))
            xx = x.clone().requires_grad_()
            y = ddp(xx)
            y.backward(yh)
            bn = ddp.module
            records.append(
                {
                    "y": y.detach(),
                    "x_grad": xx.grad,
                    "weight_grad": bn.weight.grad,
                    "bias_grad": bn.bias.grad,
                    "running_mean": bn.running_mean.clone(),
                    "running_var": bn.running_var.clone(),
                }
            )
        return records


@pytest.mark.parametrize("path", PATHS)
def test_fairscale_parity_under_ddp(run_ranks, path):
    """Ported from facebookresearch/fairscale tests/experimental/nn/test_sync_batchnorm.py,
    ``parity1d_syncbn``, ``parity2d_syncbn``, ``parity3d_syncbn``: under DDP, input
    ``randn(shape) * rank`` (so rank 0 holds only zeros; not scaled for 1d) and a random upstream
    gradient. The source compares with ``nn.SyncBatchNorm`` (CUDA only); here with
    ``nn.BatchNorm*d`` on the concatenated batch, gradients averaged over ranks as DDP does:
    output and running statistics (``allclose`` defaults), input and parameter gradients (atol
    1e-6: the source compares two CUDA kernels of one algorithm; against ``nn.BatchNorm``'s CPU
    summation order a weight gradient of 0.0137, a sum of 16 terms of size 1, differs by
    2.7e-7)."""
    world = 2
    results = run_ranks(_fairscale_ddp, world, path)
    for i, (shape, scaled) in enumerate(zip(FAIRSCALE_SHAPES, (False, True, True), strict=True)):
        data = [_fairscale_data(r, shape, scaled) for r in range(world)]
        x = torch.cat([d[0] for d in data]).requires_grad_()
        bn = _reference_bn(len(shape), 3)
        y = bn(x)
        y.backward(torch.cat([d[1] for d in data]))
        tol = {"rtol": 1e-5, "atol": 1e-8}
        where = str(shape)
        assert_close(torch.cat([r[i]["y"] for r in results]), y.detach(), **tol, msg=where)
        assert_close(
            torch.cat([r[i]["x_grad"] for r in results]), x.grad, rtol=1e-5, atol=1e-6, msg=where
        )
        for r in results:
            assert_close(r[i]["running_mean"], bn.running_mean, **tol, msg=where)
            assert_close(r[i]["running_var"], bn.running_var, **tol, msg=where)
            gtol = {"rtol": 1e-5, "atol": 1e-6}
            assert_close(r[i]["weight_grad"], bn.weight.grad / world, **gtol, msg=where)
            assert_close(r[i]["bias_grad"], bn.bias.grad / world, **gtol, msg=where)


# ---------------------------------------------------- Lightning-AI: test_sync_batchnorm_parity


class _SyncBNModule(nn.Module):
    """Lightning's ``SyncBNModule``: BatchNorm1d(1) under ``torch.no_grad()``, then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_layer = nn.BatchNorm1d(1)
        self.linear = nn.Linear(1, 10)

    def forward(self, batch):
        with torch.no_grad():
            out_bn = self.bn_layer(batch)
        return self.linear(out_bn).sum(), out_bn.detach()


def _lightning_parity(path: str, batch_size: int, steps: int):
    with _path(path):
        torch.manual_seed(3)
        ddp = DDP(syncbn.convert_sync_batchnorm(_SyncBNModule()), find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.02)
        dataset = torch.arange(64, dtype=torch.float).view(-1, 1)
        sampler = DistributedSampler(
            dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=False
        )
        outputs = []
        for step, batch in enumerate(DataLoader(dataset, sampler=sampler, batch_size=batch_size)):
            opt.zero_grad()
            loss, out_bn = ddp(batch)
            outputs.append(out_bn)
            loss.backward()
            opt.step()
            if step == steps - 1:
                break
        return torch.stack(outputs)


@pytest.mark.parametrize("path", PATHS)
def test_lightning_sync_batchnorm_parity(run_ranks, path):
    """Ported from Lightning-AI's tests (tests_pytorch/.../test_sync_batchnorm_parity.py,
    ``test_sync_batchnorm_parity``): 2 ranks with batches of 4 drawn by a ``DistributedSampler``
    without shuffling (rank r gets samples r, r + 2, ...) from ``arange(64)``, the BN layer run
    under ``torch.no_grad()`` in training mode, 3 SGD steps; each rank's BN outputs equal the
    single-process BatchNorm1d's with batches of 8, every other row."""
    world, steps = 2, 3
    results = run_ranks(_lightning_parity, world, path, 4, steps)
    torch.manual_seed(3)
    model = _SyncBNModule()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    dataset = torch.arange(64, dtype=torch.float).view(-1, 1)
    outputs = []
    for step, batch in enumerate(DataLoader(dataset, batch_size=4 * world)):
        opt.zero_grad()
        loss, out_bn = model(batch)
        outputs.append(out_bn)
        loss.backward()
        opt.step()
        if step == steps - 1:
            break
    single = torch.stack(outputs)
    for rank, ours in enumerate(results):
        assert_close(ours, single[:, rank::world])


# ------------------------------------- keras-team/keras batch_normalization_test.py (and masks)

# (global input shape in PyTorch's (N, C, *) layout, memory format, keras id)
KERAS_SHAPES = {
    "axis1_5x2x3": ((5, 2, 3), torch.contiguous_format),
    "axis-1_5x2x3": ((5, 3, 2), torch.contiguous_format),
    "axis1_5x3x3x2": ((5, 3, 3, 2), torch.contiguous_format),
    "axis-1_5x3x3x2": ((5, 2, 3, 3), torch.channels_last),
}
KERAS_SPLIT = (3, 2)


def _keras_input(shape, fmt):
    x = torch.randn(shape, generator=_gen(7)) * 10.0 + 5.0  # centred on 5, std 10
    return x.contiguous(memory_format=fmt)


def _keras_sequence(bn: nn.Module, x: torch.Tensor) -> dict:
    """test_correctness's calls: three chained training calls, then inference before training
    on ``x``, training on ``x`` twice, inference after."""
    out = x
    for _ in range(3):
        out = bn(out)
    record = {"chained": out, "running_mean": bn.running_mean.clone()}
    record["running_var"] = bn.running_var.clone()
    bn.eval()
    record["inference_before"] = bn(x)
    bn.train()
    record["training"] = bn(x)
    record["training_again"] = bn(x)
    bn.eval()
    record["inference_after"] = bn(x)
    bn.train()
    return {k: v.detach() for k, v in record.items()}


KERAS_INITS = list(itertools.product((0.0, 1.0), (0.0, 1.0)))


def _keras_correctness(path: str, shape_id: str):
    with _path(path):
        shape, fmt = KERAS_SHAPES[shape_id]
        x = _keras_input(shape, fmt)[_rows(KERAS_SPLIT, dist.get_rank())]
        records = []
        for mean_init, var_init in KERAS_INITS:
            bn = syncbn.SyncBatchNorm(shape[1], momentum=1.0)
            bn.running_mean.fill_(mean_init)
            bn.running_var.fill_(var_init)
            records.append(_keras_sequence(bn, x))
        return records


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape_id", KERAS_SHAPES)
def test_keras_correctness(run_ranks, shape_id, path):
    """Ported from keras-team/keras keras/src/layers/normalization/batch_normalization_test.py,
    ``test_correctness``: input centred on 5 with std 10, shapes (5, 2, 3) and (5, 3, 3, 2) with
    the channel axis 1 or -1 (here: moved to dim 1, channels_last for -1 in 4-D), moving
    statistics initialized to 0 or 1, Keras momentum 0 (PyTorch momentum 1.0); the batch of 5
    split 3 + 2 over 2 ranks. After three chained training calls the output has mean 0 and std 1
    over the global batch and the running mean is 0 (atol 1e-3, as Keras); inference before
    training on ``x`` differs from training. Keras expects the moving variance to be 1 and
    inference after training to equal training: its moving variance is the *biased* one, while
    ``nn.BatchNorm`` keeps the unbiased one, so here every output and running statistic is
    compared with ``nn.BatchNorm`` running the same calls on the concatenated batch instead."""
    results = run_ranks(_keras_correctness, 2, path, shape_id)
    shape, fmt = KERAS_SHAPES[shape_id]
    x = _keras_input(shape, fmt)
    dims = [0, *range(2, len(shape))]
    for i, (mean_init, var_init) in enumerate(KERAS_INITS):
        reference = _reference_bn(len(shape), shape[1], momentum=1.0)
        reference.running_mean.fill_(mean_init)
        reference.running_var.fill_(var_init)
        expected = _keras_sequence(reference, x)
        where = f"{shape_id}, moving mean {mean_init}, moving var {var_init}"
        ours = {k: torch.cat([r[i][k] for r in results]) for k in expected if "running" not in k}
        chained = ours["chained"]
        assert_close(chained.mean(dims), torch.zeros(shape[1]), rtol=0, atol=1e-3, msg=where)
        assert_close(chained.std(dims, correction=0), torch.ones(shape[1]), rtol=0, atol=1e-3)
        assert not torch.allclose(ours["inference_before"], ours["training"], atol=1e-3)
        for key, value in ours.items():
            assert_close(value, expected[key], msg=f"{where}: {key}")
        for r in results:
            assert_close(r[i]["running_mean"], torch.zeros(shape[1]), rtol=0, atol=1e-3)
            assert_close(r[i]["running_mean"], expected["running_mean"], msg=where)
            assert_close(r[i]["running_var"], expected["running_var"], msg=where)


def _keras_masks(path: str):
    with _path(path):
        rank = dist.get_rank()
        records = {}
        # test_input_fully_masked: zeros (4, 5), every position masked, on every rank
        bn = syncbn.SyncBatchNorm(5, affine=False)
        x = torch.zeros(4, 5, requires_grad=True)
        y = bn(x, torch.zeros(4, dtype=torch.bool))
        y.sum().backward()
        records["fully_masked"] = (y.detach(), x.grad, _state(bn))
        # test_bachnorm_ignore_masked_values: 10 sequences [[1, 5], [2, 5], [m, m], [m, m]]
        for mask_value in (0.0, 0.1, 1.0):
            steps = torch.tensor([[1.0, 5.0], [2.0, 5.0], [mask_value] * 2, [mask_value] * 2])
            data = steps.expand(10, 4, 2)  # Keras layout (N, L, C)
            mask = ~(data == mask_value).all(-1)  # keras.layers.Masking: all features == value
            rows = _rows((6, 4), rank)
            bn = syncbn.SyncBatchNorm(2, momentum=1.0)
            x = data.permute(0, 2, 1)[rows].clone().requires_grad_()
            y = bn(x, mask[rows])
            (y - x.detach()).pow(2).mean().backward()  # fit(x=data, y=data) with MSE
            records[f"ignore_masked_{mask_value}"] = _state(bn)
        # test_masked_broadcast_normalization: ones (1, 2, 3, C=4), mask (1, 2, 1) broadcast
        bn = syncbn.SyncBatchNorm(4, eps=1e-3, momentum=1.0)
        y = bn(torch.ones(1, 4, 2, 3), torch.ones(1, 2, 1, dtype=torch.bool))
        records["broadcast"] = (y.detach(), _state(bn))
        return records


@pytest.mark.parametrize("path", PATHS)
def test_keras_masked_batches(run_ranks, path):
    """Ported from keras-team/keras keras/src/layers/normalization/batch_normalization_test.py:
    ``test_input_fully_masked`` (with ``synchronized=True``, which Keras runs on TensorFlow):
    zeros of shape (4, 5), every element masked, no affine: the output is zeros (here on 2
    ranks: an empty global batch; added: zero input gradient and untouched running statistics);
    ``test_bachnorm_ignore_masked_values`` (mask values 0, 0.1, 1; 10 sequences of two real steps
    [1, 5], [2, 5] and two padded ones; Keras momentum 0): the moving mean is [1.5, 5] and the
    moving variance [0.25, 0] in Keras, which keeps the biased variance, and [0.25 * 20 / 19, 0]
    here, ``nn.BatchNorm``'s unbiased variance of the 20 real values (the 10 sequences split
    6 + 4 over 2 ranks; one training step instead of 5 epochs: with momentum 0 only the last
    batch counts); ``test_masked_broadcast_normalization``: ones of shape (1, 2, 3) x 4 channels
    with a (1, 2, 1) mask broadcast over the last axis, eps 1e-3: output zeros, moving mean 1,
    moving variance 0 (here on 2 ranks). Keras' layout (N, *, C) becomes PyTorch's (N, C, *) and
    its masks (N, *) are ours."""
    for r in run_ranks(_keras_masks, 2, path):
        y, x_grad, state = r["fully_masked"]
        assert_close(y, torch.zeros(4, 5), rtol=0, atol=0)
        assert_close(x_grad, torch.zeros(4, 5), rtol=0, atol=0)
        assert_close(state["running_mean"], torch.zeros(5), rtol=0, atol=0)
        assert_close(state["running_var"], torch.ones(5), rtol=0, atol=0)
        for mask_value in (0.0, 0.1, 1.0):
            state = r[f"ignore_masked_{mask_value}"]
            assert_close(state["running_mean"], torch.tensor([1.5, 5.0]), msg=str(mask_value))
            assert_close(state["running_var"], torch.tensor([0.25 * 20 / 19, 0.0]))
        y, state = r["broadcast"]
        assert_close(y, torch.zeros(1, 4, 2, 3), rtol=0, atol=1e-6)
        assert_close(y.mean([0, 2, 3]), torch.zeros(4), rtol=0, atol=1e-6)
        assert_close(state["running_mean"], torch.ones(4), rtol=0, atol=1e-6)
        assert_close(state["running_var"], torch.zeros(4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_keras_invalid_momentum(momentum):
    """Ported from keras-team/keras keras/src/layers/normalization/batch_normalization_test.py,
    ``test_invalid_momentum``: momentum -0.1 and 1.5 are refused with a ValueError naming
    momentum; the boundary values 0 and 1 are accepted."""
    with pytest.raises(ValueError, match="momentum"):
        syncbn.SyncBatchNorm(3, momentum=momentum)
    syncbn.SyncBatchNorm(3, momentum=0.0)
    syncbn.SyncBatchNorm(3, momentum=1.0)


def _keras_large_values(path: str):
    with _path(path):
        rank = dist.get_rank()
        x = (torch.randn(8, 3, 4, 4, generator=_gen(11)) * 300.0 + 10.0).half()
        bn = syncbn.SyncBatchNorm(3)
        bn.running_var.fill_(70000.0)  # beyond float16's largest value, 65504
        with torch.autocast("cpu", dtype=torch.float16):
            y = bn(x[_rows((4, 4), rank)])
        bn.eval()
        with torch.autocast("cpu", dtype=torch.float16):
            y_eval = bn(x[_rows((4, 4), rank)])
        return y.detach(), y_eval.detach(), _state(bn)


@pytest.mark.parametrize("path", PATHS)
def test_keras_variance_beyond_float16_under_autocast(run_ranks, path):
    """Ported from keras-team/keras keras/src/layers/normalization/batch_normalization_test.py,
    ``test_large_value_within_autocast_scope``: a moving variance of 70000 (more than float16
    holds) survives a float16 autocast scope. Here a float16 batch whose variance (about 9e4)
    also overflows float16 runs under ``torch.autocast(float16)`` on 2 ranks: running statistics
    stay float32 and equal ``nn.BatchNorm2d``'s in float32, outputs are finite and equal its
    outputs, in training and in eval."""
    x = (torch.randn(8, 3, 4, 4, generator=_gen(11)) * 300.0 + 10.0).half().float()
    reference = nn.BatchNorm2d(3)
    reference.running_var.fill_(70000.0)
    expected = reference(x)
    reference.eval()
    expected_eval = reference(x)
    results = run_ranks(_keras_large_values, 2, path)
    tol = {"rtol": 2e-3, "atol": 3e-3}
    for y_all, key in ((expected, 0), (expected_eval, 1)):
        got = torch.cat([r[key] for r in results])
        assert got.dtype == torch.float16 and got.isfinite().all()
        assert_close(got.float(), y_all.detach(), **tol)
    for *_, state in results:
        assert state["running_var"].dtype == torch.float32
        assert_close(state["running_mean"], reference.running_mean)
        assert_close(state["running_var"], reference.running_var)
