"""Opt-in checks that turn silent distributed mistakes into errors naming the layer and the rank.

- ``SYNCBN_DEBUG=1`` (or ``SyncBatchNorm(..., debug=True)``): before each of its collectives, a
  layer all-gathers a fingerprint ``(layer name, channels, dtype, phase)`` from every rank of its
  group and raises, on every rank, naming each rank's position when they differ.
  Ranks that run different layers, or SyncBN a different number of times (conditional
  computation), then fail at the first divergent call with the same-sized check on both sides,
  instead of pairing unrelated collectives (wrong numbers, a gloo size error, or a hang). One
  extra small collective per SyncBN collective, only in debug mode.
- ``SYNCBN_CHECK_FINITE=1`` (or ``check_finite=True``): NaN or Inf in the global batch statistics
  raises naming the layer and whether this rank's own input was finite (a host sync on CUDA).

Both variables read 1/true/yes/on (any case) as on, 0/false/no/off or unset as off; any other
value raises when a layer is built, so a misspelt flag does not leave a check silently off.

Normal mode pays nothing: the flags are read once, when a layer is built.
"""

from __future__ import annotations

import os
import zlib

import torch
import torch.distributed as dist

__all__ = ["check_finite_statistics", "check_same_call", "env_flag"]

_PHASES = ("forward", "backward")


_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"", "0", "false", "no", "off"})


def env_flag(name: str) -> bool:
    """Environment variable ``name`` as a flag: 1/true/yes/on or 0/false/no/off in any case and
    with surrounding spaces; unset or empty is off. Any other value raises a ``ValueError``: a
    misspelt ``SYNCBN_DEBUG`` must not leave the check silently off."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _ON | _OFF:
        return value in _ON
    raise ValueError(
        f"SyncBatchNorm expected {name} to be 1/true/yes/on or 0/false/no/off (got {raw!r}); "
        f"set {name}=1 to turn it on, unset it to turn it off"
    )


def check_same_call(
    layer_name: str, num_channels: int, dtype: torch.dtype, phase: str, group, device
) -> None:
    """Raise on every rank of ``group`` unless all are at the same SyncBN call."""
    mine = torch.tensor(
        [
            zlib.crc32(layer_name.encode()),
            num_channels,
            zlib.crc32(str(dtype).encode()),
            _PHASES.index(phase),
        ],
        dtype=torch.int64,
        device=device,
    )
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    # Every rank saw the same mismatch, so every rank takes part in this second gather.
    where = f"{phase} of layer {layer_name!r} ({num_channels} channels, {dtype})"
    everyone: list[str | None] = [None] * world
    dist.all_gather_object(everyone, where, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else range(world)
    positions = "; ".join(f"rank {r}: {w}" for r, w in zip(ranks, everyone, strict=True))
    raise RuntimeError(
        f"SyncBatchNorm expected every rank of its group at the same layer, channel count "
        f"and dtype (got {positions}). Ranks must run SyncBN layers in the same order and "
        f"the same number of times: with conditional computation, run the skipped layers on "
        f"every rank (e.g. on an empty batch) or give them a process_group of the ranks that "
        f"run them"
    )


def check_finite_statistics(
    layer_name: str, mean: torch.Tensor, var: torch.Tensor, local_input: torch.Tensor
) -> None:
    """Raise when the global mean or variance holds NaN or Inf."""
    bad = ~(torch.isfinite(mean) & torch.isfinite(var))
    if not bool(bad.any()):
        return
    channels = bad.nonzero().flatten().tolist()
    local = "finite" if bool(torch.isfinite(local_input).all()) else "NOT finite"
    raise FloatingPointError(
        f"SyncBatchNorm expected finite batch statistics in layer {layer_name!r} (got NaN/Inf "
        f"in the global mean or variance of channels {channels[:10]}"
        f"{' ...' if len(channels) > 10 else ''}); this rank's input to the layer is {local}. "
        f"Look for a diverging loss (lower the learning rate, clip gradients) or bad input data"
    )
