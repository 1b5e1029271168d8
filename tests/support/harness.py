"""Run a function on W real gloo ranks and hand each rank's result back to the test.

Spawning a Python process that imports torch costs about 2 s here, so workers are spawned once
per test session and reused: every task gets a *fresh* process group (FileStore rendezvous in the
test's ``tmp_path``, no ports to race for) with a timeout, so a broken collective raises on the
ranks instead of hanging. The parent also keeps a deadline: a rank that hangs or dies anyway fails
the test with a message and the pool is rebuilt for the next test.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

MAX_WORLD_SIZE = 4
DEFAULT_TIMEOUT_S = 60.0


class RankFailed(AssertionError):
    """A rank raised; the message holds its traceback."""


class WorkerPool:
    """``MAX_WORLD_SIZE`` spawned worker processes that run tasks as ranks of a gloo group."""

    def __init__(self, size: int = MAX_WORLD_SIZE) -> None:
        self.size = size
        self._workers: list[tuple[multiprocessing.Process, Any]] = []
        self._task = 0

    def run(
        self,
        fn: Callable[..., Any],
        world_size: int,
        rendezvous_dir: Path,
        *args: Any,
        timeout: float = DEFAULT_TIMEOUT_S,
        backend: str = "gloo",
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results by rank.

        ``fn`` must be importable (a module-level function); inside it ``torch.distributed`` is
        initialized with ``backend`` (gloo; nccl puts rank r on GPU r) and ``dist.get_rank()``
        tells the rank.
        """
        if not 1 <= world_size <= self.size:
            raise ValueError(f"world_size must be in [1, {self.size}] (got {world_size})")
        self._start()
        self._task += 1
        init_file = Path(rendezvous_dir) / f"rendezvous-{os.getpid()}-{self._task}"
        task = pickle.dumps((fn, args, kwargs, world_size, str(init_file), timeout, backend))
        for _, conn in self._workers[:world_size]:
            conn.send_bytes(task)
        deadline = time.monotonic() + timeout + 15.0
        results, failures = [], []
        for rank, (process, conn) in enumerate(self._workers[:world_size]):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self.close()
                raise TimeoutError(
                    f"rank {rank} of {world_size} gave no result within {timeout + 15:.0f}s "
                    f"(alive={process.is_alive()}): a collective probably hung"
                )
            try:
                status, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the worker process died (a C++ abort, a signal)
                process.join(timeout=5)
                self.close()
                raise RankFailed(
                    f"rank {rank} of {world_size} died with exit code {process.exitcode} "
                    f"before answering (its stderr above says why)"
                ) from None
            if status == "error":
                failures.append(f"--- rank {rank} ---\n{payload}")
            results.append(payload)
        if failures:
            raise RankFailed("\n".join(failures))
        return results

    def _start(self) -> None:
        if self._workers and all(p.is_alive() for p, _ in self._workers):
            return
        self.close()
        ctx = multiprocessing.get_context("spawn")
        for slot in range(self.size):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(child, slot), daemon=True)
            process.start()
            self._workers.append((process, parent))

    def close(self) -> None:
        """Ask every worker to exit, give them 2 s together, then kill the ones still there."""
        for _, conn in self._workers:
            try:
                conn.send_bytes(pickle.dumps(None))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 2
        for process, _ in self._workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self._workers = []


def _worker_main(conn, rank: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks share 2 cores
    os.environ.setdefault("WANDB_MODE", "disabled")
    while True:
        message = pickle.loads(conn.recv_bytes())
        if message is None:
            return
        fn, args, kwargs, world_size, init_file, timeout, backend = message
        # Layers built outside convert_sync_batchnorm are named in construction order per
        # process; a reused worker must count from zero like a fresh rank does.
        import syncbn

        syncbn.SyncBatchNorm._built = 0
        try:
            if backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(
                backend,
                init_method=f"file://{init_file}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout),
            )
            try:
                reply = ("ok", fn(*args, **kwargs))
            except BaseException:  # noqa: BLE001 - every failure goes back to the test
                reply = ("error", traceback.format_exc())
            try:
                # Nobody tears down its gloo pairs while a slower rank is still connecting: a
                # rank whose fn fails at once would otherwise break a peer's init_process_group.
                dist.barrier()
            except RuntimeError:
                pass  # a group that a task broke on purpose (a timeout): fn's reply says it all
            finally:
                dist.destroy_process_group()
        except BaseException:  # noqa: BLE001 - init_process_group itself failed
            reply = ("error", traceback.format_exc())
        conn.send_bytes(pickle.dumps(reply))
