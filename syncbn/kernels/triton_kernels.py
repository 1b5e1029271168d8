r"""The four Triton kernels of a synchronized BN layer: two per pass, one all-reduce between each.

A layer's training forward+backward launches exactly these four kernels and its two all-reduces;
every per-channel step (the float64 merge around the running mean, the running-statistics update,
invstd, the layer-signature and one-value checks, an empty global batch, the backward's shares of
the means) happens inside the kernels that touch the activation::

    forward:  _moments   -> all_reduce(2C + 2 float64) -> _normalize
    backward: _backward_reduce -> all_reduce(2C float32) -> _grad_input

**Addressing.** The input of shape :math:`(N, C, *)` is addressed as :math:`(N, C, S)` with
:math:`S` the product of the spatial sizes and one stride per axis, given separately for every
tensor (``x``, ``y``, ``dy``, ``dx`` may differ in layout; an expanded ``dy`` has zero strides).
A program covers ``BLOCK_C`` channels (grid axis 0) and a share of the *tiles* of
``BLOCK_R`` rows (grid axis 1, the *split*). Two tilings, a compile-time choice:

- ``ROWS_SPAN_IMAGES=False`` (channels-first, ``stride(1) != 1``): a tile is ``BLOCK_R``
  consecutive spatial positions of one image, contiguous in memory per channel;
- ``ROWS_SPAN_IMAGES=True`` (channels-last, ``(N, C)``): a tile is ``BLOCK_R`` consecutive rows
  :math:`r = nS + s` across images, each row ``BLOCK_C`` contiguous channels.

Offsets are 64-bit. **Accumulation**: float32 within a program (each tile centred on its own mean
and merged with Chan's formula, so large means lose nothing), float64 across programs and for
every per-channel formula. **Determinism**: no floating-point atomics. Where a channel's reduction
is split over programs, each program writes its partial result, takes a ticket from an integer
counter, and the program that takes the last ticket combines the partials in split order (then
resets the counter to zero for the next launch). The result does not depend on which program
finishes last.

The same code runs compiled on a GPU and on CPU tensors under ``TRITON_INTERPRET=1`` (CI).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Error codes that _normalize writes into the device error word (code + 4 * signature).
ERROR_MIXED_LAYERS = 1
ERROR_ONE_VALUE = 2
# The activations the normalize kernel can apply (SyncBatchNormAct), by their ACTIVATION code.
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3}
_MIXED_LAYERS = tl.constexpr(ERROR_MIXED_LAYERS)
_ONE_VALUE = tl.constexpr(ERROR_ONE_VALUE)


@triton.jit
def _tile_rows(t, N, S, tiles_per_image, BLOCK_R: tl.constexpr, ROWS_SPAN_IMAGES: tl.constexpr):
    """Image index ``n`` and spatial index ``s`` (both (BLOCK_R,) int64) of tile ``t``'s rows,
    and which of them exist."""
    r = tl.arange(0, BLOCK_R)
    if ROWS_SPAN_IMAGES:
        row = (tl.zeros([BLOCK_R], dtype=tl.int64) + t) * BLOCK_R + r
        n = row // S
        s = row - n * S
        exists = row < (tl.zeros([BLOCK_R], dtype=tl.int64) + N) * S
    else:
        image = t // tiles_per_image
        s = ((t - image * tiles_per_image) * BLOCK_R + r).to(tl.int64)
        n = s * 0 + image
        exists = s < S
    return n, s, exists


@triton.jit
def _split_range(split, tiles, tiles_per_split):
    begin = split * tiles_per_split
    end = tl.minimum(begin + tiles_per_split, tiles)
    return begin, end


@triton.jit
def _take_last_ticket(counter_ptr, splits):
    """Whether this program is the last of its channel block to finish (then the counter is
    reset). The barrier completes every thread's partial-result stores before the ticket is
    taken; the atomic (acquire-release, GPU scope) orders them before the tickets of later
    programs, and the last program's loads after every ticket."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    last = ticket == splits - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


