"""SyncBatchNorm cases ported from PyTorch's ``test/test_nn.py`` (pytorch/pytorch).

Sources: ``test_batchnorm_buffer_update_when_stats_are_not_tracked``,
``test_batchnorm_raises_error_if_less_than_one_value_per_channel``, ``test_batchnorm_nhwc_cpu``,
``test_batchnorm_non_contig_cpu``, ``test_batchnorm_nonaffine_cuda_half_input``,
``test_batchnorm_cudnn_half``. PyTorch's distributed cases are in ``test_pytorch_distributed.py``.

How the cases are ported, and what every file shares: :mod:`tests.ported.common`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from tests.ported.common import PATHS, grad_copies, kernel_path, rank_rows, seeded, state_copy


def _stats_not_tracked(path: str):
    with kernel_path(path):
        rank = dist.get_rank()
        bn = syncbn.SyncBatchNorm(4)
        bn.track_running_stats = False  # buffers exist but must not move
        before = state_copy(bn)
        y = bn(torch.rand(32, 4, generator=seeded(10))[rank_rows((16, 16), rank)])
        return before, state_copy(bn), y.detach()


@pytest.mark.parametrize("path", PATHS)
def test_nn_buffers_not_updated_when_stats_are_not_tracked(run_ranks, path):
    """Ported from pytorch/pytorch test/test_nn.py,
    ``test_batchnorm_buffer_update_when_stats_are_not_tracked``: a layer built with running
    statistics whose ``track_running_stats`` is then set to False updates none of its buffers in
    a training forward (num_batches_tracked included). The (32, 4) input is split over 2 ranks;
    added: the output is ``nn.BatchNorm1d``'s with batch statistics of the whole batch."""
    reference = nn.BatchNorm1d(4)
    reference.track_running_stats = False
    expected = reference(torch.rand(32, 4, generator=seeded(10)))
    results = run_ranks(_stats_not_tracked, 2, path)
    for before, after, _ in results:
        for key, value in before.items():
            assert torch.equal(after[key], value), key
    assert_close(torch.cat([y for *_, y in results]), expected.detach())


def _one_value_per_channel(path: str):
    with kernel_path(path):
        x = torch.rand(10, generator=seeded(0))[None, :, None]  # (1, 10, 1): one value per channel
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
    assertion (docs/library.md, Failing loudly), which on CPU raises RuntimeError with the same
    text."""
    for kind, message in run_ranks(_one_value_per_channel, 2, path):
        assert "expected more than 1 value per channel" in message, message
        assert kind == ("ValueError" if path == "cpu" else "RuntimeError")


NHWC_SHAPES = [(4, 8, 5, 5), (4, 1, 9, 9), (4, 9, 1, 1)]
NHWC_DTYPES = [("float32", False), ("bfloat16", False), ("bfloat16", True)]


def _nhwc_data(case: int, shape, dtype_name: str, mixed: bool):
    gen = seeded(100 + case)
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
    with kernel_path(path):
        rank = dist.get_rank()
        records = []
        cases = itertools.product(NHWC_SHAPES, NHWC_DTYPES)
        for case, (shape, (dtype_name, mixed)) in enumerate(cases):
            x, grad, weight, bias = _nhwc_data(case, shape, dtype_name, mixed)
            bn = _nhwc_layer(syncbn.SyncBatchNorm(shape[1]), x, weight, bias, mixed)
            rows = rank_rows((2, 2), rank)
            xl = x[rows].contiguous(memory_format=torch.channels_last).requires_grad_()
            out = bn(xl)
            out.backward(grad[rows].contiguous(memory_format=torch.channels_last))
            records.append(
                {
                    "y": out.detach(),
                    "channels_last": out.is_contiguous(memory_format=torch.channels_last),
                    "dx": xl.grad,
                    "grads": grad_copies(bn),
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
        for k, ref in enumerate(grad_copies(reference)):
            total = sum(r["grads"][k].float() for r in ranks)
            assert_close(total, ref.float(), **tol, msg=where)


def _non_contiguous(path: str):
    with kernel_path(path):
        x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
        bn = syncbn.SyncBatchNorm(2)
        with torch.no_grad():
            bn.weight.uniform_(generator=seeded(3))
            bn.bias.uniform_(generator=seeded(4))
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
        reference.weight.uniform_(generator=seeded(3))
        reference.bias.uniform_(generator=seeded(4))
    expected_train = reference(torch.cat([x, x]).contiguous())[:1]
    reference.eval()
    expected_eval = reference(x.contiguous())
    for records in run_ranks(_non_contiguous, 2, path):
        (y_train, cl_train), (y_eval, cl_eval) = records
        assert cl_train and cl_eval
        assert_close(y_train, expected_train)
        assert_close(y_eval, expected_eval)


def _half_input(path: str):
    with kernel_path(path):
        rank = dist.get_rank()
        gen = seeded(5)
        x = torch.randn(8, 3, 6, 6, generator=gen).half()
        grad = torch.randint(1, 10, (4, 3, 2, 2), generator=gen).half()
        xi = torch.randint(1, 10, (4, 3, 2, 2), generator=gen).half()
        rows = rank_rows((4, 4), rank)
        # test_batchnorm_nonaffine_cuda_half_input: half input, float32 statistics, no affine
        m = syncbn.SyncBatchNorm(3, affine=False)
        train_out = m(x[rows])
        m.eval()
        eval_out = m(x[rows])
        # test_batchnorm_cudnn_half: a half module vs a float module on half integer input
        rows2 = rank_rows((2, 2), rank)
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
    gen = seeded(5)
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
