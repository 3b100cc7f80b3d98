"""Fixtures: the app in-process (TestClient inside `with`) and a real uvicorn process. Expert files come from
tests/conftest.py (`expert_bytes`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.main import create_app
from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", 50000)


def test_settings(model_dir: Path, tmp_path: Path, **overrides) -> Settings:
    values = {
        "model": str(model_dir),
        "experts_dir": tmp_path / "experts",
        "device": "cpu",
        "admission": "off",
        "max_new_tokens": 64,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> a started TestClient from a loopback address."""
    clients: list[TestClient] = []

    def make(client: tuple[str, int] = LOOPBACK, **overrides) -> TestClient:
        app = create_app(test_settings(tiny_model_dir, tmp_path, **overrides))
        test_client = TestClient(app, client=client)
        test_client.__enter__()
        clients.append(test_client)
        return test_client

    yield make
    for test_client in reversed(clients):
        test_client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model_dir: Path, experts_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {
            **os.environ,
            "PLUGMOE_ADMISSION": "off",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            **env,
        }
        self.log = open(experts_dir.parent / f"server-{self.port}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--model",
                str(model_dir),
                "--experts-dir",
                str(experts_dir),
                "--port",
                str(self.port),
                "--device",
                "cpu",
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=environ,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        # generous: a server that fits a context router for seed experts takes ~30 s alone on 2 cores and
        # several times that beside other test processes; the deadline only bounds a server that never comes up
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.read_log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not get ready: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def live_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real `python -m server` on a free loopback port, shared by a test module."""
    experts_dir = tmp_path_factory.mktemp("live") / "experts"
    server = LiveServer(tiny_model_dir, experts_dir, PLUGMOE_SOURCE_HOSTS="127.0.0.1")  # test_live's http source
    yield server
    server.stop()
