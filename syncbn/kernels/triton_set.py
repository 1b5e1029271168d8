r"""The Triton kernel set: a layer's forward+backward in four launches and two all-reduces.

:class:`TritonKernels` launches the kernels of :mod:`syncbn.kernels.triton_kernels` and owns
every per-channel step between them (the other sets leave those to
:mod:`syncbn.function`), so on CUDA a training step launches nothing else for the layer: no
zero-fill, cast, copy or small per-channel op. Its contracts, at the call:

- **Inputs.** float32, float16 or bfloat16, shape :math:`(N, C, *)` whose spatial dimensions
  collapse into one stride (any dense layout: contiguous, channels_last, channels_last_3d,
  ``(N, C)``; :meth:`covers` says whether a tensor qualifies). float64 and anything else keeps
  the other sets. Parameters may be float32 or the input's dtype; running statistics any float.
- **Statistics** are float32 (the saved mean and invstd), the forward buffer float64
  (:mod:`syncbn.moments`), the backward buffer float32.
- **Empty input** (:math:`N S = 0`) is fine: the moments kernel writes zeros and the count 0,
  the backward kernel zero sums; only the elementwise kernels are skipped.
- **Checks** (ranks at different layers; one value per channel) are done in the normalize
  kernel, on device: a failed check makes the layer's output NaN, leaves the running statistics
  untouched and records the layer in a per-device error word, which
  :func:`raise_device_errors` turns into the host path's error, naming the layer (on CPU tensors
  right away; on CUDA at the next call, e.g. where training reads its loss).
- **An activation** (``("relu" | "leaky_relu" | "silu", negative_slope)``, for
  :class:`syncbn.SyncBatchNormAct`) is applied in the normalize kernel, and its derivative in the
  two backward kernels, with its input recomputed from ``x``: no extra pass, nothing more saved.
- **num_batches_tracked** is advanced by the moments kernel, and ``momentum=None`` reads it in
  the normalize kernel: no host read, no extra launch.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is first imported): the same code, which is how CI checks it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..moments import MIXED_LAYERS_MESSAGE, ONE_VALUE_MESSAGE
from . import triton_kernels as tk

__all__ = ["TritonKernels", "device_error_word", "raise_device_errors"]

COVERED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE_ELEMENTS = 4096  # per tile: rows x channels, a power of two
PROGRAMS_PER_SM = 4  # enough programs in flight to hide memory latency
PROGRAMS_ON_CPU = 4  # the interpreter: several splits per channel, so the combine is exercised


@dataclass(frozen=True)
class Geometry:
    """A tensor of shape :math:`(N, C, *)` as :math:`(N, C, S)` with one stride per axis."""

    n: int
    c: int
    s: int
    strides: tuple[int, int, int]


def _spatial_geometry(t: Tensor) -> Geometry | None:
    """:class:`Geometry` of ``t``: its spatial dimensions must form one arithmetic progression
    of addresses (every dense layout does; an expanded tensor with zero strides too)."""
    n, c, *spatial = t.shape
    stride_n, stride_c, *spatial_strides = t.stride()
    s, stride_s = 1, None
    for size, stride in reversed(list(zip(spatial, spatial_strides, strict=True))):
        if size == 1:
            continue
        if stride_s is None:
            stride_s = stride
        elif stride != stride_s * s:
            return None
        s *= size
    return Geometry(n, c, s, (stride_n, stride_c, 1 if stride_s is None else stride_s))


@dataclass(frozen=True)
class Plan:
    """How one launch covers the tensor: tiles of ``block_r`` rows by ``block_c`` channels,
    ``blocks`` channel blocks by ``splits`` programs each."""

    block_r: int
    block_c: int
    rows_span_images: bool
    tiles: int
    tiles_per_image: int
    tiles_per_split: int
    splits: int
    blocks: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.blocks, self.splits)


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def plan(geometry: Geometry, channels_inner: bool, target_programs: int) -> Plan:
    """Tiles along the memory's contiguous axis; enough splits for ``target_programs``."""
    n, c, s = geometry.n, geometry.c, geometry.s
    if channels_inner or s == 1:  # rows r = n S + s, each row BLOCK_C contiguous channels
        block_c = min(_next_power_of_2(c), 64)
        block_r = max(1, min(TILE_ELEMENTS // block_c, _next_power_of_2(max(n * s, 1))))
        tiles_per_image = 1
        tiles = -(-n * s // block_r)
        rows_span_images = True
    else:  # one image's spatial positions per tile, contiguous per channel
        block_r = min(_next_power_of_2(s), TILE_ELEMENTS)
        block_c = max(1, min(_next_power_of_2(c), TILE_ELEMENTS // block_r))
        tiles_per_image = -(-s // block_r)
        tiles = n * tiles_per_image
        rows_span_images = False
    blocks = -(-c // block_c)
    splits = max(1, min(tiles, -(-target_programs // blocks)))
    tiles_per_split = max(1, -(-tiles // splits))
    splits = max(1, -(-tiles // tiles_per_split))
    return Plan(
        block_r, block_c, rows_span_images, tiles, tiles_per_image, tiles_per_split, splits, blocks
    )


_PROGRAMS: dict[torch.device, int] = {}


def _target_programs(device: torch.device) -> int:
    programs = _PROGRAMS.get(device)
    if programs is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            programs = PROGRAMS_PER_SM * sms
        else:
            programs = PROGRAMS_ON_CPU
        _PROGRAMS[device] = programs
    return programs


_COUNTERS: dict[tuple, Tensor] = {}


def _counters(device: torch.device, blocks: int) -> Tensor:
    """Integer tickets per channel block, zero between launches (the last program of a block
    resets its counter). One array per device and stream: launches on one stream run in order."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < blocks:
        counters = _COUNTERS[key] = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=device)
    return counters


_ERRORS: dict[torch.device, Tensor] = {}
_LAYER_NAMES: dict[int, str] = {}


def device_error_word(device: torch.device) -> Tensor:
    """The per-device int64 word where the normalize kernel records the first failed check
    (``code + 4 * signature``; 0: none)."""
    word = _ERRORS.get(device)
    if word is None:
        word = _ERRORS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return word


def raise_device_errors(device: torch.device | None = None) -> None:
    """Raise the error of the first failed device-side check since the last call, naming the
    layer, and clear it (a host read of one word per device that ran the Triton kernels)."""
    devices = [device] if device is not None else list(_ERRORS)
    for dev in devices:
        word = _ERRORS.get(dev)
        if word is None:
            continue
        value = int(word.item())
        if value == 0:
            continue
        word.zero_()
        code, signature = value % 4, value // 4
        name = _LAYER_NAMES.get(signature, f"<signature {signature}>")
        if code == tk.ERROR_MIXED_LAYERS:
            raise RuntimeError(MIXED_LAYERS_MESSAGE.format(name=name))
        raise ValueError(f"SyncBatchNorm layer {name!r}: " + ONE_VALUE_MESSAGE.format(count=1))


class TritonKernels:
    """Four Triton launches per layer forward+backward (contracts: module docstring)."""

    name = "triton"
    owns_per_channel_steps = True  # the whole step between collectives: syncbn.in_kernels

    def __init__(self, target_programs: int | None = None) -> None:
        self.target_programs = target_programs  # None: by device (tests shrink or grow it)

    @staticmethod
    def covers(x: Tensor) -> bool:
        """Whether this set takes ``x``: float32/16/bf16 with collapsible spatial strides."""
        return x.dtype in COVERED_DTYPES and _spatial_geometry(x) is not None

    def _plan(self, x: Tensor, geometry: Geometry) -> Plan:
        programs = self.target_programs or _target_programs(x.device)
        channels_inner = geometry.strides[1] == 1 and geometry.c > 1
        return plan(geometry, channels_inner, programs)

    # ------------------------------------------------------------------------------ forward

    def pack_moments(
        self,
        x: Tensor,
        running_mean: Tensor | None,
        num_batches_tracked: Tensor | None,
        signature: int,
        layer_name: str,
    ) -> tuple[Tensor, Tensor]:
        """This rank's float64 ``(2C+2,)`` buffer (:mod:`syncbn.moments`) and the shift it used.
        Advances ``num_batches_tracked`` when given. One launch."""
        geometry = _spatial_geometry(x)
        p = self._plan(x, geometry)
        c = geometry.c
        device = x.device
        _LAYER_NAMES[signature] = layer_name
        buffer = torch.empty(2 * c + 2, dtype=torch.float64, device=device)
        shift = torch.empty(c, dtype=torch.float64, device=device)
        part_mean = torch.empty((p.splits, c), dtype=torch.float64, device=device)
        part_m2 = torch.empty((p.splits, c), dtype=torch.float32, device=device)
        part_count = torch.empty((p.blocks, p.splits), dtype=torch.int64, device=device)
        tk._moments[p.grid](
            x,
            running_mean if running_mean is not None else buffer,
            shift,
            part_mean,
            part_m2,
            part_count,
            _counters(device, p.blocks),
            buffer,
            num_batches_tracked if num_batches_tracked is not None else part_count,
            geometry.n,
            c,
            geometry.s,
            *geometry.strides,
            p.tiles,
            p.tiles_per_image,
            p.tiles_per_split,
            p.splits,
            signature,
            HAS_SHIFT=running_mean is not None,
            ADVANCE_NUM_BATCHES=num_batches_tracked is not None,
            BLOCK_R=p.block_r,
            BLOCK_C=p.block_c,
            ROWS_SPAN_IMAGES=p.rows_span_images,
        )
        return buffer, shift

    def normalize_with_global_statistics(
        self,
        x: Tensor,
        buffer: Tensor,
        shift: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        momentum: float | None,
        eps: float,
        expected_signatures: int,
        signature: int,
        activation: tuple[str, float] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(output, mean, invstd)`` from the reduced buffer (``mean`` is ``(2, C)``: the
        float32 mean and its float32 remainder, which the backward kernels centre with);
        updates the running statistics (``momentum=None``: the cumulative average, from
        ``num_batches_tracked``) and checks the buffer (module docstring). One launch, also for
        an empty input."""
        tracking = running_mean is not None
        if tracking and momentum is None and num_batches_tracked is None:
            raise ValueError(
                "SyncBatchNorm expected num_batches_tracked with momentum=None (the cumulative "
                "average weighs by it) (got None); pass the layer's counter or a float momentum"
            )
        geometry = _spatial_geometry(x)
        p = self._plan(x, geometry)
        c = geometry.c
        output = torch.empty_like(x)
        mean = torch.empty(2, c, dtype=torch.float32, device=x.device)  # [mean; low part]
        invstd = torch.empty(c, dtype=torch.float32, device=x.device)
        y_geometry = _spatial_geometry(output)
        tk._normalize[p.grid](
            x,
            output,
            weight if weight is not None else invstd,
            bias if bias is not None else invstd,
            buffer,
            shift,
            mean[0],
            mean[1],
            invstd,
            running_mean if tracking else invstd,
            running_var if tracking else invstd,
            num_batches_tracked if num_batches_tracked is not None else buffer,
            device_error_word(x.device),
            geometry.n,
            c,
            geometry.s,
            *geometry.strides,
            *y_geometry.strides,
            p.tiles,
            p.tiles_per_image,
            p.tiles_per_split,
            eps,
            0.0 if momentum is None else float(momentum),
            expected_signatures,
            signature,
            _slope(activation),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_RUNNING=tracking,
            ACTIVATION=_code(activation),
            MOMENTUM_FROM_COUNT=tracking and momentum is None,
            BLOCK_R=p.block_r,
            BLOCK_C=p.block_c,
            ROWS_SPAN_IMAGES=p.rows_span_images,
        )
        return output, mean, invstd

    @staticmethod
    def replay_buffer(
        mean: Tensor, invstd: Tensor, count: Tensor, eps: float, expected_signatures: int
    ) -> tuple[Tensor, Tensor]:
        r"""A reduced buffer and shift that :meth:`normalize_with_global_statistics` turns back
        into ``mean`` and ``invstd`` (gradient checkpointing's rerun: :mod:`syncbn.recompute`):
        :math:`[n \sigma^2 | 0 | n | W s]` around the shift :math:`\mu`."""
        var = invstd.double().pow(-2).sub_(eps).clamp_min_(0)  # (C,)
        n = count.double().reshape(1)
        signatures = torch.full_like(n, float(expected_signatures))
        buffer = torch.cat([var * n, torch.zeros_like(var), n, signatures])
        return buffer, mean.double()

    # ----------------------------------------------------------------------------- backward

    def backward_shares(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        buffer: Tensor,
        weight: Tensor | None,
        need_weight: bool,
        need_bias: bool,
        bias: Tensor | None = None,
        activation: tuple[str, float] | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(shares, grad_weight, grad_bias)``: the ``(2C,)`` float32 :math:`\\frac1n [\\sum g
        | \\sum g (x - \\mu)]` of this rank for the all-reduce, and this rank's parameter
        gradients (in the weight's dtype, ``None`` where not needed). One launch."""
        geometry = _spatial_geometry(x)
        dy_geometry = _spatial_geometry(dy)
        p = self._plan(x, geometry)
        c = geometry.c
        device = x.device
        shares = torch.empty(2 * c, dtype=torch.float32, device=device)
        part_dy = torch.empty((p.splits, c), dtype=torch.float32, device=device)
        part_dy_xmu = torch.empty((p.splits, c), dtype=torch.float32, device=device)
        param_dtype = weight.dtype if weight is not None else torch.float32
        grad_weight = torch.empty(c, dtype=param_dtype, device=device) if need_weight else None
        grad_bias = torch.empty(c, dtype=param_dtype, device=device) if need_bias else None
        tk._backward_reduce[p.grid](
            dy,
            x,
            mean[0],
            mean[1],
            invstd,
            weight if weight is not None else invstd,
            bias if bias is not None else invstd,
            buffer,
            part_dy,
            part_dy_xmu,
            _counters(device, p.blocks),
            shares,
            grad_weight if grad_weight is not None else shares,
            grad_bias if grad_bias is not None else shares,
            geometry.n,
            c,
            geometry.s,
            *geometry.strides,
            *dy_geometry.strides,
            p.tiles,
            p.tiles_per_image,
            p.tiles_per_split,
            p.splits,
            _slope(activation),
            WRITE_WEIGHT=need_weight,
            WRITE_BIAS=need_bias,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            ACTIVATION=_code(activation),
            BLOCK_R=p.block_r,
            BLOCK_C=p.block_c,
            ROWS_SPAN_IMAGES=p.rows_span_images,
        )
        return shares, grad_weight, grad_bias

    def grad_input(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight,
        means: Tensor,
        bias: Tensor | None = None,
        activation: tuple[str, float] | None = None,
    ) -> Tensor:
        """The input gradient from the group's means (the reduced ``(2C,)`` shares), in ``x``'s
        dtype and layout. One launch; none for an empty input."""
        grad = torch.empty_like(x)
        if x.numel() == 0:
            return grad
        geometry = _spatial_geometry(x)
        p = self._plan(x, geometry)
        tk._grad_input[p.grid](
            dy,
            x,
            grad,
            mean[0],
            mean[1],
            invstd,
            weight if weight is not None else invstd,
            bias if bias is not None else invstd,
            means,
            geometry.n,
            geometry.c,
            geometry.s,
            *geometry.strides,
            *_spatial_geometry(dy).strides,
            *_spatial_geometry(grad).strides,
            p.tiles,
            p.tiles_per_image,
            p.tiles_per_split,
            _slope(activation),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            ACTIVATION=_code(activation),
            BLOCK_R=p.block_r,
            BLOCK_C=p.block_c,
            ROWS_SPAN_IMAGES=p.rows_span_images,
        )
        return grad


def _code(activation: tuple[str, float] | None) -> int:
    return tk.ACTIVATIONS[activation[0] if activation else None]


def _slope(activation: tuple[str, float] | None) -> float:
    return float(activation[1]) if activation else 0.0


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
