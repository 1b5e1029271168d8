"""SyncBatchNorm cases ported from keras-team/keras.

Source: ``keras/src/layers/normalization/batch_normalization_test.py``: ``test_correctness``,
``test_input_fully_masked``, ``test_bachnorm_ignore_masked_values``,
``test_masked_broadcast_normalization``, ``test_invalid_momentum``,
``test_large_value_within_autocast_scope``.

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
from tests.ported.common import PATHS, kernel_path, rank_rows, reference_bn, seeded, state_copy

# (global input shape in PyTorch's (N, C, *) layout, memory format, keras id)
KERAS_SHAPES = {
    "axis1_5x2x3": ((5, 2, 3), torch.contiguous_format),
    "axis-1_5x2x3": ((5, 3, 2), torch.contiguous_format),
    "axis1_5x3x3x2": ((5, 3, 3, 2), torch.contiguous_format),
    "axis-1_5x3x3x2": ((5, 2, 3, 3), torch.channels_last),
}
KERAS_SPLIT = (3, 2)


def _keras_input(shape, fmt):
    x = torch.randn(shape, generator=seeded(7)) * 10.0 + 5.0  # centred on 5, std 10
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
    with kernel_path(path):
        shape, fmt = KERAS_SHAPES[shape_id]
        x = _keras_input(shape, fmt)[rank_rows(KERAS_SPLIT, dist.get_rank())]
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
        reference = reference_bn(len(shape), shape[1], momentum=1.0)
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
    with kernel_path(path):
        rank = dist.get_rank()
        records = {}
        # test_input_fully_masked: zeros (4, 5), every position masked, on every rank
        bn = syncbn.SyncBatchNorm(5, affine=False)
        x = torch.zeros(4, 5, requires_grad=True)
        y = bn(x, torch.zeros(4, dtype=torch.bool))
        y.sum().backward()
        records["fully_masked"] = (y.detach(), x.grad, state_copy(bn))
        # test_bachnorm_ignore_masked_values: 10 sequences [[1, 5], [2, 5], [m, m], [m, m]]
        for mask_value in (0.0, 0.1, 1.0):
            steps = torch.tensor([[1.0, 5.0], [2.0, 5.0], [mask_value] * 2, [mask_value] * 2])
            data = steps.expand(10, 4, 2)  # Keras layout (N, L, C)
            mask = ~(data == mask_value).all(-1)  # keras.layers.Masking: all features == value
            rows = rank_rows((6, 4), rank)
            bn = syncbn.SyncBatchNorm(2, momentum=1.0)
            x = data.permute(0, 2, 1)[rows].clone().requires_grad_()
            y = bn(x, mask[rows])
            (y - x.detach()).pow(2).mean().backward()  # fit(x=data, y=data) with MSE
            records[f"ignore_masked_{mask_value}"] = state_copy(bn)
        # test_masked_broadcast_normalization: ones (1, 2, 3, C=4), mask (1, 2, 1) broadcast
        bn = syncbn.SyncBatchNorm(4, eps=1e-3, momentum=1.0)
        y = bn(torch.ones(1, 4, 2, 3), torch.ones(1, 2, 1, dtype=torch.bool))
        records["broadcast"] = (y.detach(), state_copy(bn))
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
    with kernel_path(path):
        rank = dist.get_rank()
        x = (torch.randn(8, 3, 4, 4, generator=seeded(11)) * 300.0 + 10.0).half()
        bn = syncbn.SyncBatchNorm(3)
        bn.running_var.fill_(70000.0)  # beyond float16's largest value, 65504
        with torch.autocast("cpu", dtype=torch.float16):
            y = bn(x[rank_rows((4, 4), rank)])
        bn.eval()
        with torch.autocast("cpu", dtype=torch.float16):
            y_eval = bn(x[rank_rows((4, 4), rank)])
        return y.detach(), y_eval.detach(), state_copy(bn)


@pytest.mark.parametrize("path", PATHS)
def test_keras_variance_beyond_float16_under_autocast(run_ranks, path):
    """Ported from keras-team/keras keras/src/layers/normalization/batch_normalization_test.py,
    ``test_large_value_within_autocast_scope``: a moving variance of 70000 (more than float16
    holds) survives a float16 autocast scope. Here a float16 batch whose variance (about 9e4)
    also overflows float16 runs under ``torch.autocast(float16)`` on 2 ranks: running statistics
    stay float32 and equal ``nn.BatchNorm2d``'s in float32, outputs are finite and equal its
    outputs, in training and in eval."""
    x = (torch.randn(8, 3, 4, 4, generator=seeded(11)) * 300.0 + 10.0).half().float()
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
