"""The CUDA path on one GPU: PyTorch's fused kernels, NCCL, CUDA graphs and torch.compile.

The machines this project can borrow have one GPU, and NCCL refuses two ranks on one device, so:

- multi-rank equivalence runs 2-3 **gloo** ranks sharing ``cuda:0`` (gloo all-reduces CUDA
  tensors): every scenario of ``tests/layer/test_cuda_branch.py`` (which runs the same branch on CPU
  through a model of the kernels) against ``nn.BatchNorm`` on the concatenated batch;
- NCCL, CUDA graphs and ``torch.compile`` run in a **one-rank NCCL group** with the synchronized
  path forced (``SyncBatchNorm._always_sync``; at world size 1 a layer otherwise communicates
  nothing).

Everything skips without CUDA (CI has none). ``scripts/gpu_check.sh`` runs this file.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn import kernels as sbkernels
from syncbn.testing import cuda_standin
from syncbn.testing.scenarios import SCENARIOS, Case, check_against_reference, run_sync_bn, to_cpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("kernels", ["default", "aten"], ids=["triton", "aten"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_gloo_ranks_on_one_gpu_match_batchnorm(run_ranks, name, kernels):
    """The default on CUDA is the Triton set (float64 keeps PyTorch's kernels); the ATen set
    stays tested by name (SYNCBN_KERNELS=aten)."""
    case = dataclasses.replace(SCENARIOS[name], device="cuda:0", kernels=kernels)
    check_against_reference(run_ranks(run_sync_bn, len(case.batch_sizes), case), case)


NCCL_CASES = {
    "float32": Case((6,), spatial=(4, 5), dtype=torch.float32),
    "bfloat16_channels_last": Case(
        (6,), spatial=(3, 3), dtype=torch.bfloat16, memory_format=torch.channels_last
    ),
    "float64_momentum_none": Case((5,), dtype=torch.float64, momentum=None),
    "N_C_affine_false": Case((6,), spatial=(), dtype=torch.float32, affine=False),
}


@pytest.mark.parametrize("name", NCCL_CASES)
def test_nccl_one_rank_forced_sync_matches_batchnorm(run_ranks, name):
    case = dataclasses.replace(NCCL_CASES[name], device="cuda", force_sync=True)
    check_against_reference(run_ranks(run_sync_bn, 1, case, backend="nccl"), case)


def _cnn(device, momentum=0.1) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        syncbn.SyncBatchNorm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        syncbn.SyncBatchNorm(8, momentum=momentum),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).to(device)
    for layer in model.modules():
        if isinstance(layer, syncbn.SyncBatchNorm):
            layer._always_sync = True
    return model


def _step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    y.square().sum().backward()
    return y


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


def _graphed_training_step(batch: int, variant: str) -> tuple[list[dict], list[str]]:
    """The records of :func:`_graphed_vs_eager` with the kernel set ``variant`` ("triton",
    "aten" or "aten_compiled_steps"), and why any compiled step fell back."""
    sbkernels.aten._COMPILED.clear()
    kernel_set = "triton" if variant == "triton" else "aten"
    with cuda_standin.path(kernel_set), sbkernels.fused_steps(variant == "aten_compiled_steps"):
        records = _graphed_vs_eager(batch)
    return records, [step.failure for step in sbkernels.aten._COMPILED.values() if step.failure]


def _graphed_vs_eager(batch: int) -> list[dict]:
    """Capture a forward + backward in a CUDA graph with sync debug mode set to "error" (any
    host synchronization raises), replay it on new data, compare with eager mode."""
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    graphed = _cnn(device, momentum=None)
    eager = copy.deepcopy(graphed)
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = [torch.randn(batch, 3, 6, 6, device=device, generator=gen) for _ in range(6)]
    static_x = inputs[0].clone()

    side = torch.cuda.Stream()  # warm up (NCCL communicator, cuDNN plans, caches) off-stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in inputs[:3]:
            for model in (graphed, eager):
                model.zero_grad(set_to_none=True)
                _step(model, x)
    torch.cuda.current_stream().wait_stream(side)

    graphed.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture itself fails on any synchronizing call
        with _no_host_sync():
            static_y = _step(graphed, static_x)
    records = []
    for x in inputs[3:]:
        static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        with _no_host_sync():  # and so does eager mode
            y = _step(eager, x)
        records.append(
            {
                "graphed": [static_y.clone()] + _state(graphed),
                "eager": [y.detach()] + _state(eager),
            }
        )
    torch.cuda.synchronize()
    return to_cpu(records)


class _no_host_sync:
    """``torch.cuda.set_sync_debug_mode("error")`` for the duration: a host sync raises."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("variant", ["triton", "aten", "aten_compiled_steps"])
@pytest.mark.parametrize("batch", [4, 0], ids=["full", "empty_global_batch"])
def test_cuda_graph_replay_matches_eager_without_host_sync(run_ranks, batch, variant):
    """Replays equal eager mode, including ``momentum=None`` and an empty global batch (whose
    running statistics must not move), and nothing in SyncBN synchronizes with the host."""
    ((records, failures),) = run_ranks(
        _graphed_training_step, 1, batch, variant, backend="nccl", timeout=300
    )
    assert failures == []
    for replay, record in enumerate(records):
        assert_close(record["graphed"], record["eager"], msg=f"replay {replay}")


def _compiled_vs_eager(dynamic: bool) -> list[dict]:
    device = torch.device("cuda", 0)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _cnn(device)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=dynamic)
    gen = torch.Generator(device=device).manual_seed(2)
    records = []
    for batch in (4, 6, 4):  # a second batch size: recompiled (or symbolic with dynamic=True)
        x = torch.randn(batch, 3, 6, 6, device=device, generator=gen)
        for model in (eager, compiled_module):
            model.zero_grad(set_to_none=True)
        y_eager = _step(eager, x)
        y_compiled = _step(compiled, x)
        records.append(
            {
                "eager": [y_eager.detach()] + _state(eager),
                "compiled": [y_compiled.detach()] + _state(compiled_module),
            }
        )
    return to_cpu(records)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_fullgraph_matches_eager_on_cuda(run_ranks, dynamic):
    (records,) = run_ranks(_compiled_vs_eager, 1, dynamic, backend="nccl", timeout=300)
    for step, record in enumerate(records):
        assert_close(record["compiled"], record["eager"], rtol=1e-4, atol=1e-5, msg=f"step {step}")


