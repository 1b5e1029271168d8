"""The CUDA branch of syncbn.function, run on CPU ranks through a model of PyTorch's CUDA kernels.

CI has no GPU. ``syncbn/testing/cuda_standin.py`` follows the contracts of the four CUDA kernels the
branch calls (dtypes, channels-last dispatch, ``InvStd``, empty weight gradients, int32 counts),
so these tests run the branch end to end on real gloo ranks against ``nn.BatchNorm`` on the
concatenated batch, and catch every defect that the first GPU run would otherwise have found
(issue 13). The same scenarios run on a real GPU in ``tests/gpu/test_cuda.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn import kernels as sbkernels
from syncbn import stepwise
from syncbn.testing import cuda_standin
from syncbn.testing.scenarios import SCENARIOS, Case, check_against_reference, run_sync_bn


def _standin(case: Case) -> Case:
    return dataclasses.replace(case, kernels="standin")


@pytest.mark.parametrize("name", SCENARIOS)
def test_cuda_branch_matches_batchnorm(run_ranks, name):
    case = _standin(SCENARIOS[name])
    check_against_reference(run_ranks(run_sync_bn, len(case.batch_sizes), case), case)


# On CUDA the per-channel steps between the kernels are compiled (torch.compile, dynamic shapes,
# fullgraph): the same scenarios with them compiled on CPU (Inductor's C++ backend) check that
# they trace as one graph and compute what they compute op by op. The variants a step compiles
# for: running statistics or not, float or tensor momentum, an empty rank, float64 statistics.
COMPILED_SCENARIOS = (
    "float32_2d",
    "float64_uneven_momentum_none",
    "no_running_stats",
    "empty_rank",
    "float16_params",
)


def _run_with_compiled_steps(case: Case) -> dict:
    """:func:`run_sync_bn`, then proof that its steps ran compiled (none fell back)."""
    from torch._dynamo.utils import counters

    record = run_sync_bn(case)
    steps = {
        fn.__name__: step.compiled is not None for fn, step in sbkernels.aten._COMPILED.items()
    }
    assert steps == {
        "pack": True,
        "_global_statistics_on_device": True,
        "_shares_of_means": True,
    }, steps
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
    return record


@pytest.mark.parametrize("name", COMPILED_SCENARIOS)
def test_cuda_branch_with_compiled_steps_matches_batchnorm(run_ranks, name):
    case = dataclasses.replace(SCENARIOS[name], kernels="standin_compiled")
    results = run_ranks(_run_with_compiled_steps, len(case.batch_sizes), case, timeout=300)
    check_against_reference(results, case)


def _scale_step(monkeypatch, compiled_run):
    """A compiled step of ``scale(t, factor) = t * factor`` whose "compiled" version is
    ``compiled_run(scale, t, factor)``, in place of what ``torch.compile`` would make."""

    def fake_compile(fn, **kwargs):
        return lambda t, factor: compiled_run(fn, t, factor)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(sbkernels.aten, "_COMPILED", {})

    def scale(t, factor):
        return t * factor

    return sbkernels.FusedKernels(cuda_standin, compile_steps=True).step(scale)


def test_a_step_that_cannot_compile_warns_and_runs_op_by_op(monkeypatch):
    def broken(fn, t, factor):
        raise RuntimeError("Cannot find a working triton installation\nmore details")

    step = _scale_step(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="could not compile scale .*triton.*SYNCBN_FUSE_STEPS"):
        assert step(torch.ones(3), 2.0).tolist() == [2.0, 2.0, 2.0]
    assert step(torch.ones(3), 3.0).tolist() == [3.0, 3.0, 3.0]  # op by op from now on, silently


def test_variants_beyond_the_recompile_limit_run_op_by_op_and_the_others_stay_compiled(
    monkeypatch,
):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def limited(fn, t, factor):
        if t.dtype == torch.float64:  # the variant past the limit
            raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
        return fn(t, factor) + 100  # marks a compiled run

    step = _scale_step(monkeypatch, limited)
    assert step(torch.ones(1), 2.0).tolist() == [102.0]
    with pytest.warns(RuntimeWarning, match="variants beyond torch._dynamo's recompile limit"):
        assert step(torch.ones(1, dtype=torch.float64), 2.0).tolist() == [2.0]
    assert step(torch.ones(1, dtype=torch.float64), 3.0).tolist() == [3.0]  # warned once
    assert step(torch.ones(1), 2.0).tolist() == [102.0]  # still compiled


def test_backward_counts_beyond_int32(tmp_path):
    """``batch_norm_backward_elemt`` divides by the sum of an int32 count tensor; a group holding
    more than 2^31 values per channel must still get ``dy - mean(dy) - ...`` with the true count."""
    fused = sbkernels.FusedKernels(cuda_standin)
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    mean, invstd = torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5
    weight = torch.rand(4, generator=gen) + 0.5
    count = torch.tensor(3.0e9, dtype=torch.float64)  # > 2^31
    sums = torch.randn(2, 4, generator=gen) * 1e9
    # One rank: its shares of the means are the means the all-reduce would return.
    means = stepwise._shares_of_means(sums[0], sums[1], count, False).view(2, -1)
    got = fused.grad_input(dy, x, mean, invstd, weight, means)
    a = (weight * invstd).view(1, -1, 1, 1)
    expected = a * (
        dy
        - (sums[0] / 3.0e9).view(1, -1, 1, 1)
        - (x - mean.view(1, -1, 1, 1))
        * invstd.view(1, -1, 1, 1) ** 2
        * (sums[1] / 3.0e9).view(1, -1, 1, 1)
    )
    assert_close(got, expected)


def _compile_with_override(kernels) -> bool:
    """Under torch.compile the portable kernels run even where the fused ones would in eager
    mode: PyTorch's CUDA BN kernels have no meta kernels, so tracing with symbolic sizes fails."""
    sbkernels.override.kernels = kernels
    try:
        torch._dynamo.reset()
        bn = syncbn.SyncBatchNorm(3)
        bn._always_sync = True
        compiled = torch.compile(bn, fullgraph=True, dynamic=True)
        for batch in (4, 6):
            compiled(torch.randn(batch, 3, 5, requires_grad=True)).sum().backward()
        return True
    finally:
        sbkernels.override.kernels = None


