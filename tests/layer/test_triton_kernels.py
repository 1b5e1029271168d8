"""The Triton kernel set on CPU tensors, through Triton's interpreter (the same kernel code the GPU
compiles), on real gloo ranks against nn.BatchNorm on the concatenated batch.

Every scenario of the CUDA branch (``syncbn.testing.scenarios.SCENARIOS``) runs here, with half
precision input checked at float32 accuracy for the parameter gradients (the Triton kernels
accumulate in float32; PyTorch's CUDA reduction does not). Then what the kernels promise besides:
four launches per layer forward+backward and no other op, determinism, the device-side checks, the
fallbacks, and a compile of every kernel for a GPU (sm_90) without one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn import kernels as sbkernels
from syncbn.testing import cuda_standin
from syncbn.testing.launches import launches_and_ops
from syncbn.testing.scenarios import SCENARIOS, Case, check_against_reference, run_sync_bn

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

TRITON_SCENARIOS = {
    name: case
    for name, case in SCENARIOS.items()
    if case.dtype != torch.float64  # float64 keeps the other kernels (tested elsewhere)
}
EXTRA_SCENARIOS = {
    "float32_large_mean": Case((3, 2), spatial=(4, 5), dtype=torch.float32, momentum=None),
    "float32_one_channel_many_values": Case((9, 7), spatial=(17, 13), channels=1, steps=2),
    "float16_channels_last_uneven": Case(
        (1, 5, 0), spatial=(3, 3), dtype=torch.float16, memory_format=torch.channels_last
    ),
    "bfloat16_N_C_L": Case((4, 2), spatial=(6,), dtype=torch.bfloat16, momentum=None),
    "float32_subgroups": Case((2, 3, 1, 2), dtype=torch.float32, group_size=2),
}


def _triton(case: Case) -> Case:
    return dataclasses.replace(case, kernels="triton")


@pytest.mark.parametrize("name", [*TRITON_SCENARIOS, *EXTRA_SCENARIOS])
def test_triton_kernels_match_batchnorm(run_ranks, name):
    case = _triton({**TRITON_SCENARIOS, **EXTRA_SCENARIOS}[name])
    results = run_ranks(run_sync_bn, len(case.batch_sizes), case, timeout=300)
    check_against_reference(results, case)


def _large_mean_step() -> dict:
    """One training step of float32 input at mean 1e4 and std 1: the first step, so the shift
    (the running mean) is still zero."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 10, 12, dtype=torch.float64) + 1e4).float()
    g = torch.randn(x.shape)
    mine = x[rank * 4 : rank * 4 + 4].clone().requires_grad_()
    with cuda_standin.path("triton"):
        bn = syncbn.SyncBatchNorm(3)
        bn(mine).backward(g[rank * 4 : rank * 4 + 4])
    return {"dx": mine.grad, "dw": bn.weight.grad, "mean": bn.running_mean}


def test_float32_at_a_mean_of_ten_thousand_stds_is_exact_to_float32(run_ranks):
    """Each program centres on its first value and merges in float64; the normalize and
    backward kernels centre with the mean's float32 remainder too: float32 input with a mean of
    1e4 std gets gradients within float32 round-off of the float64 truth."""
    ranks = run_ranks(_large_mean_step, 2)
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 10, 12, dtype=torch.float64) + 1e4).float().double()
    g = torch.randn(x.shape).double()
    x.requires_grad_()
    reference = nn.BatchNorm2d(3, dtype=torch.float64)
    reference(x).backward(g)
    dx = torch.cat([r["dx"] for r in ranks]).double()
    assert_close(dx, x.grad, rtol=0, atol=2e-5)
    dw = sum(r["dw"].double() for r in ranks)
    assert_close(dw, reference.weight.grad, rtol=0, atol=1e-3)  # a sum of 480 unit terms
    assert_close(ranks[0]["mean"].double(), reference.running_mean, rtol=1e-7, atol=0)


HOST_READ_ON_CPU = {"_local_scalar_dense"}  # the error word, read at once on CPU tensors only


