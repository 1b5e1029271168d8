"""What the two MLP experiments (``gradient_flow.py``, ``bn_figure1.py``) share: the digits data,
a plain fully-connected network with or without BN, the global batches every configuration
draws, a gloo process group, and small statistics helpers.

Data parallelism is exact by construction: every configuration of a seed draws the same
sequence of *global* batches, and rank ``r`` of ``W`` takes the ``r``-th contiguous slice of
each. So ``W`` ranks x ``B`` with SyncBN sees, step for step, the same samples as one process x
``W B`` with BN, and the two differ only by floating-point round-off.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import syncbn
from syncbn.testing.bench import init_group  # noqa: F401 - the experiments' group setup, shared

NORMS = ("none", "bn", "syncbn")
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 1797 8x8 digits, pixels scaled to [0, 1] (16 -> 1) and flattened to 64
    features; a stratified split fixed by ``random_state=0`` (1437 train, 360 test)."""

    x_train: torch.Tensor  # (1437, 64) float32
    y_train: torch.Tensor  # (1437,) int64
    x_test: torch.Tensor  # (360, 64)
    y_test: torch.Tensor  # (360,)


def load_digits() -> Digits:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=0.2, random_state=0, stratify=data.target
    )
    return Digits(
        torch.tensor(x_train, dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.long),
        torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.long),
    )


def mlp(
    widths: list[int],
    norm: str,
    activation: str = "sigmoid",
    init_std: float | None = None,
    init_gain: float | None = None,
) -> nn.Sequential:
    """A plain fully-connected network (no residual connections): ``widths[0]`` inputs, hidden
    layers ``widths[1:-1]``, ``widths[-1]`` outputs.

    Each hidden layer is ``Linear -> act`` (``norm="none"``) or ``Linear(bias=False) -> BN ->
    act`` (BN before the nonlinearity, as in Ioffe & Szegedy; the BN shift replaces the bias).
    ``norm="bn"`` uses ``nn.BatchNorm1d`` (per-rank statistics under DDP), ``"syncbn"`` the same
    network passed through :func:`syncbn.convert_sync_batchnorm`. Weights keep PyTorch's default
    initialization (:math:`U(\\pm 1/\\sqrt{\\text{fan\\_in}})`) unless ``init_std`` is given
    (every weight drawn from :math:`\\mathcal{N}(0, \\text{init\\_std}^2)`) or ``init_gain``
    (:math:`\\mathcal{N}(0, \\text{init\\_gain}^2/\\text{fan\\_in})`, LeCun's scaling times a
    gain); with either, biases start at zero. Call under ``torch.manual_seed`` for a reproducible
    network.
    """
    if init_std is not None and init_gain is not None:
        raise ValueError(
            f"mlp expected at most one of init_std and init_gain (got {init_std}, {init_gain})"
        )
    if norm not in NORMS:
        raise ValueError(f"mlp expected norm in {NORMS} (got {norm!r})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp expected activation in {tuple(ACTIVATIONS)} (got {activation!r})")
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-2], widths[1:-1], strict=True):
        layers.append(nn.Linear(fan_in, fan_out, bias=norm == "none"))
        if norm != "none":
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(ACTIVATIONS[activation]())
    layers.append(nn.Linear(widths[-2], widths[-1]))
    model = nn.Sequential(*layers)
    if init_std is not None or init_gain is not None:
        for layer in model:
            if isinstance(layer, nn.Linear):
                std = init_std if init_std is not None else init_gain / layer.in_features**0.5
                nn.init.normal_(layer.weight, std=std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return syncbn.convert_sync_batchnorm(model) if norm == "syncbn" else model


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def global_batches(n: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index tensors of ``batch`` training samples: a fresh permutation per epoch
    (seeded by ``seed``), the last partial batch of each epoch dropped."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(min(per_epoch, steps - done)):
            yield perm[i * batch : (i + 1) * batch]
        done += per_epoch


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch (the global batch divides evenly)."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]


def spawn(rank_fn, world_size: int, args):
    """Run ``rank_fn(rank, world_size, init_file, args)`` on ``world_size`` spawned processes
    (``file://`` rendezvous in a temporary directory) and return what rank 0 returned.

    Rank 0's result travels through a file, not a queue: a result larger than a pipe's buffer
    would block rank 0 in ``put`` while the parent waits for the ranks to exit.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _spawned,
            args=(rank_fn, world_size, os.path.join(tmp, "rdzv"), args, tmp),
            nprocs=world_size,
            start_method="spawn",
        )
        return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)


def _spawned(rank: int, rank_fn, world_size: int, init_file: str, args, tmp: str) -> None:
    result = rank_fn(rank, world_size, init_file, args)
    if rank == 0:
        torch.save(result, os.path.join(tmp, "result.pt"))


def finish_group() -> None:
    """Tear the group down only when every rank is done and no DDP reducer is left to collect:
    a reducer collected after ``destroy_process_group``, or a peer tearing its gloo pairs down
    first, can abort a rank (``terminate called without an active exception``)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` in eval mode (BN with its running statistics); restores the mode."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def mean_min_max(values: list[float]) -> dict:
    """Mean, min and max over seeds (``mean`` is None when no value is finite)."""
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "min": min(finite) if finite else None,
        "max": max(finite) if finite else None,
        "n": len(values),
        "non_finite": len(values) - len(finite),
    }


def geo_mean(values: list[float]) -> float:
    """Geometric mean: the right average for ratios spanning orders of magnitude."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return float("nan")
    return math.exp(statistics.fmean(math.log(v) for v in positive))


def rounded(values, digits: int = 5):
    """Floats to ``digits`` significant digits (keeps the results JSON small and readable)."""
    if isinstance(values, float):
        return float(f"{values:.{digits}g}")
    return [rounded(v, digits) for v in values]


def write_json(path: Path, obj) -> None:
    """Indented JSON with each list of numbers on one line: small files that still read well."""

    def encode(o, level: int) -> str:
        pad = " " * level
        if isinstance(o, dict) and o:
            items = [f"{pad} {json.dumps(k)}: {encode(v, level + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in o):
            items = [f"{pad} {encode(v, level + 1)}" for v in o]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(o)

    Path(path).write_text(encode(obj, 0) + "\n")