class _Unusable:
    """A kernel set that must not be called."""

    def __getattr__(self, name):
        raise AssertionError(f"the fused kernels were used under torch.compile ({name})")


@pytest.mark.slow
def test_compile_uses_the_portable_kernels(run_ranks):
    assert run_ranks(_compile_with_override, 1, _Unusable(), timeout=300) == [True]


def _device_side_checks(case: str) -> str:
    """The CUDA branch checks the reduced buffer on device (``torch._assert_async``, which on
    CPU raises at once): a global count of one, and ranks at different layers."""
    rank = dist.get_rank()
    with cuda_standin.path("cuda_branch"):
        try:
            if case == "one_value":
                x = torch.randn(1 if rank == 0 else 0, 3)
                syncbn.SyncBatchNorm(3)(x)
            else:
                layers = syncbn.convert_sync_batchnorm(
                    nn.ModuleDict({"a": nn.BatchNorm1d(3), "b": nn.BatchNorm1d(3)})
                )
                layers["a" if rank == 0 else "b"](torch.randn(4, 3))
        except RuntimeError as error:
            return str(error)
    return "no error"


@pytest.mark.parametrize(
    "case, message",
    [
        ("one_value", "expected more than 1 value per channel"),
        ("mixed_layers", "ranks at different layers"),
    ],
)
def test_device_side_checks(run_ranks, case, message):
    for error in run_ranks(_device_side_checks, 2, case):
        assert message in error, error


HOST_READS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")


def _host_reads(momentum, batch_sizes, path="cuda_branch") -> list[str]:
    """Ops of a training step of the CUDA branch that read a device value on the host (a sync on
    a GPU: it would break CUDA graph capture), outside the stand-in kernels themselves and
    ``torch._assert_async`` (a kernel on CUDA; on CPU it reads its argument). With its steps
    compiled, this includes the guards that decide whether a compiled step can run."""
    with cuda_standin.path(path):
        bn = syncbn.SyncBatchNorm(4, momentum=momentum)
        x = torch.randn(batch_sizes[dist.get_rank()], 4, 3, requires_grad=True)
        for _ in range(2):  # the first call fills the caches (constants made once)
            with torch.profiler.profile() as profile:
                bn(x).sum().backward()
        reads = []
        for event in profile.events():
            parent, in_kernel = event.cpu_parent, False
            while parent is not None:
                in_kernel = in_kernel or parent.name.startswith(
                    ("standin::", "aten::_assert_async")
                )
                parent = parent.cpu_parent
            if event.name in HOST_READS and not in_kernel:
                reads.append(event.name)
        if path == "cuda_branch_compiled":
            reads += [
                f"{fn.__name__} fell back"
                for fn, step in sbkernels.aten._COMPILED.items()
                if step.compiled is None
            ]
        return reads


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("batch_sizes", [(3, 2), (0, 0), (0, 3), (1, 0)], ids=str)
def test_cuda_branch_never_reads_a_value_on_the_host(run_ranks, momentum, batch_sizes):
    assert run_ranks(_host_reads, 2, momentum, batch_sizes) == [[], []]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("batch_sizes", [(3, 2), (0, 3)], ids=str)
def test_compiled_steps_never_read_a_value_on_the_host(run_ranks, momentum, batch_sizes):
    reads = run_ranks(_host_reads, 2, momentum, batch_sizes, "cuda_branch_compiled", timeout=300)
    assert reads == [[], []]