@triton.jit
def _affine(
    invstd, weight_ptr, bias_ptr, cols, col_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """Per channel ``(gamma invstd, beta)`` in float32: ``x - mean`` to the layer's output."""
    scale = invstd.to(tl.float32)
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _at(n, s, stride_n, stride_s, col_offsets):
    """The (BLOCK_R, BLOCK_C) element offsets of a tile in a tensor of these strides."""
    return (n * stride_n + s * stride_s)[:, None] + col_offsets[None, :]


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr, negative_slope):
    """The fused activation of ``SyncBatchNormAct`` (:data:`ACTIVATIONS`), elementwise."""
    out = z
    if ACTIVATION == 1:  # relu
        out = tl.maximum(z, 0.0)
    if ACTIVATION == 2:  # leaky_relu
        out = tl.where(z > 0.0, z, z * negative_slope)
    if ACTIVATION == 3:  # silu
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _through_activation(dy, z, ACTIVATION: tl.constexpr, negative_slope):
    """The gradient ``dy`` of the activation's output, taken back to its input ``z`` (as
    PyTorch's relu, leaky_relu and silu backward compute it; 0 for relu at ``z = 0``)."""
    out = dy
    if ACTIVATION == 1:
        out = tl.where(z > 0.0, dy, 0.0)
    if ACTIVATION == 2:
        out = tl.where(z > 0.0, dy, dy * negative_slope)
    if ACTIVATION == 3:
        sigmoid = tl.sigmoid(z)
        out = dy * sigmoid * (1.0 + z * (1.0 - sigmoid))
    return out


