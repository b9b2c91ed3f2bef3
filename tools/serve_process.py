"""`streammerge serve` of this checkout as a child process on a free 127.0.0.1 port: what the
serving benchmark, the quality harness and the server tests start, wait for and stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(store: Path, *args) -> tuple[list[str], dict]:
    """(argv, env) of `python -m streammerge serve STORE ARGS` importing this checkout."""
    cmd = [sys.executable, "-m", "streammerge", "serve", str(store), *map(str, args)]
    return cmd, {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


class ServeProcess:
    """`streammerge serve STORE ARGS` on a free loopback port, its output in `log`; returns once
    GET /health answers 200, raises RuntimeError (with the log) if it exits or `timeout` passes."""

    def __init__(self, store: Path, *args, log: Path, timeout: float):
        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        cmd, env = serve_command(store, "--host", "127.0.0.1", "--port", self.port, *args)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streammerge serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"streammerge serve did not come up in {timeout:.0f} s:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
