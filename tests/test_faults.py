"""Faults injected for real: a worker SIGKILLed under torchrun --max-restarts, a checkpoint write
killed halfway, two simulated nodes on loopback, and a 4-rank soak with empty batches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn.training import checkpoint
from syncbn.training.env import attempt_store
from tests.test_training import QUIET, ROOT, _env, train

pytestmark = pytest.mark.slow

JOB = ["trainer.epochs=4", "trainer.batch_size=32", "norm=syncbn", "seed=5"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """The uninterrupted single-node 2-rank run the faulty ones must reproduce."""
    return train(tmp_path_factory.mktemp("whole") / "run", *JOB, nproc=2)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _launch(run_dir: Path, *launcher: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "train.py"),
           f"hydra.run.dir={run_dir}", *QUIET, *JOB]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_sigkilled_worker_is_restarted_by_torchrun_and_resumes_losing_nothing(
    tmp_path, two_rank_run
):
    run_dir = tmp_path / "run"
    agent = _launch(run_dir, "--standalone", "--nproc_per_node=2", "--max-restarts=1")
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and agent.poll() is None:
        time.sleep(0.02)
    workers = _children(agent.pid)
    assert len(workers) == 2, f"expected 2 workers under torchrun (got {workers})"
    os.kill(workers[1], signal.SIGKILL)
    killed_at = checkpoint.load(last)["epoch"]
    try:
        output, _ = agent.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        agent.kill()
        output, _ = agent.communicate()
        pytest.fail(f"torchrun did not finish after the kill:\n{output[-4000:]}")

    assert agent.returncode == 0, output[-4000:]
    assert killed_at < 4, "the run finished before the worker was killed"
    assert "attempt 2 of this torchrun job" in output, "the workers were not restarted"
    assert f"resumed from {last}" in output
    resumed = json.loads((run_dir / "metrics.json").read_text())
    # Nothing lost: the very same steps, losses and final accuracy as the uninterrupted run.
    assert resumed["steps"] == two_rank_run["steps"]
    assert resumed["train_loss_history"] == two_rank_run["train_loss_history"]
    assert resumed["val_acc"] == two_rank_run["val_acc"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_equal_one_node(tmp_path, two_rank_run):
    """Two torchrun launchers, one rank each, meet through c10d rendezvous on 127.0.0.1."""
    run_dir = tmp_path / "run"
    rendezvous = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{_free_port()}",
        "--rdzv_id=loopback-test",
    ]
    nodes = [_launch(run_dir, *rendezvous, f"--node_rank={i}") for i in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train_loss_history"] == two_rank_run["train_loss_history"]
    assert metrics["val_acc"] == two_rank_run["val_acc"]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from syncbn.training import checkpoint
    big = {"model": {"w": torch.zeros(64_000_000)}, "optimizer": {}, "epoch": 2, "step": 9}
    while True:
        checkpoint.save(big, Path(sys.argv[1]))
    """
)


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    checkpoint.save(
        {"model": {"w": torch.ones(3)}, "optimizer": {}, "epoch": 1, "step": 4}, tmp_path
    )
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=_env())
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 1_000_000
                  for p in tmp_path.iterdir()):  # fmt: skip
        assert time.monotonic() < deadline and writer.poll() is None, "the writer never started"
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)  # halfway through writing 256 MB
    writer.wait()
    state = checkpoint.load(tmp_path / checkpoint.LAST)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert any(p.suffix == ".tmp" for p in tmp_path.iterdir())  # the killed writer's leftover
    checkpoint.save(state, tmp_path)  # the next save cleans it up
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LAST]


