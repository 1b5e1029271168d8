r"""The per-device kernels of the synchronized layer: the one place that tells CPU from CUDA.

:mod:`syncbn.function` runs the same algorithm everywhere (local moments, one all-reduce, global
statistics, normalize; backward: two local sums, one all-reduce, input gradient) and calls one of
two kernel sets for the four steps that touch the full input:

- :class:`PortableKernels`: composite ATen ops (``mean``, ``sub``, ``batch_norm`` in eval mode,
  ``native_batch_norm_backward``). Used on CPU, and under ``torch.compile`` on every device, where
  inductor fuses them (PyTorch's CUDA-only kernels below have no meta kernels, so a graph with
  symbolic sizes could not be traced through them).
- :class:`FusedKernels`: PyTorch's own CUDA kernels for synchronized BN
  (``batch_norm_update_stats``, ``batch_norm_elemt``, ``batch_norm_backward_reduce``,
  ``batch_norm_backward_elemt``), one launch per step, channels-last aware. Used in eager mode on
  CUDA. Their contracts, read from ``aten/src/ATen/native/cuda/Normalization.cu(h)``, and what
  this class does about each:

  * **Statistics dtype.** Every kernel takes and returns per-channel statistics in the input's
    *accumulation* dtype: float32 for float16/bfloat16/float32 input, float64 for float64.
  * **Local moments.** ``batch_norm_update_stats(x, None, None, 0)`` returns the mean and the
    *biased variance* itself (Welford). ``batch_norm_stats`` is not used: it returns
    ``invstd = 1/sqrt(var + eps)``, and for ``eps = 0`` its ``InvStd`` transform returns 0 (not
    inf) for a constant channel, so inverting it turns a constant channel into infinite variance.
  * **Weight dtype.** ``batch_norm_backward_elemt`` on contiguous NC* input reads the weight in
    the statistics' dtype when the input is half precision ("Expected weight to have type Float
    but got Half" for a ``model.half()``), and the channels-last kernels read it in the input's
    dtype. The weight is cast to the statistics' dtype for that kernel only when the two differ.
  * **Undefined weight.** With ``weight=None`` (``affine=False``) the channels-last
    ``batch_norm_backward_reduce`` (taken for channels_last 2d/3d input and for any contiguous
    input with ``stride(1) == 1``: ``(N, C)``, ``(N, C, 1, 1)``) returns *empty* tensors, not
    undefined ones, for the weight and bias gradients; they are dropped here, never returned.
  * **Counts.** ``batch_norm_backward_elemt`` takes per-rank counts as an int32 tensor and
    divides by their sum. Counts beyond :math:`2^{31}` values per channel would not fit, so it is
    given the *means* :math:`\sum g / n` and :math:`\sum g (x-\mu) / n` (each rank divides its
    sums by the exact float64 count before the all-reduce) and a count of one.
  * **Empty input.** Never called with an empty input (the caller branches on the shape).

Tests drive :class:`FusedKernels` on CPU through a model of these four kernels that follows the
contracts above (``syncbn/testing/cuda_standin.py``), so CI, which has no GPU, still checks the CUDA
branch's logic; the GPU tests (``tests/gpu/test_cuda.py``) check the kernels themselves.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = [
    "FusedKernels",
    "PortableKernels",
    "fused_steps",
    "kernels_for",
    "raise_device_errors",
    "requested_kernels",
    "triton_kernel_set",
    "local_moments64",
    "memory_format",
    "stat_dtype",
]


def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics accumulate in float32, or float64 for float64 input (never in half precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channels (dim 1)."""
    return [0, *range(2, x.dim())]


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in: channels_last (4-D) or channels_last_3d (5-D) when it
    is, else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (C, 1, ..., 1), broadcastable against x of shape (N, C, *)."""
    return t.view((-1,) + (1,) * (x.dim() - 2))


def local_moments64(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's ``(count, mean, biased var)`` per channel in float64 (zeros when empty):
    telemetry's view of the local batch, off the training path."""
    count = x.numel() // x.shape[1]
    if count == 0:
        zeros = x.sum(reduce_dims(x), dtype=torch.float64)
        return zeros.new_zeros(()), zeros, zeros
    x64 = x.double()
    var, mean = torch.var_mean(x64, reduce_dims(x), correction=0)
    return torch.tensor(float(count), dtype=torch.float64, device=x.device), mean, var


