"""A plugmoe server in a process of its own, for the benches that load it over HTTP: a free loopback port, and
the server started and waited for until /ready answers 200."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ready(
    command: list[str],
    env: dict[str, str],
    port: int,
    log: Path,
    timeout_s: float,
    *,
    health: str = "/ready",
    cwd: Path = REPO,
    name: str = "server",
) -> tuple[subprocess.Popen, str]:
    """Run `command` (a server listening on `port`, from `cwd`) with its output in `log`; return it and its URL once
    `health` answers 200. Raises RuntimeError (with the log's end) if it exits first, or when timeout_s passes."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}{health}", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"{name} did not get ready: {log.read_text()[-3000:]}")
