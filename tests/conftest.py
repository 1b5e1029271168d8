"""Shared fixtures: the multi-process gloo harness, and W&B kept off the network."""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.harness import WorkerPool

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors, interpreted (CI)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def worker_pool():
    pool = WorkerPool()
    yield pool
    pool.close()


@pytest.fixture
def run_ranks(worker_pool, tmp_path):
    """``run_ranks(fn, world_size, *args, **kwargs)`` -> list of per-rank results."""

    def run(fn, world_size, *args, **kwargs):
        return worker_pool.run(fn, world_size, tmp_path, *args, **kwargs)

    return run