@triton.jit
def _moments(
    x_ptr,
    shift_ptr,  # running_mean (the shift K), read only if HAS_SHIFT
    shift_copy_ptr,  # (C,) float64: K as used here, for _normalize
    part_mean_ptr,  # (splits, C) float32 partials
    part_m2_ptr,
    part_count_ptr,  # (channel blocks, splits) int64
    counter_ptr,  # (channel blocks,) int32, zero between launches
    buffer_ptr,  # (2C + 2,) float64: this rank's [n(v + d^2) | n d | n | s]
    num_batches_ptr,  # num_batches_tracked, advanced by one if ADVANCE_NUM_BATCHES
    N,
    C,
    S,
    sxN,
    sxC,
    sxS,
    tiles,
    tiles_per_image,
    tiles_per_split,
    splits,
    signature,
    HAS_SHIFT: tl.constexpr,
    ADVANCE_NUM_BATCHES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_SPAN_IMAGES: tl.constexpr,
):
    r"""This rank's local moments, packed around the shift: one read of ``x``.

    Grid ``(ceil(C / BLOCK_C), splits)``. Each program merges its tiles' means and centred sums
    of squares (float32, Chan); the last program of a channel block merges the ``splits``
    partials in order (float64) into :math:`n_r, m_r, M_r` and writes
    :math:`[M_r + n_r d_r^2 \,|\, n_r d_r]` with :math:`d_r = m_r - K`; the last program of
    block 0 also writes :math:`[n_r \,|\, s]` and advances ``num_batches_tracked``.
    """
    block = tl.program_id(0)
    split = tl.program_id(1)
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    col_off = cols.to(tl.int64) * sxC

    # Values are taken relative to an anchor, the program's first value per channel: float32
    # then keeps digits relative to the spread, not to the mean (exact at any |mean| / std).
    begin, end = _split_range(split, tiles, tiles_per_split)
    n, s, exists = _tile_rows(begin, N, S, tiles_per_image, BLOCK_R, ROWS_SPAN_IMAGES)
    first = tl.sum(tl.where(tl.arange(0, BLOCK_R) == 0, n * sxN + s * sxS, 0), axis=0)
    has_rows = (tl.zeros([BLOCK_C], dtype=tl.int32) + begin) < end
    anchor = tl.load(x_ptr + first + col_off, mask=col_ok & has_rows, other=0.0)
    anchor = anchor.to(tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)  # relative to the anchor
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.int64)  # the same in every lane
    for t in range(begin, end):
        n, s, exists = _tile_rows(t, N, S, tiles_per_image, BLOCK_R, ROWS_SPAN_IMAGES)
        ok = exists[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + _at(n, s, sxN, sxS, col_off), mask=ok, other=0.0)
        x = tl.where(ok, x.to(tl.float32) - anchor[None, :], 0.0)
        tile_count = tl.sum(exists.to(tl.int64), axis=0)
        tile_mean = tl.sum(x, axis=0) / tile_count.to(tl.float32)
        centred = tl.where(ok, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=0)
        merged = count + tile_count
        weight = tile_count.to(tl.float32) / merged.to(tl.float32)
        delta = tile_mean - mean
        mean += delta * weight
        m2 += tile_m2 + delta * delta * (count.to(tl.float32) * weight)
        count = merged

    tl.store(part_mean_ptr + split * C + cols, anchor.to(tl.float64) + mean, mask=col_ok)
    tl.store(part_m2_ptr + split * C + cols, m2, mask=col_ok)
    tl.store(
        part_count_ptr + block * splits + split + cols * 0, count, mask=cols == block * BLOCK_C
    )
    if _take_last_ticket(counter_ptr + block, splits):
        total = tl.zeros([BLOCK_C], dtype=tl.float64)
        mean64 = tl.zeros([BLOCK_C], dtype=tl.float64)
        m2_64 = tl.zeros([BLOCK_C], dtype=tl.float64)
        for k in range(0, splits):
            part_count = tl.load(part_count_ptr + block * splits + k + cols * 0).to(tl.float64)
            part_mean = tl.load(part_mean_ptr + k * C + cols, mask=col_ok, other=0.0)
            part_m2 = tl.load(part_m2_ptr + k * C + cols, mask=col_ok, other=0.0)
            merged = total + part_count
            weight = part_count / tl.maximum(merged, 1.0)
            delta = part_mean - mean64
            mean64 += delta * weight
            m2_64 += part_m2.to(tl.float64) + delta * delta * (total * weight)
            total = merged
        shift = tl.zeros([BLOCK_C], dtype=tl.float64)
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0).to(tl.float64)
        tl.store(shift_copy_ptr + cols, shift, mask=col_ok)
        d = mean64 - shift
        tl.store(buffer_ptr + cols, m2_64 + total * d * d, mask=col_ok)
        tl.store(buffer_ptr + C + cols, total * d, mask=col_ok)
        first_lane = cols == 0  # in block 0 only
        tl.store(buffer_ptr + 2 * C + cols * 0, total, mask=first_lane)
        signatures = tl.zeros([BLOCK_C], dtype=tl.float64) + signature
        tl.store(buffer_ptr + 2 * C + 1 + cols * 0, signatures, mask=first_lane)
        if ADVANCE_NUM_BATCHES:
            if block == 0:
                tl.store(num_batches_ptr, tl.load(num_batches_ptr) + 1)


