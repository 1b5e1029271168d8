"""syncbn.lightning.SyncBatchNormPlugin in a real lightning.pytorch.Trainer on 2 gloo ranks.

Each rank is one of the harness's workers (its process group already up, ``LOCAL_RANK`` set, as
under torchrun), so Lightning's "ddp" strategy launches nothing and uses that group. The model's
first layer is BatchNorm, so its running statistics after a few steps do not depend on training
and must equal ``nn.BatchNorm1d`` run on the global batches (both ranks' shards concatenated).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

pytest.importorskip("lightning")

STEPS = 3
C = 3
BATCH = (4, 6)  # per rank: shards of different sizes and distributions


def _shard(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(BATCH[rank] * STEPS, C, generator=generator) * (1 + 2 * rank) + 3 * rank


def _fit(root: str) -> dict:
    import lightning.pytorch as pl

    import syncbn
    from syncbn.lightning import SyncBatchNormPlugin

    rank = dist.get_rank()
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2")

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(C)
            self.head = nn.Linear(C, 1)
            self.seen: list[dict] = []

        def training_step(self, batch, batch_index):
            (x,) = batch
            loss = self.head(self.bn(x)).square().mean()
            self.seen.append({"ours": isinstance(self.bn, syncbn.SyncBatchNorm)})
            return loss

        def on_train_batch_end(self, outputs, batch, batch_index):
            self.seen[-1]["state"] = {k: v.clone() for k, v in self.bn.named_buffers()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(_shard(rank))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH[rank], shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[SyncBatchNormPlugin()],
        max_steps=STEPS,
        use_distributed_sampler=False,  # each rank keeps its own shard
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    model = Net()
    trainer.fit(model, loader)
    return {"seen": model.seen, "after": type(model.bn).__name__}


def test_plugin_synchronizes_during_fit_and_reverts_after(run_ranks, tmp_path):
    results = run_ranks(_fit, 2, str(tmp_path), timeout=120)

    reference = nn.BatchNorm1d(C)
    for step in range(STEPS):
        batches = [_shard(r)[step * BATCH[r] : (step + 1) * BATCH[r]] for r in range(2)]
        reference(torch.cat(batches))
        for rank, result in enumerate(results):
            seen = result["seen"][step]
            assert seen["ours"], f"rank {rank} trained with {result['after']}, not SyncBatchNorm"
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close(seen["state"][name], getattr(reference, name), msg=f"{name}, {rank=}")
    assert [result["after"] for result in results] == ["BatchNorm1d", "BatchNorm1d"]