def _launches_and_ops(batch_sizes, momentum, channels_last) -> tuple[int, list[str]]:
    rank = dist.get_rank()
    with cuda_standin.path("triton"):
        bn = syncbn.SyncBatchNorm(4, momentum=momentum)
        x = torch.randn(batch_sizes[rank], 4, 3, 5)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        bn(x).sum().backward()  # warm-up: caches (counters, error word) are made once
        x.grad = None  # so that autograd does not add into old gradients (an add_ each)
        bn.zero_grad(set_to_none=True)
        ones = torch.ones_like(x)
        launches, others = launches_and_ops(lambda: bn(x).backward(ones))
    return len(launches), [op for op in others if op not in HOST_READ_ON_CPU]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("batch_sizes", [(3, 2), (0, 3)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_four_launches_and_no_other_kernel_per_layer(
    run_ranks, batch_sizes, momentum, channels_last
):
    """Forward+backward: moments, normalize, backward reduce, input gradient (three on an empty
    rank: no input gradient to write), and besides them only allocations, views and the two
    all-reduces: no zero-fill, cast, copy or per-channel op, and num_batches_tracked advanced
    inside the kernels."""
    results = run_ranks(_launches_and_ops, 2, batch_sizes, momentum, channels_last)
    for rank, (launches, others) in enumerate(results):
        assert launches == (4 if batch_sizes[rank] else 3), (rank, launches)
        assert set(others) <= {"allreduce_"}, others
        assert others.count("allreduce_") == 2, others


def _twice() -> list[dict]:
    rank = dist.get_rank()
    runs = []
    for _ in range(2):
        torch.manual_seed(rank)
        with cuda_standin.path("triton"):
            bn = syncbn.SyncBatchNorm(5, momentum=None)
            x = torch.randn(6, 5, 7, 9, dtype=torch.bfloat16, requires_grad=True)
            y = bn(x)
            y.backward(torch.randn_like(y))
        runs.append({"y": y, "dx": x.grad, "dw": bn.weight.grad, "rv": bn.running_var})
    return runs


def test_the_same_input_gives_bit_identical_results(run_ranks):
    for first, second in run_ranks(_twice, 2):
        for key in first:
            assert torch.equal(first[key], second[key]), key


def _checks(case: str) -> str:
    rank = dist.get_rank()
    with cuda_standin.path("triton"):
        try:
            if case == "one_value":
                bn = syncbn.SyncBatchNorm(3)
                bn(torch.randn(1 if rank == 0 else 0, 3))
            else:
                layers = syncbn.convert_sync_batchnorm(
                    nn.ModuleDict({"a": nn.BatchNorm1d(3), "b": nn.BatchNorm1d(3)})
                )
                bn = layers["a" if rank == 0 else "b"]
                bn(torch.randn(4, 3))
        except (RuntimeError, ValueError) as error:
            untouched = torch.equal(bn.running_mean, torch.zeros(3))
            return f"{error} | running stats untouched: {untouched}"
    return "no error"


@pytest.mark.parametrize(
    "case, message",
    [
        ("one_value", "expected more than 1 value per channel"),
        ("mixed_layers", "layer 'a' expected every rank of its group in this layer"),
    ],
)
def test_device_side_checks_name_the_layer_and_leave_running_stats(run_ranks, case, message):
    for error in run_ranks(_checks, 2, case):
        assert message in error or (case == "mixed_layers" and "layer 'b'" in error), error
        assert "running stats untouched: True" in error, error


def test_float64_and_unaddressable_layouts_fall_back_to_the_other_kernels(monkeypatch):
    monkeypatch.setenv("SYNCBN_KERNELS", "triton")
    triton_set = sbkernels.triton_kernel_set(required=True)
    assert sbkernels.kernels_for(torch.zeros(2, 3, 4)) is triton_set
    assert sbkernels.kernels_for(torch.zeros(2, 3, 4, dtype=torch.float64)) is sbkernels.PORTABLE
    # (N, C, H, W) whose H and W cannot share one stride: a crop of the width
    cropped = torch.zeros(2, 3, 4, 6)[..., 1:4]
    assert sbkernels.kernels_for(cropped) is sbkernels.PORTABLE
    monkeypatch.setenv("SYNCBN_KERNELS", "portable")
    assert sbkernels.kernels_for(torch.zeros(2, 3, 4)) is sbkernels.PORTABLE


def test_a_bad_kernel_choice_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SYNCBN_KERNELS", "cudnn")
    with pytest.raises(ValueError, match=r"SYNCBN_KERNELS expected one of triton, aten, portable"):
        sbkernels.kernels_for(torch.zeros(2, 3))
    monkeypatch.setenv("SYNCBN_KERNELS", "aten")
    with pytest.raises(RuntimeError, match=r"SYNCBN_KERNELS=aten expected CUDA tensors"):
        sbkernels.kernels_for(torch.zeros(2, 3))


def test_a_bad_compile_kernel_choice_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SYNCBN_COMPILE_KERNELS", "inductor")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match=r"SYNCBN_COMPILE_KERNELS expected triton or portable"):
        sbkernels.kernels_for(torch.zeros(2, 3))
    monkeypatch.setenv("SYNCBN_COMPILE_KERNELS", "portable")
    assert sbkernels.kernels_for(torch.zeros(2, 3)) is sbkernels.PORTABLE


def test_momentum_none_without_a_counter_is_refused_before_any_launch():
    """The cumulative average weighs by num_batches_tracked: without it there is nothing to weigh
    by, and the kernel must not read a stand-in pointer."""
    triton_set = sbkernels.triton_kernel_set(required=True)
    x = torch.randn(4, 3)
    buffer, shift = triton_set.pack_moments(x, None, None, 1, "layer")
    running = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="expected num_batches_tracked with momentum=None"):
        triton_set.normalize_with_global_statistics(
            x, buffer, shift, None, None, *running, None, None, 1e-5, 1, 1
        )
    assert torch.equal(running[0], torch.zeros(3)) and torch.equal(running[1], torch.ones(3))


def _nvidia_backend() -> bool:
    return importlib.util.find_spec("triton.backends.nvidia") is not None


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend")
def test_every_kernel_compiles_for_a_gpu_without_one():
    """The interpreter accepts code the GPU compiler refuses (types, scalar/vector mixes): each
    kernel compiles to a cubin for sm_90 (Hopper), both tilings, with ptxas and no GPU (in a
    fresh process: this one runs Triton interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "syncbn.testing.triton_compile"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 8, done.stdout


ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "silu": lambda: nn.SiLU(),
}


def _fused_activation_step(name: str, dtype: torch.dtype, channels_last: bool) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64).to(dtype)
    g = torch.randn(6, 4, 5, 5, dtype=torch.float64).to(dtype)
    if channels_last:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    mine = x[3 * rank : 3 * rank + 3].clone().requires_grad_()
    with cuda_standin.path("triton"):
        layer = syncbn.SyncBatchNormAct(4, act=ACTIVATIONS[name]())
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 4))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, 4))
        calls = []
        layer.act.register_forward_hook(lambda *args: calls.append(1))
        y = layer(mine)
        y.backward(g[3 * rank : 3 * rank + 3])
    return {
        "y": y.detach(), "dx": mine.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
        "running": (layer.running_mean, layer.running_var), "act_calls": len(calls),
    }  # fmt: skip


@pytest.mark.parametrize(
    "name, dtype, channels_last",
    [
        ("relu", torch.float32, False),
        ("leaky_relu", torch.float32, True),
        ("silu", torch.float32, False),
        ("silu", torch.bfloat16, True),
    ],
)
def test_fused_activation_matches_batchnorm_then_the_activation(
    run_ranks, name, dtype, channels_last
):
    """SyncBatchNormAct with ReLU, LeakyReLU or SiLU applies the activation in the kernels (its
    module never runs) and equals nn.BatchNorm2d then the activation on the global batch, in
    float64: outputs, input gradients, parameter gradients (summed over ranks), running stats."""
    ranks = run_ranks(_fused_activation_step, 2, name, dtype, channels_last)
    assert [r["act_calls"] for r in ranks] == [0, 0]
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64).to(dtype).double().requires_grad_()
    g = torch.randn(6, 4, 5, 5, dtype=torch.float64).to(dtype).double()
    bn = nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
        bn.bias.copy_(torch.linspace(-0.3, 0.3, 4))
    act = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1), "silu": nn.SiLU()}[name]
    y = act(bn(x))
    y.backward(g)
    output_tol = (
        {"rtol": 2e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    )
    assert_close(torch.cat([r["y"] for r in ranks]).double(), y.detach(), **output_tol)
    assert_close(torch.cat([r["dx"] for r in ranks]).double(), x.grad, **output_tol)
    for key, reference in (("dw", bn.weight.grad), ("db", bn.bias.grad)):
        total = sum(r[key].double() for r in ranks)
        assert_close(total, reference, rtol=1e-5, atol=1e-4)  # float32 sums of 150 terms
    for r in ranks:
        assert_close(r["running"][0].double(), bn.running_mean, rtol=1e-6, atol=1e-6)
        assert_close(r["running"][1].double(), bn.running_var, rtol=1e-6, atol=1e-6)


def _compiled_with_triton_ops() -> dict:
    """A small CNN under torch.compile(fullgraph=True) with SYNCBN_COMPILE_KERNELS=triton, two
    training steps, against the same model in eager mode on the Triton kernels."""
    import os

    from syncbn.kernels import triton_ops

    os.environ["SYNCBN_COMPILE_KERNELS"] = "triton"
    calls = []
    moments = triton_ops._SET.pack_moments
    triton_ops._SET.pack_moments = lambda *args: calls.append(1) or moments(*args)
    try:
        torch._dynamo.reset()

        def model():
            torch.manual_seed(0)
            return nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), syncbn.SyncBatchNorm(8), nn.ReLU(),
                nn.Conv2d(8, 4, 1), syncbn.SyncBatchNorm(4, momentum=None),
            )  # fmt: skip

        eager, compiled_module = model(), model()
        # aot_eager: dynamo and AOTAutograd trace the custom ops, without inductor's code
        # generation (tens of seconds on this CPU; test_compile.py covers inductor)
        compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
        records = []
        for step in range(2):
            x = torch.randn(
                3 + dist.get_rank(), 3, 5, 5, generator=torch.Generator().manual_seed(step)
            )
            pair = []
            for net in (eager, compiled):
                xi = x.clone().requires_grad_()
                with cuda_standin.path("triton"):
                    y = net(xi)
                    y.square().sum().backward()
                pair.append([y.detach(), xi.grad])
            records.append(pair)
        state = [
            [t.clone() for t in (*m.parameters(), *m.buffers())] for m in (eager, compiled_module)
        ]
        grads = [[p.grad for p in m.parameters()] for m in (eager, compiled_module)]
        return {"records": records, "state": state, "grads": grads, "custom_op_calls": len(calls)}
    finally:
        triton_ops._SET.pack_moments = moments
        os.environ.pop("SYNCBN_COMPILE_KERNELS", None)


@pytest.mark.slow
def test_compiled_model_can_call_the_triton_kernels_as_custom_ops(run_ranks):
    """SYNCBN_COMPILE_KERNELS=triton: the compiled graph calls the Triton kernels (custom ops, no
    graph break) and trains as eager mode does: outputs, input and parameter gradients, running
    statistics on 2 gloo ranks of different batch sizes."""
    for result in run_ranks(_compiled_with_triton_ops, 2, timeout=300):
        assert result["custom_op_calls"] >= 4, result["custom_op_calls"]  # 2 layers x 2 steps
        for eager, compiled in result["records"]:
            assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
        assert_close(result["state"][1], result["state"][0], rtol=1e-4, atol=1e-5)
        assert_close(result["grads"][1], result["grads"][0], rtol=1e-4, atol=1e-4)