@triton.jit
def _normalize(
    x_ptr,
    y_ptr,
    weight_ptr,
    bias_ptr,
    buffer_ptr,  # (2C + 2,) float64, reduced: [Q | P | n | sum of signatures]
    shift_copy_ptr,  # (C,) float64: the shift K that _moments used
    mean_ptr,  # (C,) float32 out: the global mean (saved for backward)
    mean_low_ptr,  # (C,) float32 out: mean - float32(mean), for centring at float64 accuracy
    invstd_ptr,  # (C,) float32 out: 1 / sqrt(var + eps)
    running_mean_ptr,
    running_var_ptr,
    num_batches_ptr,
    error_ptr,  # (1,) int64: the first error's code + 4 * signature, 0 when none
    N,
    C,
    S,
    sxN,
    sxC,
    sxS,
    syN,
    syC,
    syS,
    tiles,
    tiles_per_image,
    tiles_per_split,
    eps,
    momentum,
    expected_signatures,
    signature,
    negative_slope,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    ACTIVATION: tl.constexpr,
    MOMENTUM_FROM_COUNT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_SPAN_IMAGES: tl.constexpr,
):
    r"""The global statistics from the reduced buffer, then :math:`y = (x - \mu)\,\gamma\,
    \mathrm{invstd} + \beta`: one read of ``x``, one write of ``y``.

    Grid ``(ceil(C / BLOCK_C), splits)``. Every program merges its channels' statistics in
    float64 (:math:`\mu = K + P/n`, :math:`\sigma^2 = Q/n - (P/n)^2`); split 0 also writes the
    saved mean and invstd, updates the running statistics (unbiased variance
    :math:`\sigma^2 n / (n - 1)`; untouched when :math:`n = 0`; ``momentum`` or
    :math:`1 / \text{num\_batches\_tracked}`) and checks the layer signature and that
    :math:`n \ne 1`. A failed check records the error and makes this layer's output NaN; it
    never updates the running statistics.
    """
    block = tl.program_id(0)
    split = tl.program_id(1)
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C

    q = tl.load(buffer_ptr + cols, mask=col_ok, other=0.0)
    p = tl.load(buffer_ptr + C + cols, mask=col_ok, other=0.0)
    count = tl.load(buffer_ptr + 2 * C + cols * 0)
    signatures = tl.load(buffer_ptr + 2 * C + 1 + cols * 0)
    centred_mean = p / tl.maximum(count, 1.0)
    var = tl.maximum(q / tl.maximum(count, 1.0) - centred_mean * centred_mean, 0.0)
    mean = tl.load(shift_copy_ptr + cols, mask=col_ok, other=0.0) + centred_mean
    mixed = signatures != tl.zeros([BLOCK_C], dtype=tl.float64) + expected_signatures
    one_value = count == 1.0
    failed = mixed | one_value
    invstd = 1.0 / tl.sqrt(var + eps)
    invstd = tl.where(failed, tl.full([BLOCK_C], float("nan"), tl.float64), invstd)

    if split == 0:
        tl.store(mean_ptr + cols, mean.to(tl.float32), mask=col_ok)
        mean_low = mean - mean.to(tl.float32).to(tl.float64)
        tl.store(mean_low_ptr + cols, mean_low.to(tl.float32), mask=col_ok)
        tl.store(invstd_ptr + cols, invstd.to(tl.float32), mask=col_ok)
        if block == 0:
            code = tl.where(mixed, _MIXED_LAYERS, tl.where(one_value, _ONE_VALUE, 0))
            code = tl.max(code, axis=0).to(tl.int64)
            if code != 0:
                word = code + (code * 0 + signature) * 4  # in int64
                tl.atomic_cas(error_ptr, code * 0, word)
        if HAS_RUNNING:
            if MOMENTUM_FROM_COUNT:
                weight = 1.0 / tl.load(num_batches_ptr).to(tl.float64)
            else:
                weight = tl.zeros([BLOCK_C], dtype=tl.float64) + momentum
            update = (count > 0.0) & (~failed) & col_ok
            unbiased = var * (count / tl.maximum(count - 1.0, 1.0))
            running_mean = tl.load(running_mean_ptr + cols, mask=col_ok, other=0.0)
            running_var = tl.load(running_var_ptr + cols, mask=col_ok, other=0.0)
            new_mean = running_mean.to(tl.float64) + weight * (mean - running_mean.to(tl.float64))
            new_var = running_var.to(tl.float64) + weight * (unbiased - running_var.to(tl.float64))
            tl.store(
                running_mean_ptr + cols,
                new_mean.to(tl.float32).to(running_mean_ptr.dtype.element_ty),
                mask=update,
            )
            tl.store(
                running_var_ptr + cols,
                new_var.to(tl.float32).to(running_var_ptr.dtype.element_ty),
                mask=update,
            )

    scale, shift = _affine(invstd, weight_ptr, bias_ptr, cols, col_ok, HAS_WEIGHT, HAS_BIAS)
    mean_high = mean.to(tl.float32)
    mean_low = (mean - mean_high.to(tl.float64)).to(tl.float32)
    x_col = cols.to(tl.int64) * sxC
    y_col = cols.to(tl.int64) * syC
    begin, end = _split_range(split, tiles, tiles_per_split)
    for t in range(begin, end):
        n, s, exists = _tile_rows(t, N, S, tiles_per_image, BLOCK_R, ROWS_SPAN_IMAGES)
        ok = exists[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + _at(n, s, sxN, sxS, x_col), mask=ok, other=0.0)
        centred = (x.to(tl.float32) - mean_high[None, :]) - mean_low[None, :]
        y = _activate(centred * scale[None, :] + shift[None, :], ACTIVATION, negative_slope)
        tl.store(
            y_ptr + _at(n, s, syN, syS, y_col),
            y.to(y_ptr.dtype.element_ty),
            mask=ok,
        )


