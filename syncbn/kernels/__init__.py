r"""The per-device kernels of the synchronized layer: the one place that tells CPU from CUDA.

:mod:`syncbn.function` runs the same algorithm everywhere (local moments, one all-reduce, global
statistics, normalize; backward: two local sums, one all-reduce, input gradient) and calls one of
three kernel sets for the steps that touch the full input (:func:`kernels_for` chooses;
``SYNCBN_KERNELS=triton|aten|portable`` names one):

- :class:`~syncbn.kernels.triton_set.TritonKernels` (``triton_set.py``, kernels in
  ``triton_kernels.py``): four Triton launches per layer forward+backward that also do every
  per-channel step (its contracts are in its module). The default in eager mode on CUDA for
  float32/float16/bfloat16 input whenever ``triton`` imports; on CPU tensors through Triton's
  interpreter (``TRITON_INTERPRET=1``), which is how CI checks it.
- :class:`PortableKernels` (``portable.py``): composite ATen ops (``mean``, ``sub``,
  ``batch_norm`` in eval mode, ``native_batch_norm_backward``). Used on CPU, and under
  ``torch.compile`` on every device, where inductor fuses them (PyTorch's CUDA-only kernels below
  have no meta kernels, so a graph with symbolic sizes could not be traced through them).
- :class:`FusedKernels` (``aten.py``, the "aten" set): PyTorch's own CUDA kernels for synchronized
  BN (``batch_norm_update_stats``, ``batch_norm_elemt``, ``batch_norm_backward_reduce``,
  ``batch_norm_backward_elemt``), one launch per step, channels-last aware. Used in eager mode on
  CUDA where the Triton set does not apply (float64, layouts it cannot address, no triton). Their
  contracts, read from ``aten/src/ATen/native/cuda/Normalization.cu(h)``, and what this class does
  about each:

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
from types import SimpleNamespace

import torch
from torch import Tensor

from .aten import FusedKernels
from .common import (
    autocast_off,
    channel_view,
    dense,
    local_moments64,
    memory_format,
    reduce_dims,
    stat_dtype,
)
from .portable import PortableKernels

__all__ = [
    "FusedKernels",
    "PortableKernels",
    "autocast_off",
    "channel_view",
    "dense",
    "reduce_dims",
    "fused_steps",
    "kernels_for",
    "raise_device_errors",
    "requested_kernels",
    "triton_kernel_set",
    "local_moments64",
    "memory_format",
    "stat_dtype",
]

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


_COMPILED_TRITON: list = []


def _compiled_kernels_for(x: Tensor):
    """Under ``torch.compile``: the portable ops (inductor fuses them), or with
    ``SYNCBN_COMPILE_KERNELS=triton`` the Triton kernels as custom ops
    (:mod:`syncbn.kernels.triton_ops`) where they cover ``x``."""
    value = os.environ.get("SYNCBN_COMPILE_KERNELS", "").strip().lower()
    if value in ("", "portable"):
        return PORTABLE
    if value != "triton":
        raise ValueError(
            f"SYNCBN_COMPILE_KERNELS expected triton or portable (got {value!r}); unset it for "
            f"the portable ops, which inductor fuses"
        )
    if not _COMPILED_TRITON:
        from .triton_ops import CompiledTritonKernels

        _COMPILED_TRITON.append(CompiledTritonKernels())
    compiled = _COMPILED_TRITON[0]
    return compiled if compiled.covers(x) else PORTABLE


def kernels_for(x: Tensor):
    """The kernel set for ``x``.

    Under ``torch.compile``: portable (inductor fuses it), or the Triton custom ops with
    ``SYNCBN_COMPILE_KERNELS=triton``. Else ``SYNCBN_KERNELS`` when set, and
    by default: Triton on CUDA (float32/16/bf16, any dense layout) where ``triton`` imports,
    PyTorch's fused CUDA kernels for the rest of CUDA, portable on CPU. A set that does not cover
    an input (Triton and float64) falls back to the default for its device.
    """
    if torch.compiler.is_compiling():
        return _compiled_kernels_for(x)
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
