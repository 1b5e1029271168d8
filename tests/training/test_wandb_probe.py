"""The W&B probe keeps one wall-clock deadline: a server that trickles its answer a byte at a time
(urllib's timeout is per socket operation) cannot hold it longer, and a refused connection says
so without claiming it waited."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from syncbn.training.wandb_logger import probe


@pytest.fixture
def trickling_server():
    """Sends a status line, then one header byte every 0.3 s, for at most 8 s per connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection = server.accept()[0]
            except OSError:
                continue
            with connection:
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                ends = time.monotonic() + 8
                while not stop.is_set() and time.monotonic() < ends:
                    try:
                        connection.sendall(b"X")
                    except OSError:
                        break
                    stop.wait(0.3)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    server.close()


def test_a_trickling_server_costs_the_probe_its_timeout_and_no_more(trickling_server):
    started = time.monotonic()
    problem = probe(trickling_server, 1.0)
    elapsed = time.monotonic() - started
    assert problem is not None and "no answer within 1.0 s" in problem, problem
    assert elapsed < 2.5, f"{elapsed:.1f} s"


def test_a_refused_connection_does_not_claim_a_wait():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        problem = probe(f"http://127.0.0.1:{closed.getsockname()[1]}", 30.0)
    assert "refused" in problem and "within" not in problem, problem