@triton.jit
def _backward_reduce(
    dy_ptr,
    x_ptr,
    mean_ptr,
    mean_low_ptr,
    invstd_ptr,
    weight_ptr,  # weight and bias: read only with an ACTIVATION (to recompute its input)
    bias_ptr,
    buffer_ptr,  # the forward's reduced buffer: the global count n is at [2C]
    part_dy_ptr,  # (splits, C) float32 partials
    part_dy_xmu_ptr,
    counter_ptr,
    shares_ptr,  # (2C,) float32 out: [sum dy / n | sum dy (x - mean) / n], this rank's sums
    grad_weight_ptr,  # (C,) out: sum dy (x - mean) invstd, this rank's (if WRITE_WEIGHT)
    grad_bias_ptr,  # (C,) out: sum dy, this rank's (if WRITE_BIAS)
    N,
    C,
    S,
    sxN,
    sxC,
    sxS,
    sgN,
    sgC,
    sgS,
    tiles,
    tiles_per_image,
    tiles_per_split,
    splits,
    negative_slope,
    WRITE_WEIGHT: tl.constexpr,
    WRITE_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_SPAN_IMAGES: tl.constexpr,
):
    r"""This rank's :math:`\sum g` and :math:`\sum g (x - \mu)` per channel: one read of ``dy``
    and ``x``. Grid ``(ceil(C / BLOCK_C), splits)``: float32 sums per program, the last program
    of a channel block adds the partials in split order in float64 and writes the shares of the
    means (both sums over the *global* count, so the all-reduce yields the group's means) and the
    local weight and bias gradients. With an ``ACTIVATION``, ``dy`` is first taken back through
    it, its input recomputed from ``x`` (nothing but ``x`` is saved)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    mean_low = tl.load(mean_low_ptr + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    scale, shift = _affine(invstd, weight_ptr, bias_ptr, cols, col_ok, HAS_WEIGHT, HAS_BIAS)
    x_col = cols.to(tl.int64) * sxC
    g_col = cols.to(tl.int64) * sgC

    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    begin, end = _split_range(split, tiles, tiles_per_split)
    for t in range(begin, end):
        n, s, exists = _tile_rows(t, N, S, tiles_per_image, BLOCK_R, ROWS_SPAN_IMAGES)
        ok = exists[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + _at(n, s, sxN, sxS, x_col), mask=ok, other=0.0)
        dy = tl.load(dy_ptr + _at(n, s, sgN, sgS, g_col), mask=ok, other=0.0)
        dy = dy.to(tl.float32)
        xmu = tl.where(ok, (x.to(tl.float32) - mean[None, :]) - mean_low[None, :], 0.0)
        if ACTIVATION != 0:
            z = xmu * scale[None, :] + shift[None, :]
            dy = _through_activation(dy, z, ACTIVATION, negative_slope)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xmu += tl.sum(dy * xmu, axis=0)

    tl.store(part_dy_ptr + split * C + cols, sum_dy, mask=col_ok)
    tl.store(part_dy_xmu_ptr + split * C + cols, sum_dy_xmu, mask=col_ok)
    if _take_last_ticket(counter_ptr + block, splits):
        total_dy = tl.zeros([BLOCK_C], dtype=tl.float64)
        total_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float64)
        for k in range(0, splits):
            total_dy += tl.load(part_dy_ptr + k * C + cols, mask=col_ok, other=0.0).to(tl.float64)
            part = tl.load(part_dy_xmu_ptr + k * C + cols, mask=col_ok, other=0.0)
            total_dy_xmu += part.to(tl.float64)
        count = tl.maximum(tl.load(buffer_ptr + 2 * C + cols * 0), 1.0)
        tl.store(shares_ptr + cols, (total_dy / count).to(tl.float32), mask=col_ok)
        tl.store(shares_ptr + C + cols, (total_dy_xmu / count).to(tl.float32), mask=col_ok)
        if WRITE_WEIGHT:
            grad_weight = total_dy_xmu * invstd.to(tl.float64)
            tl.store(
                grad_weight_ptr + cols,
                grad_weight.to(tl.float32).to(grad_weight_ptr.dtype.element_ty),
                mask=col_ok,
            )
        if WRITE_BIAS:
            tl.store(
                grad_bias_ptr + cols,
                total_dy.to(tl.float32).to(grad_bias_ptr.dtype.element_ty),
                mask=col_ok,
            )


@triton.jit
def _grad_input(
    dy_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    mean_low_ptr,
    invstd_ptr,
    weight_ptr,
    bias_ptr,  # read only with an ACTIVATION
    means_ptr,  # (2C,) float32, reduced: the group's [mean of dy | mean of dy (x - mean)]
    N,
    C,
    S,
    sxN,
    sxC,
    sxS,
    sgN,
    sgC,
    sgS,
    sdN,
    sdC,
    sdS,
    tiles,
    tiles_per_image,
    tiles_per_split,
    negative_slope,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_SPAN_IMAGES: tl.constexpr,
):
    r""":math:`dx = \gamma\,\mathrm{invstd}\,\big(g - \overline{g} - (x - \mu)\,
    \mathrm{invstd}^2\,\overline{g (x - \mu)}\big)`: one read of ``dy`` and ``x``, one write of
    ``dx``, float32 arithmetic. Grid ``(ceil(C / BLOCK_C), splits)``. With an ``ACTIVATION``,
    :math:`g` is ``dy`` taken back through it (and the means are of that, as reduced)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    mean_low = tl.load(mean_low_ptr + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    mean_dy = tl.load(means_ptr + cols, mask=col_ok, other=0.0)
    mean_dy_xmu = tl.load(means_ptr + C + cols, mask=col_ok, other=0.0)
    scale, shift = _affine(invstd, weight_ptr, bias_ptr, cols, col_ok, HAS_WEIGHT, HAS_BIAS)
    projection = mean_dy_xmu * invstd * invstd
    x_col = cols.to(tl.int64) * sxC
    g_col = cols.to(tl.int64) * sgC
    d_col = cols.to(tl.int64) * sdC
    begin, end = _split_range(split, tiles, tiles_per_split)
    for t in range(begin, end):
        n, s, exists = _tile_rows(t, N, S, tiles_per_image, BLOCK_R, ROWS_SPAN_IMAGES)
        ok = exists[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + _at(n, s, sxN, sxS, x_col), mask=ok, other=0.0)
        dy = tl.load(dy_ptr + _at(n, s, sgN, sgS, g_col), mask=ok, other=0.0)
        xmu = (x.to(tl.float32) - mean[None, :]) - mean_low[None, :]
        dy = dy.to(tl.float32)
        if ACTIVATION != 0:
            dy = _through_activation(
                dy, xmu * scale[None, :] + shift[None, :], ACTIVATION, negative_slope
            )
        dx = (dy - mean_dy[None, :] - xmu * projection[None, :]) * scale[None, :]
        tl.store(
            dx_ptr + _at(n, s, sdN, sdS, d_col),
            dx.to(dx_ptr.dtype.element_ty),
            mask=ok,
        )
