"""The SyncBatchNorm module: arguments, buffers and validation; when to synchronize, when not."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed as sbdist
from . import precision as sbprecision
from . import recompute as sbrecompute
from .debug import env_flag
from .function import SyncBatchNormFunction, SyncSpec
from .kernels import local_moments64, memory_format
from .moments import layer_signature

__all__ = ["SyncBatchNorm"]


_HALF_DTYPES = (torch.float16, torch.bfloat16)


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over the global batch of a process group, for any input rank >= 2.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, the mean and (biased) variance are taken per channel over the batch *of every
    rank in* ``process_group`` together: the result equals :class:`torch.nn.BatchNorm2d` (or 1d,
    3d) applied to the concatenation of all ranks' inputs. One ``all_reduce`` of :math:`2C + 2`
    values runs per forward and one of :math:`2C` values per backward, so the cost per layer does
    not grow with the number of ranks, unlike :class:`torch.nn.SyncBatchNorm`'s ``all_gather``.
    It runs on CPU (gloo) as well as CUDA (NCCL), and makes no device-to-host synchronization on
    CUDA, so it can be captured in CUDA graphs.

    It is a drop-in for :class:`torch.nn.BatchNorm2d` and :class:`torch.nn.SyncBatchNorm`: the same
    arguments, parameters, buffers and ``state_dict`` keys, so checkpoints load either way.
    ``SyncBatchNorm.convert_sync_batchnorm(module, process_group)`` works as ``nn.SyncBatchNorm``'s:
    it is :func:`syncbn.convert_sync_batchnorm`, attached to this class by :mod:`syncbn.convert`,
    which imports this module (this module imports neither it nor :mod:`syncbn.norm_act`).

    In eval mode, when ``torch.distributed`` is not initialized, and when the group has a single
    rank, it behaves exactly like ``nn.BatchNorm`` and communicates nothing.

    Running statistics are updated from the *global* batch, with the unbiased global variance:
    ``running = (1 - momentum) * running + momentum * observed``; ``momentum=None`` gives the
    cumulative average over ``num_batches_tracked`` batches (computed on device, no sync). Every
    rank ends up with the same running statistics.

    Weight and bias gradients are each rank's local share, as for any parameter under
    DistributedDataParallel, which averages them; they are not reduced here.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, *)`.
        eps: added to the variance for numerical stability. Default: ``1e-5``
        momentum: weight of the new observation in the running statistics, or ``None`` for a
            cumulative moving average. Default: ``0.1``
        affine: learnable per-channel ``weight`` (:math:`\gamma`) and ``bias`` (:math:`\beta`).
            Default: ``True``
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``
            buffers and use them in eval mode; otherwise batch statistics are used in eval mode
            too (locally, as in ``nn.SyncBatchNorm``). Default: ``True``
        process_group: the ranks whose batches are normalized together (``None``: all ranks).
            See :func:`syncbn.new_sync_group`. Default: ``None``
        bias: with ``affine``, a learnable ``bias`` (:math:`\beta`); ``False`` keeps ``weight``
            only and registers ``bias`` as ``None``, as ``nn.SyncBatchNorm(bias=False)`` does.
            Default: ``True``
        debug: before each collective, check that every rank of the group is in the same layer
            with the same channel count and dtype, and raise naming each rank's position if not
            (one extra small collective each; :mod:`syncbn.debug`). ``None``: on when the
            environment sets ``SYNCBN_DEBUG=1``. Default: ``None``
        check_finite: raise naming the layer when the global batch statistics hold NaN or Inf
            (a host sync per forward on CUDA). ``None``: on when ``SYNCBN_CHECK_FINITE=1``.
            Default: ``None``

    The layer calls itself by :attr:`layer_name` in errors: its path in the model when made by
    :func:`syncbn.convert_sync_batchnorm`, else ``SyncBatchNorm#k`` (the k-th one built).

    Shape:
        - Input: :math:`(N, C, *)`, e.g. :math:`(N, C)`, :math:`(N, C, L)`, :math:`(N, C, H, W)`,
          :math:`(N, C, D, H, W)`. :math:`N` may differ between ranks and may be 0 on some.
        - Output: same shape, dtype and memory format as the input.

    Examples::

        >>> bn = syncbn.SyncBatchNorm(64)
        >>> model = syncbn.convert_sync_batchnorm(torchvision_model)
        >>> ddp = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        debug: bool | None = None,
        check_finite: bool | None = None,
    ) -> None:
        _validate_arguments(num_features, eps, momentum)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if affine and not bias:  # torch's own bias=False, also where _BatchNorm lacks the keyword
            self.register_parameter("bias", None)
        self.process_group = process_group
        self.debug = env_flag("SYNCBN_DEBUG") if debug is None else bool(debug)
        self.check_finite = (
            env_flag("SYNCBN_CHECK_FINITE") if check_finite is None else bool(check_finite)
        )
        SyncBatchNorm._built += 1
        self.layer_name = f"SyncBatchNorm#{SyncBatchNorm._built}"
        self._observe = False  # syncbn.telemetry: record the next training forward
        self._observation = None
        self._named, self._signature = None, 0  # the signature of layer_name (see _spec)

    _built = 0  # layers built in this process, for default names
    _always_sync = False  # tests, benchmarks: the synchronized path even on one rank

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expected input of at least 2 dimensions (N, C, *) "
                f"(got {input.dim()}D input of shape {tuple(input.shape)})"
            )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` of shape :math:`(N, C, *)`.

        ``mask`` (optional, bool, shape :math:`(N, *)` or broadcastable to it; ``True`` marks a
        real element) restricts the layer to the real elements of a padded batch: only they enter
        the (global) statistics and the running statistics, which equal ``nn.BatchNorm1d`` applied
        to the real elements of all ranks' batches gathered as rows of shape :math:`(M, C)`.
        Padded positions output zero and receive zero gradient, and they do not move the real
        elements' gradients either. Ranks may hold any number of real elements, including none.
        """
        self._check_input(input)
        if mask is not None:
            return self._masked_forward(input, mask)
        world_size = self._sync_world_size()
        # syncbn.recompute: under torch.utils.checkpoint this forward runs again in backward;
        # that rerun updates no running statistics and (synchronized) reuses the first's.
        rerun = self.training and sbrecompute.recomputing()
        if not world_size:
            if rerun:
                return sbrecompute.local_rerun(self, input)
            if sbprecision.mixed_parameters(self):  # FSDP2's bfloat16 parameters, float32 stats
                output = sbprecision.local_batch_norm(self, input)
            else:
                output = super().forward(input)
            if self._observe and self.training:
                self._record(input)
            return output
        if rerun:
            return sbrecompute.synchronized_rerun(self, input, self._spec(world_size))

        tracking = self.track_running_stats
        output, mean, invstd, count = SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.momentum if tracking else 0.0,
            self.eps,
            self._spec(world_size),
            self.num_batches_tracked if tracking else None,  # advanced by the function
        )
        if self._observe:
            self._record(input, mean, invstd, count)
        sbrecompute.keep(self, input, mean, invstd, count)  # for checkpoint's rerun
        return output

    # ------------------------------------------------------------------ telemetry

    def observe_next_batch(self) -> None:
        """Record local and global statistics of the next training forward (syncbn.telemetry)."""
        self._observe = True
        self._observation = None

    def pop_observation(self) -> tuple[Tensor, ...] | None:
        """``(local count, local mean, local var, global count, global mean, global var)``
        recorded since :meth:`observe_next_batch` (float64, biased variances), or ``None``."""
        observation, self._observation, self._observe = self._observation, None, False
        return observation

    @torch.no_grad()
    def _record(self, input: Tensor, mean=None, invstd=None, count=None) -> None:
        if torch.compiler.is_compiling():
            return
        local_count, local_mean, local_var = local_moments64(input.detach())
        if mean is None:  # not synchronized: the local batch is the normalization batch
            mean, var, count = local_mean, local_var, local_count
        else:
            mean = mean.double()
            var = (invstd.double().pow(-2) - self.eps).clamp_min(0)
        self._observation = (local_count, local_mean, local_var, count, mean, var)
        self._observe = False

    def _masked_forward(self, input: Tensor, mask: Tensor) -> Tensor:
        """Gather the real elements as rows ``(M, C)``, normalize those, scatter back into zeros.

        Reusing the unmasked path on the gathered rows keeps one implementation of the statistics,
        the collectives and their gradients; autograd's gather and scatter give the padded
        positions zero gradient.
        """
        real = self._expand_mask(input, mask)
        channels_last = input.movedim(1, -1)  # (N, *, C)
        # SyncBatchNorm's own forward: a subclass's (norm + activation) wraps this one.
        rows = SyncBatchNorm.forward(self, channels_last[real])  # (M, C)
        output = torch.zeros_like(channels_last).index_put((real,), rows)
        return output.movedim(-1, 1).contiguous(memory_format=memory_format(input))

    def _expand_mask(self, input: Tensor, mask: Tensor) -> Tensor:
        """``mask`` validated and expanded to ``(N, *)``: the input's shape without channels."""
        name = type(self).__name__
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(
                f"{name} expected mask to be a torch.bool tensor, True for real elements "
                f"(got {got}); pass e.g. lengths[:, None] > torch.arange(L)"
            )
        target = (input.shape[0], *input.shape[2:])
        if mask.dim() == input.dim() and mask.shape[1] == 1:
            mask = mask.squeeze(1)  # (N, 1, *): a channel axis of size one
        try:
            fits = mask.dim() == len(target)
            fits = fits and torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:  # not broadcastable
            fits = False
        if not fits:
            raise ValueError(
                f"{name} expected mask of shape (N, *) = {target}, or broadcastable to it, for "
                f"input of shape {tuple(input.shape)} (got mask of shape {tuple(mask.shape)})"
            )
        if mask.device != input.device:
            raise ValueError(
                f"{name} expected mask on the input's device {input.device} (got {mask.device})"
            )
        return mask.expand(target)

    # ------------------------------------------------------------------ helpers

    def _sync_world_size(self) -> int:
        """The group's size when this forward synchronizes, else 0.

        Synchronize in training only, with torch.distributed up and more than one rank in the
        group (or ``_always_sync`` set: tests and benchmarks run the synchronized path on one).
        """
        if not self.training or not sbdist.is_initialized():
            return 0
        if not sbdist.is_group_member(self.process_group):
            raise ValueError(
                f"{type(self).__name__} expected this rank to be a member of its process_group "
                f"(got rank {sbdist.get_rank()} and a group it does not belong to); pass the group "
                f"this rank is in, e.g. the one syncbn.new_sync_group(k) returns"
            )
        world_size = sbdist.get_world_size(self.process_group)
        return world_size if world_size > 1 or self._always_sync else 0

    def _check_input(self, input: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name} expected a torch.Tensor (got {type(input).__name__})")
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name} expected input with {self.num_features} channels in dim 1 "
                f"(got {input.shape[1]}, input shape {tuple(input.shape)})"
            )
        if not input.is_floating_point():
            raise TypeError(
                f"{name} expected a floating-point input (got {input.dtype}); convert it with "
                f"input.float()"
            )
        reference = self.weight if self.weight is not None else self.running_mean
        if reference is None or input.dtype == reference.dtype:
            return
        if input.dtype in _HALF_DTYPES and reference.dtype == torch.float32:
            return  # mixed precision: half input, float32 parameters and statistics
        raise TypeError(
            f"{name} expected input of dtype {reference.dtype} like its parameters, or "
            f"float16/bfloat16 with float32 parameters (got {input.dtype}); cast the input or "
            f"call module.to({input.dtype})"
        )

    # (name, negative_slope) of an activation the kernels apply after the affine map, set by
    # SyncBatchNormAct for the duration of a forward it fuses (syncbn.norm_act).
    _fused_activation: tuple[str, float] | None = None

    def _spec(self, world_size: int) -> SyncSpec:
        """This forward's :class:`SyncSpec`; the signature is recomputed only on a rename."""
        if self._named != self.layer_name:
            self._named = self.layer_name
            self._signature = layer_signature(self.layer_name, self.num_features)
        return SyncSpec(
            self.process_group,
            world_size,
            self.layer_name,
            self._signature,
            self.debug,
            self.check_finite,
            activation=self._fused_activation,
        )


def _validate_arguments(num_features, eps, momentum) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(
            f"SyncBatchNorm expected num_features to be a positive integer (got {num_features!r})"
        )
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"SyncBatchNorm expected eps >= 0 (got {eps!r})")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
        raise ValueError(
            f"SyncBatchNorm expected momentum in [0, 1] or None (got {momentum!r}); None gives "
            f"a cumulative moving average"
        )