class PortableKernels:
    """Composite ATen ops: CPU, and any device under ``torch.compile``.

    Contracts: statistics in :func:`stat_dtype`; ``weight`` may be ``None``; inputs non-empty.
    """

    name = "portable"

    @staticmethod
    def step(fn):
        """``fn`` as it is: op by op on CPU (where small ops are cheap), and traced into the
        caller's graph under ``torch.compile``."""
        return fn

    @staticmethod
    def local_moments(x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and biased variance, centred (two passes: exact at large means)."""
        dims = reduce_dims(x)
        mean = x.mean(dims, dtype=stat_dtype(x))
        centred = x - channel_view(mean, x)  # promotes half input to float32
        return mean, centred.square_().mean(dims)

    @staticmethod
    def normalize(x, weight, bias, mean, invstd, eps: float) -> Tensor:
        """``(x - mean) * invstd * weight + bias`` in x's dtype and memory format.

        The eval-mode CPU kernel with unit variance and ``eps = 0`` is exactly this fused
        per-channel affine, given the scale ``weight * invstd``. It wants its per-channel
        arguments in the parameters' dtype (a model cast to bfloat16 has bfloat16 parameters).
        """
        scale = invstd if weight is None else weight * invstd
        param_dtype = weight.dtype if weight is not None else mean.dtype
        scale, mean = _as_type(scale, param_dtype), _as_type(mean, param_dtype)
        return torch.batch_norm(x, scale, bias, mean, _ones(mean), False, 0.0, 0.0, False)

    @staticmethod
    def backward_sums(dy, x, mean, invstd, weight, need_weight: bool):
        r"""``(sum dy, sum dy x_hat, grad_weight, grad_bias)``, local, in one fused pass.

        ``native_batch_norm_backward`` given the global mean and invstd computes exactly
        :math:`\sum g \hat x` and :math:`\sum g` as its weight and bias gradients. (This set
        reduces :math:`\sum g \hat x`, the fused set :math:`\sum g (x - \mu)`: each set's
        ``grad_input`` reads its own; an empty rank sends zeros, which are both.)
        """
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, mean, invstd, True, 0.0, [False, True, True]
        )
        return sum_dy, sum_dy_xhat, sum_dy_xhat, sum_dy

    @staticmethod
    def grad_input(dy, x, mean, invstd, weight, means: Tensor) -> Tensor:
        r"""``dx = a dy + b (x - mean) + c`` with per-channel coefficients, in two passes.

        ``means`` is the group's ``(2, C)`` :math:`[\frac1n \sum g;\ \frac1n \sum g \hat x]`
        (consumed). With :math:`a = \gamma\,\mathrm{invstd}`,
        :math:`b = -a\,\mathrm{invstd} \sum g \hat x / n` and :math:`c = -a \sum g / n`, the
        eval-mode ``batch_norm`` kernel computes ``b (x - mean) + c`` in one fused pass (twice as
        fast as a broadcast ``addcmul`` on CPU), then ``addcmul_`` adds ``a dy``.
        """
        a = invstd if weight is None else _as_type(weight, invstd.dtype) * invstd
        coefficients = means.mul_(a).neg_()  # (2, C): [c; b / invstd]
        c, b = coefficients.unbind()
        b.mul_(invstd)
        work = _as_type(x, mean.dtype)
        grad = torch.batch_norm(work, b, c, mean, _ones(mean), False, 0.0, 0.0, False)
        grad.addcmul_(dy, channel_view(a, x))
        return _as_type(grad, x.dtype)


def _as_type(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without an op when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


_ONES: dict[tuple, Tensor] = {}


def _ones(like: Tensor) -> Tensor:
    """A cached (C,) tensor of ones: a constant, so no per-step allocation."""
    if torch.compiler.is_compiling():
        return torch.ones_like(like)
    key = (like.numel(), like.dtype, like.device)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) > 256:
            _ONES.clear()
        ones = _ONES[key] = torch.ones_like(like)
    return ones


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


PORTABLE = PortableKernels()
FUSED = FusedKernels()


@contextlib.contextmanager
def fused_steps(compiled: bool):
    """Within the block, CUDA layers run their per-channel steps compiled or op by op, whatever
    ``SYNCBN_FUSE_STEPS`` says (for the whole process; a backward follows its forward)."""
    global FUSED
    default, FUSED = FUSED, FusedKernels(compile_steps=compiled)
    try:
        yield
    finally:
        FUSED = default


# Tests set ``override.kernels`` to run a kernel set (the CPU model of the CUDA kernels, or the
# Triton kernels under the interpreter) on CPU tensors.
override = SimpleNamespace(kernels=None)

KERNEL_SETS = ("triton", "aten", "portable")
_TRITON: list = []  # [TritonKernels()] once triton imported, [None] if it cannot


def requested_kernels() -> str | None:
    """``SYNCBN_KERNELS`` (``triton``, ``aten`` or ``portable``), or ``None`` for the default."""
    value = os.environ.get("SYNCBN_KERNELS", "").strip().lower()
    if not value:
        return None
    if value not in KERNEL_SETS:
        raise ValueError(
            f"SYNCBN_KERNELS expected one of {', '.join(KERNEL_SETS)} (got {value!r}); unset it "
            f"for the default (Triton on CUDA where it imports, else PyTorch's kernels)"
        )
    return value


def triton_kernel_set(required: bool = False):
    """The Triton set, imported on first use; ``None`` when ``triton`` does not import (an error
    if ``required``)."""
    if not _TRITON:
        try:
            from .triton_set import TritonKernels
        except ImportError as error:
            if required:
                raise RuntimeError(
                    f"SYNCBN_KERNELS=triton expected the triton package to import (got "
                    f"{type(error).__name__}: {error}); pip install triton, or unset SYNCBN_KERNELS"
                ) from error
            _TRITON.append(None)
        else:
            _TRITON.append(TritonKernels())
    return _TRITON[0]


def raise_device_errors(device: torch.device | None = None) -> None:
    """Raise the error of the first failed device-side check of a Triton-kernel layer since the
    last call (ranks at different layers, one value per channel), naming the layer; a no-op when
    the Triton kernels never ran. One host read per device: call it where training syncs anyway
    (e.g. where it reads the loss)."""
    if _TRITON and _TRITON[0] is not None:
        from .triton_set import raise_device_errors as check

        check(device)


def kernels_for(x: Tensor):
    """The kernel set for ``x``.

    Under ``torch.compile``: portable (inductor fuses it). Else ``SYNCBN_KERNELS`` when set, and
    by default: Triton on CUDA (float32/16/bf16, any dense layout) where ``triton`` imports,
    PyTorch's fused CUDA kernels for the rest of CUDA, portable on CPU. A set that does not cover
    an input (Triton and float64) falls back to the default for its device.
    """
    if torch.compiler.is_compiling():
        return PORTABLE
    requested = requested_kernels()
    if requested == "portable":
        return PORTABLE
    if requested == "triton" or (requested is None and x.is_cuda):
        triton_set = triton_kernel_set(required=requested == "triton")
        if triton_set is not None and triton_set.covers(x):
            if x.is_cuda:
                return triton_set
            from .triton_set import interpreted

            if not interpreted():
                raise RuntimeError(
                    "SYNCBN_KERNELS=triton expected CUDA tensors, or TRITON_INTERPRET=1 set "
                    "before triton is imported to run the kernels on CPU tensors (got a CPU "
                    "tensor without it)"
                )
            return triton_set
    if x.is_cuda:
        return FUSED
    if requested == "aten" and override.kernels is None:
        raise RuntimeError(
            "SYNCBN_KERNELS=aten expected CUDA tensors: PyTorch's synchronized-BN kernels are "
            "CUDA-only (got a CPU tensor); use portable or triton on CPU"
        )
    chosen = override.kernels
    if chosen is not None and getattr(chosen, "covers", None) is not None and not chosen.covers(x):
        return PORTABLE
    return chosen or PORTABLE