def _soak(steps: int) -> dict:
    """SyncBN training with uneven, sometimes empty per-rank batches; RSS sampled on the way."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )
    )  # fmt: skip
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = torch.Generator().manual_seed(1)  # the same on every rank
    data = torch.Generator().manual_seed(100 + rank)
    rss = []
    empty_steps = 0
    for step in range(steps):
        sizes = torch.randint(0, 6, (world,), generator=schedule)
        if sizes.sum() < 2:
            sizes[0] = 2
        empty_steps += int(sizes[rank] == 0)
        x = torch.randn(int(sizes[rank]), 3, 6, 6, generator=data)
        y = torch.randint(0, 4, (int(sizes[rank]),), generator=data)
        logits = ddp(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum") / sizes.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in (50, steps - 1):
            rss.append(
                int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            )
    return {
        "buffers": [b.clone() for b in model.buffers()],
        "empty_steps": empty_steps,
        "rss_growth": rss[1] - rss[0],
    }


def test_soak_4_ranks_200_steps_uneven_and_empty_batches(run_ranks):
    results = run_ranks(_soak, 4, 220, timeout=240)
    assert sum(r["empty_steps"] for r in results) > 10  # empty ranks really happened
    for rank, result in enumerate(results[1:], 1):
        for mine, first in zip(result["buffers"], results[0]["buffers"], strict=True):
            assert torch.equal(mine, first), f"rank {rank}'s running statistics differ"
    for rank, result in enumerate(results):
        assert result["rss_growth"] < 16 * 2**20, f"rank {rank} grew {result['rss_growth']} B"


def _join(rank: int, world_size: int, port: int, timeout_s: float, monkeypatch) -> int:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return attempt_store(rank, world_size, timedelta(seconds=timeout_s))[1]


def test_each_restart_attempt_gets_its_own_store_namespace(monkeypatch):
    """Ranks count their starts in the agent's store; every restart lands in a fresh namespace."""
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with ThreadPoolExecutor(2) as pool:
        for attempt in (1, 2, 3):
            joined = pool.map(lambda r: _join(r, 2, agent.port, 10, monkeypatch), range(2))
            assert list(joined) == [attempt, attempt]


def test_a_rank_alone_in_its_attempt_fails_with_a_message(monkeypatch):
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    agent.add("syncbn/starts/rank1", 1)  # rank 1 started once more than rank 0 (attempt 1)
    with pytest.raises(RuntimeError, match="not every one of the 2 ranks joined that attempt"):
        _join(0, 2, agent.port, 0.5, monkeypatch)


FAILING_RANK_1 = textwrap.dedent(
    """
    import os
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RUN_ID"):
        import syncbn.training.loop as loop

        train_step, calls = loop._train_step, []

        def failing_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise ValueError("fault injected into rank 1 at its 5th step")
            return train_step(*args, **kwargs)

        loop._train_step = failing_step
    """
)


def test_an_exception_on_one_rank_ends_all_ranks_with_its_traceback(tmp_path):
    """Rank 1 raises mid-training; rank 0, blocked in a collective, is ended promptly."""
    (tmp_path / "sitecustomize.py").write_text(FAILING_RANK_1)  # injected at interpreter start
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *QUIET, *JOB]  # fmt: skip
    env = dict(_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    summary = done.stderr[done.stderr.index("Root Cause") :]
    assert "rank      : 1" in summary, summary
    assert "ValueError: fault injected into rank 1 at its 5th step" in summary, summary
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after rank 1 failed"


FAKE_SLURM = {
    # The allocation's node list, as `scontrol show hostnames` prints it: two nodes on loopback.
    "scontrol": 'printf "127.0.0.1\\n127.0.0.1\\n"\n',
    # srun: start the command once per node in parallel, fail when any task fails.
    "srun": textwrap.dedent(
        """
        while [[ $1 == --* ]]; do shift; done
        pids=()
        for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
            SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!)
        done
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
        exit $status
        """
    ),
}


def test_the_sbatch_script_runs_two_nodes(tmp_path, two_rank_run):
    """scripts/slurm/train.sbatch with stand-ins for srun and scontrol: 2 nodes, 1 rank each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = dict(
        _env(),
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_SUBMIT_DIR=str(ROOT),
        NPROC_PER_NODE="1",
        MASTER_PORT=str(_free_port()),
        RUN_DIR=str(run_dir),
    )
    script = ROOT / "scripts" / "slurm" / "train.sbatch"
    done = subprocess.run(["bash", str(script), *QUIET, *JOB], env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "job 4242: 2 nodes x 1 ranks" in done.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train_loss_history"] == two_rank_run["train_loss_history"]


def test_srun_without_torchrun_takes_ranks_from_slurm(tmp_path, two_rank_run):
    """`srun python train.py`: rank, local rank and world size come from SLURM's variables."""
    run_dir = tmp_path / "run"
    port = _free_port()
    tasks = []
    for rank in range(2):
        env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_JOB_ID="77", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *JOB]
        tasks.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [task.communicate(timeout=240)[0] for task in tasks]
    for task, output in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, output[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train_loss_history"] == two_rank_run["train_loss_history"]
