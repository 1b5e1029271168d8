"""Faults injected for real: a worker SIGKILLed under torchrun --max-restarts, two simulated nodes
on loopback, SLURM stand-ins, and a 4-rank soak with empty batches. (Preemption, killed agents
and resume policy: test_preemption.py, test_resume.py; checkpoint writes: test_checkpoints.py.)

Nothing here depends on timing: a kill or a signal lands while the workers are held at their
first checkpoint (an injected hook that waits for the kill, or for the signal), and no port is
picked free and hoped to stay free: the rendezvous store is hosted by the test itself on a port
it already holds, or the ranks meet through a file (``dist.init_method=file://``)."""

from __future__ import annotations

import json
import os
import signal
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
from syncbn.training.lifecycle.env import attempt_store
from syncbn.training.state import checkpoint
from tests.support.launch import QUIET, ROOT, Launch, pausing_env, reference_run, status, wait_for
from tests.support.launch import env as _env

pytestmark = pytest.mark.slow

JOB = ["trainer.epochs=4", "trainer.batch_size=32", "norm=syncbn", "seed=5"]


@pytest.fixture
def two_rank_run(tmp_path_factory):
    """The uninterrupted single-node 2-rank run the faulty ones must reproduce (run once)."""
    return reference_run(tmp_path_factory, *JOB, nproc=2)


def _launch(run_dir: Path, *launcher: str, environment: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "train.py"),
           f"hydra.run.dir={run_dir}", *QUIET, *JOB]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=environment or _env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture
