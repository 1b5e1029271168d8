"""Small ``torch.distributed`` helpers that are safe to call with no process group.

Every query returns the single-process answer (world size 1, rank 0) when ``torch.distributed``
is unavailable or not initialized, so library and training code can call them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "all_reduce_sum",
    "as_process_group",
    "get_rank",
    "get_world_size",
    "group_ranks",
    "is_group_member",
    "is_initialized",
    "new_sync_group",
]


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_world_size(group: ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if is_initialized() else 1


def get_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if is_initialized() else 0


def is_group_member(group: ProcessGroup | None) -> bool:
    """True when this process belongs to ``group`` (``None``: the world, which it always does)."""
    if group is None or not is_initialized():
        return True
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        return False
    return dist.get_rank(group) >= 0


def group_ranks(group: ProcessGroup | None) -> list[int]:
    """Global ranks that make up ``group`` (default: the world)."""
    if not is_initialized():
        return [0]
    if group is None:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def new_sync_group(group_size: int) -> ProcessGroup | None:
    """Split the world into groups of ``group_size`` consecutive ranks; return this rank's group.

    Ranks ``[0, k)``, ``[k, 2k)``, ... each form one group, as apex's and mmcv's "SyncBN across k
    GPUs" options do: on nodes of 8 GPUs, ``new_sync_group(8)`` synchronizes within each node only.
    Every rank must call this (``torch.distributed.new_group`` is collective), with the same
    ``group_size``. Returns ``None`` (the whole world) when ``group_size`` equals the world size,
    and when no process group is initialized.

    Args:
        group_size: ranks per group; must be positive and divide the world size.

    Example::

        >>> group = new_sync_group(2)  # world of 4: ranks {0, 1} and {2, 3}
        >>> model = convert_sync_batchnorm(model, process_group=group)
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"new_sync_group expected a positive integer group_size (got {group_size!r})"
        )
    if not is_initialized():
        return None
    world_size = dist.get_world_size()
    if world_size % group_size != 0:
        raise ValueError(
            f"new_sync_group expected group_size to divide the world size {world_size} "
            f"(got {group_size}); choose one of {divisors(world_size)}"
        )
    if group_size == world_size:
        return None
    rank = dist.get_rank()
    mine = None
    # new_group is collective: every rank creates every group, in the same order.
    for start in range(0, world_size, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = group
    return mine


def as_process_group(group, mesh_dim: int | str | None = None) -> ProcessGroup | None:
    """``group`` itself, or for a ``DeviceMesh`` the process group of its dimension ``mesh_dim``.

    With FSDP2's HSDP or a 2-D (data, tensor) parallel mesh, BatchNorm synchronizes over the
    data-parallel dimension: pass its index or name. A 1-D mesh needs none.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(group, DeviceMesh):
        if mesh_dim is not None:
            raise ValueError(
                f"syncbn expected mesh_dim only with a DeviceMesh as the group (got mesh_dim="
                f"{mesh_dim!r} with {type(group).__name__}); pass the mesh itself"
            )
        return group
    if mesh_dim is None and group.ndim > 1:
        raise ValueError(
            f"syncbn expected mesh_dim, the data-parallel dimension, for a {group.ndim}-D "
            f"DeviceMesh (got None); pass one of {group.mesh_dim_names or tuple(range(group.ndim))}"
        )
    return group.get_group(mesh_dim if mesh_dim is not None else 0)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` and return the result (which may be ``tensor`` itself).

    Eager mode reduces in place with ``dist.all_reduce``. Under ``torch.compile`` the traceable
    functional collective is used instead, so a model holding SyncBatchNorm compiles with
    ``fullgraph=True`` (the in-place c10d op is a graph break).
    """
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        reduced = funcol.all_reduce(tensor, "sum", group if group is not None else dist.group.WORLD)
        # An explicit wait: it is side-effectful, so the graph keeps the collective even where
        # its result is unused (an empty rank's backward), and every rank issues the same ones.
        return funcol.wait_tensor(reduced)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_for_layer(
    packed: torch.Tensor, group: ProcessGroup | None, layer_name: str, phase: str
) -> torch.Tensor:
    """all_reduce_sum, with a failure (a peer died, the group timed out) naming the layer."""
    if torch.compiler.is_compiling():
        return all_reduce_sum(packed, group)
    try:
        return all_reduce_sum(packed, group)
    except RuntimeError as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"SyncBatchNorm layer {layer_name!r}: the {phase} all_reduce of {packed.numel()} "
            f"values failed ({cause}). A peer rank probably crashed or timed out, or the ranks "
            f"ran SyncBN layers a different number of times; rerun with SYNCBN_DEBUG=1 to find "
            f"the first divergent layer"
        ) from error


def divisors(n: int) -> list[int]:
    """The valid group sizes for a world of ``n`` ranks."""
    return [d for d in range(1, n + 1) if n % d == 0]
