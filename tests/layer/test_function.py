"""The autograd function: gradients, collectives per pass, numerics, and the fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn import SyncBatchNorm, sync_batch_norm


def _gradcheck_on_rank(path: str) -> bool:
    r"""Every rank holds the *same* input, and gradcheck perturbs all ranks in lockstep: the
    function checked is x -> SyncBN([x; x; ...])[this rank], whose Jacobian the synchronized
    backward must produce (the backward all-reduce sums every rank's upstream gradient).

    ``eps`` is large next to the variance of the input, so that a backward that gets
    :math:`\epsilon` wrong (say, uses ``2 * eps``) is far outside the tolerance."""
    from syncbn.testing import cuda_standin

    with cuda_standin.path(path):
        gen = torch.Generator().manual_seed(0)
        x = (0.5 * torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)).requires_grad_()
        w = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)

        def fn(x, w, b):
            return sync_batch_norm(x, w, b, 0.3, None)[0]

        return torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("path", ["cpu", "cuda_branch"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_gradcheck_float64(run_ranks, world_size, path):
    assert run_ranks(_gradcheck_on_rank, world_size, path) == [True] * world_size


def backend_collectives(fn) -> list[tuple[str, int]]:
    """Run ``fn`` and return every collective the process group's backend ran: ``(name, number
    of elements)`` from the profiler's ``gloo:``/``nccl:`` events, whichever Python path (our
    helpers, ``torch.distributed`` itself, the process group object) issued them."""
    with torch.profiler.profile(record_shapes=True) as profile:
        fn()
    return [
        (event.name, int(torch.tensor(event.input_shapes[0]).prod()))
        for event in profile.events()
        if event.name.startswith(("gloo:", "nccl:"))
    ]


def _count_collectives(num_features: int, batch: int) -> dict:
    model = nn.Sequential(SyncBatchNorm(num_features), nn.ReLU(), SyncBatchNorm(num_features))
    x = torch.randn(batch, num_features, 4, 4, requires_grad=True)
    outputs = []
    forward = backend_collectives(lambda: outputs.append(model(x)))
    backward = backend_collectives(lambda: outputs[0].sum().backward())
    model.eval()
    evaluation = backend_collectives(lambda: model(x))
    return {"forward": forward, "backward": backward, "eval": evaluation}


@pytest.mark.parametrize("world_size", [2, 4])
def test_one_collective_per_pass_independent_of_world_size(run_ranks, world_size):
    """Counted on the process group itself: one all_reduce of 2C+2 values per layer forward,
    one of 2C per layer backward, none in eval, whatever the world size."""
    channels = 5
    for counts in run_ranks(_count_collectives, world_size, channels, 2):
        assert counts["forward"] == [("gloo:all_reduce", 2 * channels + 2)] * 2
        assert counts["backward"] == [("gloo:all_reduce", 2 * channels)] * 2
        assert counts["eval"] == []


def _large_mean_first_step(mean: float) -> dict:
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(3)
    x_all = torch.randn(16, 4, 6, 6, generator=gen, dtype=torch.float64) + mean
    bn = SyncBatchNorm(4, momentum=1.0)  # running_var = this batch's unbiased variance
    y = bn(x_all.float()[8 * rank : 8 * (rank + 1)])
    return {"y": y.detach(), "running_var": bn.running_var.clone(), "x_all": x_all}


def test_large_mean_variance_is_right_on_first_step(run_ranks):
    """float32 input with |mean| = 1e4 std: naive float32 sum/sum-of-squares give garbage."""
    results = run_ranks(_large_mean_first_step, 2, 1e4)
    x64 = results[0]["x_all"].float().double()  # what the ranks saw, in float64
    dims = [0, 2, 3]
    true_var = x64.var(dims, unbiased=True)
    expected = (x64 - x64.mean(dims, keepdim=True)) / torch.sqrt(
        x64.var(dims, unbiased=False, keepdim=True) + 1e-5
    )
    for rank, r in enumerate(results):
        assert_close(r["running_var"].double(), true_var, rtol=1e-4, atol=0)
        # float32 holds x ~ 1e4 to within 5e-4 only: that is the output's floor.
        assert_close(r["y"].double(), expected[8 * rank : 8 * (rank + 1)], rtol=0, atol=5e-3)


def _single_value_error(batch_sizes: tuple[int, ...]) -> str:
    x = torch.randn(batch_sizes[dist.get_rank()], 3)
    try:
        SyncBatchNorm(3)(x)
    except ValueError as error:
        return str(error)
    return "no error"


def test_one_value_per_channel_globally_is_an_error_on_every_rank(run_ranks):
    messages = run_ranks(_single_value_error, 3, (0, 1, 0))
    assert all("expected more than 1 value per channel" in m and "(got 1)" in m for m in messages)


def _eval_on_rank_zero_only() -> bool:
    """In eval mode nothing is communicated: rank 0 runs alone and must not wait for rank 1."""
    bn = SyncBatchNorm(3).eval()
    if dist.get_rank() == 0:
        bn(torch.randn(4, 3, 2))
    return True


def test_eval_mode_communicates_nothing(run_ranks):
    assert run_ranks(_eval_on_rank_zero_only, 2, timeout=20) == [True, True]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_without_process_group_it_is_batchnorm_exactly(momentum, track_running_stats):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    kwargs = {"momentum": momentum, "track_running_stats": track_running_stats}
    ours, ref = SyncBatchNorm(4, **kwargs), nn.BatchNorm2d(4, **kwargs)
    ref.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(ya, yb, rtol=0, atol=0)
        assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    for key, value in ref.state_dict().items():
        assert_close(ours.state_dict()[key], value, rtol=0, atol=0)


def test_half_precision_statistics_accumulate_in_float32(run_ranks):
    """Also the functional form: bfloat16 in, bfloat16 out, float32 statistics and count exact."""
    results = run_ranks(_bf16_statistics, 2)
    for out_dtype, mean_dtype, count in results:
        assert out_dtype == torch.bfloat16 and mean_dtype == torch.float32
        assert count == 2 * 70000  # a float16 count would overflow at 65504


def _bf16_statistics():
    x = torch.randn(70000, 2, dtype=torch.bfloat16)
    y, mean, _, count = syncbn.sync_batch_norm(x, None, None)
    return y.dtype, mean.dtype, int(count)


def _under_autocast():
    bn = SyncBatchNorm(3)
    conv = nn.Conv2d(3, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(torch.randn(4, 3, 5, 5))
        y = bn(h)
    y.float().sum().backward()
    return h.dtype, y.dtype, bn.running_mean.dtype, bool(torch.isfinite(conv.weight.grad).all())


def test_autocast_keeps_the_input_dtype(run_ranks):
    for h_dtype, y_dtype, stats_dtype, finite in run_ranks(_under_autocast, 2):
        assert h_dtype == y_dtype == torch.bfloat16
        assert stats_dtype == torch.float32 and finite


def _functional(momentum) -> dict:
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(4 + rank, 3, 5, generator=gen, dtype=torch.float64)
    running_mean = torch.zeros(3, dtype=torch.float64)
    running_var = torch.ones(3, dtype=torch.float64)
    y, mean, var, count = syncbn.sync_batch_norm(
        x,
        None,
        None,
        1e-5,
        None,
        running_mean=running_mean,
        running_var=running_var,
        momentum=momentum,
    )
    return {
        "x": x,
        "y": y,
        "mean": mean,
        "var": var,
        "count": count,
        "running": (running_mean, running_var),
    }


def test_functional_form_returns_the_global_statistics(run_ranks):
    results = run_ranks(_functional, 2, 0.5)
    x = torch.cat([r["x"] for r in results])
    reference = nn.BatchNorm1d(3, affine=False, momentum=0.5, dtype=torch.float64)
    expected = reference(x)
    var, mean = torch.var_mean(x, [0, 2], correction=0)
    for r in results:
        assert_close(r["mean"], mean)
        assert_close(r["var"], var, rtol=1e-9, atol=1e-12)
        assert int(r["count"]) == x.numel() // 3
        assert_close(r["running"], (reference.running_mean, reference.running_var))
    assert_close(torch.cat([r["y"] for r in results]), expected)
