"""The ATen kernel set: PyTorch's fused CUDA kernels for synchronized BN (contracts: the package
docstring), and the opt-in compiled per-channel steps between them (``SYNCBN_FUSE_STEPS=1``)."""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from .common import _as_type


class FusedKernels:
    """PyTorch's fused CUDA kernels for synchronized BN (contracts: module docstring).

    ``ops`` provides the four kernels (default: ``torch``); tests pass a CPU model of them.
    ``compile_steps`` (default: ``SYNCBN_FUSE_STEPS=1`` in the environment) makes :meth:`step`
    compile the per-channel arithmetic between the kernels into generated kernels: 16 kernel
    launches per layer forward+backward instead of about 25. That pays off where launches are what
    costs, in a captured CUDA graph; in eager mode the compiled calls' own Python overhead costs
    more than the launches they save (``results/gpu/``), so it is off by default.
    """

    name = "fused"

    def __init__(self, ops=torch, compile_steps: bool | None = None) -> None:
        self.ops = ops
        if compile_steps is None:
            compile_steps = ops is torch and os.environ.get("SYNCBN_FUSE_STEPS", "0") == "1"
        self.compile_steps = compile_steps

    def step(self, fn):
        """``fn`` (per-channel arithmetic: dozens of tiny ops) as one or two generated kernels."""
        return _compiled(fn) if self.compile_steps else fn

    def local_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.ops.batch_norm_update_stats(x, None, None, 0.0)

    def normalize(self, x, weight, bias, mean, invstd, eps: float) -> Tensor:
        return self.ops.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    def backward_sums(self, dy, x, mean, invstd, weight, need_weight: bool):
        affine = weight is not None
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = self.ops.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, True, need_weight and affine, affine
        )
        if weight is None:  # the channels-last kernel returns empty tensors here
            grad_weight = grad_bias = None
        return sum_dy, sum_dy_xmu, grad_weight, grad_bias

    def grad_input(self, dy, x, mean, invstd, weight, means: Tensor) -> Tensor:
        if weight is not None:
            weight = _as_type(weight, mean.dtype)
        # The kernel divides its sums by the total of an int32 count tensor, which cannot hold
        # more than 2^31 values per channel: it gets the group's means and a count of one.
        mean_dy, mean_dy_xmu = means.unbind()
        return self.ops.batch_norm_backward_elemt(
            dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu, _one(x.device)
        )


_ONE: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A cached int32 ``[1]`` on ``device``: the count ``batch_norm_backward_elemt`` divides by."""
    one = _ONE.get(device)
    if one is None:
        one = _ONE[device] = torch.ones(1, dtype=torch.int32, device=device)
    return one


class _CompiledStep:
    """``torch.compile(fn)`` for per-channel steps on CUDA, op by op if it cannot compile.

    Between its four full-tensor kernels a layer does a few dozen ops on ``(C,)`` vectors (the
    merge of the reduced statistics, the running-statistics update, the scaling of the backward
    sums). Run one by one on CUDA, each is a kernel launch; compiled, each step is one generated
    kernel, which is what a captured CUDA graph replays. (Each compiled call costs more host
    time than the ops it replaces, hence opt-in: :class:`FusedKernels`.) ``dynamic=True``: one
    compilation serves every width; the variants (with or without running statistics, float64
    input, ...) are few per model.

    A step that fails to compile (no Triton, an unsupported platform) warns once and runs op by
    op from then on (``failure`` says why): the numbers are the same, only the launches are not
    saved. A step with more variants than Dynamo keeps (``torch._dynamo.config.recompile_limit``,
    8) keeps those compiled and runs the others op by op.
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        self.failure: str | None = None
        self.warned = False

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # compiler or Triton missing/broken: same math, op by op
                first_line = (str(error).strip().splitlines() or [""])[0]
                self.failure = f"{type(error).__name__}: {first_line}"
                if isinstance(error, _recompile_limit_errors()):
                    # More variants than Dynamo keeps (its recompile_limit): the ones compiled
                    # so far stay compiled, the others run op by op.
                    self._warn_once("its variants beyond torch._dynamo's recompile limit run")
                else:
                    self.compiled = None
                    self._warn_once("running it")
        return self.fn(*args)

    def _warn_once(self, what: str) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"syncbn could not compile {self.fn.__name__} into one kernel ({self.failure}); "
            f"{what} op by op, which launches more kernels. Unset SYNCBN_FUSE_STEPS to skip "
            f"the attempt",
            RuntimeWarning,
            stacklevel=4,
        )


def _recompile_limit_errors() -> tuple[type, ...]:
    error = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None)
    return (error,) if error is not None else ()


_COMPILED: dict = {}


def _compiled(fn) -> _CompiledStep:
    step = _COMPILED.get(fn)
    if step is None:
        step = _COMPILED[fn] = _CompiledStep(fn)
    return step
