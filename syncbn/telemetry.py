r"""BN telemetry: is SyncBN worth its communication at this batch size?

For every :class:`syncbn.SyncBatchNorm` layer of a model, on the steps it is asked to, this
records the effective normalization batch (the global count :math:`n` of values per channel that
the statistics pooled) and how far each rank's *local* batch statistics are from the *global* ones
it normalized with:

.. math::

    d_\mu = \sqrt{\frac{1}{C} \sum_c \frac{(\mu_{r,c} - \mu_c)^2}{\sigma_c^2 + \epsilon}},
    \qquad
    d_{\sigma^2} = \sqrt{\frac{1}{C} \sum_c
        \left(\frac{\sigma_{r,c}^2 + \epsilon}{\sigma_c^2 + \epsilon} - 1\right)^2}

(root mean square over channels). :math:`d_\mu` is how many global standard deviations the
local mean is off: the shift that plain per-rank BN would add to every normalized value, and
:math:`d_{\sigma^2}` the relative error of its variance. For independent samples
:math:`d_\mu \approx 1/\sqrt{n_r}` with :math:`n_r` the local values per channel; near zero, the
local batch already estimates the statistics well and synchronizing buys little; at 0.3 or more,
per-rank BN would normalize with a visibly different scale and shift on every rank.

Usage (every rank calls both, on the same steps; :meth:`BNTelemetry.collect` runs two small
all-reduces)::

    telemetry = BNTelemetry(model)
    for step, (x, y) in enumerate(loader):
        if step % 100 == 0:
            telemetry.arm()  # the next forward of each layer is recorded
        train_step(x, y)
        if step % 100 == 0:
            metrics = telemetry.collect()  # {"bn/<layer>/mean_drift": ..., ...}

Unarmed steps cost one attribute check per layer. An armed step costs one extra pass over each
layer's input (its local moments) and, in :meth:`~BNTelemetry.collect`, two all-reduces of
:math:`4L` and :math:`3L` values for :math:`L` layers and a device-to-host copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import distributed as sbdist
from .batchnorm import SyncBatchNorm

__all__ = ["BNTelemetry"]


class BNTelemetry:
    """Records per-layer global batch and local-vs-global drift of a model's SyncBatchNorm layers.

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapping it); its
            :class:`syncbn.SyncBatchNorm` layers are observed, named by their path in the model.
        process_group: the ranks whose drifts are averaged (and maximized) in the metrics.
            Default: all ranks.
    """

    def __init__(self, model: nn.Module, process_group: dist.ProcessGroup | None = None):
        self.layers = [
            (name.removeprefix("module."), m)
            for name, m in model.named_modules()
            if isinstance(m, SyncBatchNorm)
        ]
        self.process_group = process_group

    def arm(self) -> None:
        """Record the next training forward of every layer."""
        for _, layer in self.layers:
            layer.observe_next_batch()

    def collect(self) -> dict[str, float]:
        """Per-layer and overall metrics of the recorded forwards, pooled over ranks.

        Keys, for each layer ``<name>``: ``bn/<name>/global_count`` (values per channel in the
        normalization batch), ``bn/<name>/mean_drift`` and ``bn/<name>/var_drift`` (the mean over
        the ranks that held data), ``bn/<name>/mean_drift_max`` and ``bn/<name>/var_drift_max``
        (the worst rank); and over all layers ``bn/mean_drift``, ``bn/var_drift`` (means) and
        ``bn/mean_drift_max``. Layers not run since :meth:`arm` are left out. Call on every rank.
        """
        if not self.layers:
            return {}
        rows = []
        for _, layer in self.layers:
            seen = layer.pop_observation()
            rows.append(_drifts(seen, layer.eps) if seen is not None else None)
        device = _device(self.layers[0][1])
        zeros = torch.zeros(3, dtype=torch.float64, device=device)
        # per layer: [mean drift, var drift, rank has data] summed; [mean, var, count] maxed
        summed = torch.stack([r[:3] if r is not None else zeros for r in rows])
        maxed = torch.stack(
            [torch.stack([r[0], r[1], r[3]]) if r is not None else zeros for r in rows]
        )
        seen_any = torch.tensor([float(r is not None) for r in rows], dtype=torch.float64,
                                device=device)  # fmt: skip
        if sbdist.is_initialized() and sbdist.get_world_size(self.process_group) > 1:
            summed = torch.cat([summed.flatten(), seen_any])
            dist.all_reduce(summed, group=self.process_group)
            seen_any = summed[-len(rows) :]
            summed = summed[: -len(rows)].view(-1, 3)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=self.process_group)
        summed, maxed, seen_any = summed.tolist(), maxed.tolist(), seen_any.tolist()

        metrics: dict[str, float] = {}
        means, variances, worst = [], [], []
        for (name, _), (d_mean, d_var, ranks), (max_mean, max_var, count), seen in zip(
            self.layers, summed, maxed, seen_any, strict=True
        ):
            if not seen:
                continue
            ranks = max(ranks, 1.0)
            metrics |= {
                f"bn/{name}/global_count": count,
                f"bn/{name}/mean_drift": d_mean / ranks,
                f"bn/{name}/var_drift": d_var / ranks,
                f"bn/{name}/mean_drift_max": max_mean,
                f"bn/{name}/var_drift_max": max_var,
            }
            means.append(d_mean / ranks)
            variances.append(d_var / ranks)
            worst.append(max_mean)
        if means:
            metrics |= {
                "bn/mean_drift": sum(means) / len(means),
                "bn/var_drift": sum(variances) / len(variances),
                "bn/mean_drift_max": max(worst),
            }
        return metrics

    def summary(self, metrics: dict[str, float]) -> str:
        """One line for the log: layers, global batch range, drifts and the worst layer."""
        names = [n for n, _ in self.layers if f"bn/{n}/mean_drift" in metrics]
        if not names:
            return "bn telemetry: no SyncBatchNorm layer ran since arm()"
        counts = [metrics[f"bn/{n}/global_count"] for n in names]
        worst = max(names, key=lambda n: metrics[f"bn/{n}/mean_drift_max"])
        return (
            f"bn telemetry: {len(names)} layers, global batch {min(counts):.0f}-{max(counts):.0f} "
            f"values/channel, local-vs-global mean drift {metrics['bn/mean_drift']:.3f} "
            f"(worst rank {metrics['bn/mean_drift_max']:.3f}, layer {worst!r}), "
            f"var drift {metrics['bn/var_drift']:.3f}"
        )


def _drifts(seen: tuple, eps: float) -> torch.Tensor:
    """``[mean drift, var drift, 1 (has data), global count]`` of one layer on this rank, or
    zeros with ``has data = 0`` when this rank's batch was empty."""
    local_count, local_mean, local_var, count, mean, var = seen
    denominator = var + eps
    d_mean = ((local_mean - mean).square() / denominator).mean().sqrt()
    d_var = ((local_var + eps) / denominator - 1).square().mean().sqrt()
    has_data = (local_count > 0).double()
    return torch.stack([d_mean * has_data, d_var * has_data, has_data, count.double()])


def _device(layer: nn.Module) -> torch.device:
    for tensor in (*layer.parameters(), *layer.buffers()):
        return tensor.device
    return torch.device("cpu")