def _no_collective_in_eval() -> bool:
    layer = _cnn(torch.device("cuda", 0)).eval()
    with torch.profiler.profile() as profile:
        layer(torch.randn(2, 3, 6, 6, device="cuda"))
    return not any(e.name.startswith("nccl:") for e in profile.events())


def test_eval_communicates_nothing_on_cuda(run_ranks):
    assert run_ranks(_no_collective_in_eval, 1, backend="nccl") == [True]


def _steps_compiled() -> dict:
    """Train a step on CUDA with the per-channel steps compiled, and count its kernels; report
    whether each step ran compiled (one that cannot compile falls back to op by op, saying why
    in ``failure``) and the kernels of an op-by-op step beside it."""
    model, x = _cnn(torch.device("cuda", 0)), torch.randn(4, 3, 6, 6, device="cuda")
    sbkernels.aten._COMPILED.clear()
    launches = {}
    for compiled in (True, False):
        with cuda_standin.path("aten"), sbkernels.fused_steps(compiled):
            for _ in range(2):  # compile, then count
                with torch.profiler.profile() as profile:
                    _step(model, x)
                    torch.cuda.synchronize()
        launches[compiled] = sum(
            e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.lower().startswith(("memcpy", "memset"))
            for e in profile.events()
        )
    steps = {fn.__name__: step.failure or True for fn, step in sbkernels.aten._COMPILED.items()}
    return {"steps": steps, "launches": launches}


def test_per_channel_steps_compile_into_fewer_kernels_on_cuda(run_ranks):
    (report,) = run_ranks(_steps_compiled, 1, backend="nccl", timeout=300)
    assert report["steps"] == {
        "pack": True,
        "_global_statistics_on_device": True,
        "_shares_of_means": True,
    }, report
    # Two SyncBN layers: 10 launches each fewer (26 -> 16 per layer, forward and backward).
    assert report["launches"][True] <= report["launches"][False] - 2 * 8, report


def _rank_check():
    return dist.get_backend()


def test_nccl_group_of_one(run_ranks):
    assert run_ranks(_rank_check, 1, backend="nccl") == ["nccl"]


def _triton_launches() -> dict:
    """Kernels on the GPU for one SyncBN layer's forward+backward (one-rank NCCL group, the
    synchronized path forced), by name, after a warm-up that compiles the Triton kernels."""
    layer = syncbn.SyncBatchNorm(64).cuda()
    layer._always_sync = True
    x = torch.randn(8, 64, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    with cuda_standin.path("triton"):
        for _ in range(2):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            with torch.profiler.profile() as profile:
                layer(x).backward(grad)
                torch.cuda.synchronize()
    names = [
        e.name
        for e in profile.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.lower().startswith(("memcpy", "memset"))
    ]
    return {"names": names, "triton": [n for n in names if n.startswith("_")]}


def test_triton_layer_launches_four_kernels_and_two_collectives(run_ranks):
    (report,) = run_ranks(_triton_launches, 1, backend="nccl", timeout=300)
    assert sorted(report["triton"]) == sorted(
        ["_moments", "_normalize", "_backward_reduce", "_grad_input"]
    ), report
    assert len(report["names"]) <= 6, report  # the two NCCL all-reduces besides