def rendezvous_store():
    """A TCPStore the test hosts on a port it holds (port 0: the kernel picks a free one, no
    race). torchrun agents pointed at it find the port taken and join it as clients; their
    workers then build their process group from the same store."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          multi_tenant=True)  # fmt: skip
    yield store
    del store


def test_sigkilled_worker_is_restarted_by_torchrun_and_resumes_losing_nothing(
    tmp_path, two_rank_run
):
    run_dir = tmp_path / "run"
    environment, paused = pausing_env(tmp_path, rank=1)  # held after its first checkpoint
    agent = _launch(run_dir, "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                    environment=environment)  # fmt: skip
    wait_for(lambda: paused.exists() or agent.poll() is not None, "rank 1's first checkpoint")
    pid, step = (int(v) for v in paused.read_text().split())
    os.kill(pid, signal.SIGKILL)  # rank 1, mid-run: rank 0 waits for it in a collective
    last = run_dir / "checkpoints" / "last.pt"
    killed_at = checkpoint.load(last)["epoch"]
    assert checkpoint.load(last)["step"] == step
    try:
        output, _ = agent.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        agent.kill()
        output, _ = agent.communicate()
        pytest.fail(f"torchrun did not finish after the kill:\n{output[-4000:]}")

    assert agent.returncode == 0, output[-4000:]
    assert killed_at == 1  # killed right after the checkpoint of epoch 1, of 4
    assert "attempt 2 of this torchrun job" in output, "the workers were not restarted"
    assert f"resumed from {last}" in output
    resumed = json.loads((run_dir / "metrics.json").read_text())
    # Nothing lost: the very same steps, losses and final accuracy as the uninterrupted run.
    assert resumed["steps"] == two_rank_run["steps"]
    assert resumed["train_loss_history"] == two_rank_run["train_loss_history"]
    assert resumed["val_acc"] == two_rank_run["val_acc"]


def test_two_nodes_on_loopback_equal_one_node(tmp_path, two_rank_run, rendezvous_store):
    """Two torchrun launchers, one rank each, meet through c10d rendezvous on 127.0.0.1."""
    run_dir = tmp_path / "run"
    rendezvous = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{rendezvous_store.port}",
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
    # `scontrol show hostnames`: two nodes on loopback; `scontrol requeue ID`: noted in a file.
    "scontrol": textwrap.dedent(
        """
        if [[ $1 == requeue ]]; then echo "requeue $2" >> "$REQUEUE_LOG"; exit 0; fi
        printf "127.0.0.1\\n127.0.0.1\\n"
        """
    ),
    # srun: start the command once per node in parallel, fail when any task fails.
    "srun": textwrap.dedent(
        """
        echo $$ > "$STEP_PID"
        while [[ $1 == --* ]]; do shift; done
        pids=()
        for ((node = 0; node < ${NODES_UP:-$SLURM_JOB_NUM_NODES}; node++)); do
            SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!)
        done
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
        exit $status
        """
    ),
    # `scancel --signal=SIG JOB`: SIG to every process of the job's step (srun's descendants).
    "scancel": textwrap.dedent(
        """
        sig=${1#--signal=}
        tree() { for kid in $(pgrep -P "$1"); do echo "$kid"; tree "$kid"; done; }
        kill -s "$sig" $(tree "$(cat "$STEP_PID")") 2>/dev/null || true
        """
    ),
}


PAUSE_UNTIL_A_STOP_SIGNAL = textwrap.dedent(
    """
    import os
    if os.environ.get("TORCHELASTIC_RUN_ID") and not os.environ.get("SLURM_RESTART_COUNT"):
        import threading
        from pathlib import Path
        import syncbn.training.loop as loop
        import syncbn.training.lifecycle.preemption as preemption

        signalled, saves = threading.Event(), []
        handle, save = preemption.StopRequest._handle, loop._checkpoint

        def handle_and_tell(self, signum, frame):
            handle(self, signum, frame)
            signalled.set()

        def save_then_wait_for_a_signal(r):
            saved = save(r)
            saves.append(1)
            if len(saves) == 1:  # the first checkpoint: hold until SIGTERM/SIGUSR1 arrives
                Path(os.environ["PAUSE_MARKER"], os.environ["RANK"]).touch()
                while not signalled.wait(0.05):  # returns to the interpreter: handlers run
                    pass
            return saved

        preemption.StopRequest._handle = handle_and_tell
        loop._checkpoint = save_then_wait_for_a_signal
    """
)


def _sbatch_env(tmp_path: Path, run_dir: Path, port: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return dict(
        _env(),
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_SUBMIT_DIR=str(ROOT),
        NPROC_PER_NODE="1",
        MASTER_PORT=str(port),
        RUN_DIR=str(run_dir),
        REQUEUE_LOG=str(tmp_path / "requeued"),
        STEP_PID=str(tmp_path / "step.pid"),
    )


def test_the_sbatch_script_checkpoints_on_usr1_requeues_and_the_requeued_job_resumes(
    tmp_path, two_rank_run, rendezvous_store
):
    """scripts/slurm/train.sbatch with stand-ins for srun and scontrol (2 nodes, 1 rank each):
    SLURM's early warning (SIGUSR1 to the batch script, `--signal=B:USR1@90`) reaches the
    workers through srun and torchrun; they checkpoint and exit 75; the script requeues; the
    requeued job (same id) resumes and ends exactly where an uninterrupted run ends."""
    run_dir = tmp_path / "run"
    env = _sbatch_env(tmp_path, run_dir, rendezvous_store.port)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_UNTIL_A_STOP_SIGNAL)
    paused = tmp_path / "paused"
    paused.mkdir()
    cmd = ["bash", str(ROOT / "scripts/slurm/train.sbatch"), *QUIET, *JOB,
           "trainer.ckpt_every_steps=5"]  # fmt: skip
    job = Launch(cmd, env | {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
                             "PAUSE_MARKER": str(paused)})  # fmt: skip
    wait_for(lambda: len(list(paused.iterdir())) == 2, "both ranks at their first checkpoint",
             launch=job)  # fmt: skip
    os.kill(job.process.pid, signal.SIGUSR1)
    assert job.wait(timeout=120) == 0, job.output[-4000:]
    assert "job 4242 (requeued 0 times): 2 nodes x 1 ranks" in job.output
    assert "got SIGUSR1, asking the workers to checkpoint" in job.output
    assert job.output.count("got SIGUSR1: checkpointing") == 2  # both workers, via scancel
    assert job.output.count("launch: got SIGUSR1: SIGTERM to torchrun") == 2  # both launchers
    assert "is gone" not in job.output  # not the orphan fallback: the agents stayed up
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n", job.output[-4000:]
    preempted = status(run_dir)
    # held at step 5 until the signal; the stop is agreed at the next sync (every 10 steps)
    assert preempted["exit_code"] == 75 and preempted["step"] == 10, preempted
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == preempted["step"]

    requeued = Launch(cmd, env | {"SLURM_RESTART_COUNT": "1"})
    assert requeued.wait(timeout=240) == 0, requeued.output[-4000:]
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n"  # not again
    assert f"at epoch {preempted['epoch']}, step {preempted['step']}" in requeued.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train_loss_history"] == two_rank_run["train_loss_history"]


def test_a_node_that_never_joins_ends_the_job_after_the_rendezvous_timeout(
    tmp_path, rendezvous_store
):
    """Issue 26: with a node missing, torchrun waited silently for 600 s. train.sbatch sets
    RDZV_TIMEOUT (torchrun's join_timeout) and says so."""
    env = _sbatch_env(tmp_path, tmp_path / "run", rendezvous_store.port)
    cmd = ["bash", str(ROOT / "scripts/slurm/train.sbatch"), *QUIET, *JOB]
    job = Launch(cmd, env | {"NODES_UP": "1", "RDZV_TIMEOUT": "2"})
    assert job.wait(timeout=90) != 0
    assert "waiting up to 2 s for all nodes to join" in job.output
    assert "RendezvousTimeoutError" in job.output, job.output[-4000:]


def test_srun_without_torchrun_takes_ranks_from_slurm(tmp_path, two_rank_run):
    """`srun python train.py`: rank, local rank and world size come from SLURM's variables.
    The ranks meet through a file on a shared filesystem (``dist.init_method=file://``)."""
    run_dir = tmp_path / "run"
    rendezvous = f"dist.init_method=file://{tmp_path / 'rendezvous'}"
    tasks = []
    for rank in range(2):
        env = {
            k: v
            for k, v in _env().items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_JOB_ID="77")  # fmt: skip
        cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *JOB,
               rendezvous]  # fmt: skip
        tasks.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [task.communicate(timeout=240)[0] for task in tasks]
    for task, output in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, output[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train_loss_history"] == two_rank_run["train_loss_history"]
