r"""Global batch statistics from one all-reduce: what each rank sends, and what it makes of the sum.

Rank :math:`r` of a group of :math:`W` holds :math:`n_r` values per channel with local mean
:math:`m_r` and biased variance :math:`v_r`. With a *shift* :math:`K` that every rank of the group
already shares (the layer's running mean; zero without one) and :math:`d_r = m_r - K`, it sends
one float64 buffer of :math:`2C + 2` values,

.. math::

    \big[\; n_r (v_r + d_r^2) \;\big|\; n_r d_r \;\big|\; n_r \;\big|\; s \;\big]
    \quad\xrightarrow{\ \text{all\_reduce(sum)}\ }\quad
    \big[\; Q \;\big|\; P \;\big|\; n \;\big|\; \textstyle\sum_r s_r \;\big]

and every rank gets the statistics of the global batch exactly (Chan's parallel merge):

.. math::

    \mu = K + \frac{P}{n}, \qquad
    \sigma^2 = \frac{Q}{n} - \Big(\frac{P}{n}\Big)^2, \qquad
    \sigma^2_{\text{unbiased}} = \sigma^2 \, \frac{n}{n - 1}.

**Why a shift.** :math:`Q/n - (P/n)^2` subtracts two numbers of size
:math:`(\mu - K)^2 + \sigma^2` to get :math:`\sigma^2`, losing
:math:`\log_{10}\big(1 + (\mu - K)^2 / \sigma^2\big)` of float64's 16 digits: with :math:`K = 0`,
14 of them at :math:`|\mu| / \sigma = 10^7` (the variance 1% off) and all at :math:`10^8`. The
running mean is shared by every rank of the group (the same updates from the same reduced sums;
DDP broadcasts it too) and tracks :math:`\mu`, so the merge is exact once it has caught up. What
remains: a layer's first steps, before its running mean approaches :math:`\mu` (with
``momentum=0.1`` it closes 90% of the gap in 22 steps), and layers with
``track_running_stats=False``, merge around zero. Both are exact to
:math:`10^{-16}(\mu - K)^2 / \sigma^2` relative, so only inputs with :math:`|\mu - K| / \sigma`
beyond about :math:`10^6` notice. (Each rank's own :math:`m_r, v_r` come from a centred two-pass
or Welford computation and are exact at any :math:`|\mu|/\sigma`.)

**The signature** :math:`s` is a per-layer integer in :math:`[1, 2^{31})` (a hash of the layer's
name and width). Each rank checks that the group's sum is :math:`W s`: ranks that reached
*different* layers of the same width, whose buffers would otherwise add up into wrong statistics
without any error, are caught by the collective they already run. Sums stay exact in float64
for groups of up to :math:`2^{22}` ranks.

**Counts** travel as float64: exact up to :math:`2^{53}` values per channel.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MIXED_LAYERS_MESSAGE",
    "ONE_VALUE_MESSAGE",
    "expected_signatures",
    "layer_signature",
    "pack",
    "tail",
]

SIGNATURE_RANGE = 2**31 - 1

# What the two checks of the reduced buffer (its count, its signatures) say when they fail.
ONE_VALUE_MESSAGE = (
    "SyncBatchNorm expected more than 1 value per channel across the process group when "
    "training (got {count}); use a larger batch, sync over more ranks, or call .eval()"
)
MIXED_LAYERS_MESSAGE = (
    "SyncBatchNorm layer {name!r} expected every rank of its group in this layer (got another "
    "rank at a different SyncBatchNorm layer, or at this one with another number of channels, "
    "whose statistics would have been mixed into this one's). Ranks must run SyncBN layers in "
    "the same order and the same number of times; rerun with SYNCBN_DEBUG=1 to see each "
    "rank's layer. Layers built outside convert_sync_batchnorm are named SyncBatchNorm#k in "
    "construction order per process: if ranks built different numbers of them, name them by "
    "their path in the model with syncbn.convert_sync_batchnorm(model)"
)


def layer_signature(layer_name: str, num_channels: int) -> int:
    """The layer's :math:`s \\in [1, 2^{31})`: the same on every rank that runs the same layer.

    FNV-1a over the name and width, in plain Python so that ``torch.compile`` can fold it.
    """
    h = 2166136261
    for char in f"{layer_name}/{num_channels}":
        h = ((h ^ ord(char)) * 16777619) & 0xFFFFFFFF
    return 1 + h % (SIGNATURE_RANGE - 1)


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(values: list[float], device: torch.device) -> Tensor:
    """A float64 tensor of ``values`` on ``device``, made once (no per-step op)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float64, device=device)
    key = (tuple(values), device)
    cached = _CONSTANTS.get(key)
    if cached is None:
        if len(_CONSTANTS) > 4096:
            _CONSTANTS.clear()
        cached = _CONSTANTS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return cached


def tail(signature: int, device: torch.device) -> Tensor:
    """The constant ``[1, s]`` (float64) that ends every buffer."""
    return _constant([1.0, float(signature)], device)


def expected_signatures(signature: int, world_size: int, device: torch.device) -> Tensor:
    """The constant ``[W s]`` (float64): the reduced signature when every rank is at the layer."""
    return _constant([float(world_size * signature)], device)


def pack(mean: Tensor, var: Tensor, count: int, shift: Tensor | None, end: Tensor) -> Tensor:
    r"""This rank's buffer :math:`[n_r (v_r + d_r^2) \,|\, n_r d_r \,|\, n_r \,|\, s]`, float64.

    ``mean`` and ``var`` (``(C,)``, biased) are this rank's local moments (zeros, derived from
    the input, on an empty rank), ``count`` its :math:`n_r`, ``shift`` the group's shared
    :math:`K` (``None``: zero), ``end`` the layer's :func:`tail`. Four ops: the squares are
    taken in float64, where :math:`d_r^2` keeps its digits at large :math:`|d_r|`.
    """
    c = mean.numel()
    buffer = torch.cat([var, mean, end])  # (C,), (C,), (2,) -> (2C+2,), promoted to float64
    d = buffer[c : 2 * c]
    if shift is not None:
        d.sub_(shift)
    buffer[:c].addcmul_(d, d)
    buffer[: 2 * c + 1].mul_(count)  # the signature is not scaled
    return buffer
