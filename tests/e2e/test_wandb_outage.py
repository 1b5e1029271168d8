"""A W&B outage never stalls or stops training: fake unreachable servers on 127.0.0.1 (one that
accepts connections and never answers, a closed port, one that answers every request with 503)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from syncbn.training.wandb_logger import probe
from tests.support.launch import Launch, command, env

FAKE_KEY = "a" * 40  # W&B checks the key's form before it talks to the server


@pytest.fixture
def silent_server():
    """Accepts TCP connections (the kernel completes the handshake) and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # do not wait for clients' idle keep-alive connections on close
    block_on_close = False


@pytest.fixture
def unavailable_server():
    """Answers every HTTP request at once, with 503 Service Unavailable."""
    server = _Server(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_probe_tells_a_silent_or_closed_server_from_one_that_answers(
    silent_server, unavailable_server
):
    started = time.monotonic()
    assert "no answer within 0.5 s" in probe(silent_server, 0.5)
    assert time.monotonic() - started < 5
    with socket.socket() as closed:  # bound, never listening: connections are refused, and no
        closed.bind(("127.0.0.1", 0))  # other process can take the port while we hold it
        assert "refused" in probe(f"http://127.0.0.1:{closed.getsockname()[1]}", 0.5)
    assert probe(unavailable_server, 0.5) is None  # it answers: wandb.init may try


def _online(url: str, run_dir, *overrides: str, nproc: int) -> tuple[Launch, int, float]:
    """A short run logging online to ``url``: the launch, its exit code and its wall time."""
    online = ["logger.mode=online", "logger.init_timeout_s=3", "trainer.log_every=1"]
    cmd = command(run_dir, *online, "trainer.max_steps=6", *overrides, nproc=nproc)
    started = time.monotonic()
    launch = Launch(cmd, env(WANDB_BASE_URL=url, WANDB_API_KEY=FAKE_KEY))
    code = launch.wait(timeout=240)
    return launch, code, launch.ended - started


def _logged_offline(run_dir) -> bytes:
    (records,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return records.read_bytes()


@pytest.mark.slow
def test_a_silent_server_costs_at_most_the_init_timeout_and_training_logs_offline(
    tmp_path, silent_server
):
    """wandb.init used to block rank 0 ~93 s (+11 s at exit), and with a dist.timeout_s shorter
    than that, rank 1 died in a gloo timeout that never mentioned W&B."""
    run_dir = tmp_path / "run"
    launch, code, elapsed = _online(silent_server, run_dir, "dist.timeout_s=15", nproc=2)
    output = launch.output
    assert code == 0, output[-4000:]
    assert f"W&B server {silent_server} unreachable (no answer within 3.0 s" in output
    assert "logging offline to" in output
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6
    assert b"train/loss" in _logged_offline(run_dir)
    assert elapsed < 60, f"{elapsed:.0f} s"  # start-up (~10-20 s here) + 3 s, not 100 s


@pytest.mark.slow
def test_a_server_that_answers_but_not_as_w_and_b_falls_back_to_offline(
    tmp_path, unavailable_server
):
    run_dir = tmp_path / "run"
    launch, code, elapsed = _online(unavailable_server, run_dir, nproc=1)
    assert code == 0, launch.output[-4000:]
    assert "W&B online start failed within logger.init_timeout_s=3.0 s" in launch.output
    assert b"train/loss" in _logged_offline(run_dir)
    (final,) = [i for i, line in enumerate(launch.lines) if "epoch 0 step 6:" in line]
    exit_delay = launch.ended - launch.times[final]
    assert exit_delay < 8, f"{exit_delay:.1f} s"  # W&B's error reports stalled the exit ~20 s
