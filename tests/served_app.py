"""``python app.py`` as a subprocess on a free port, for the browser tests (one helper for all of them)."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(cwd: Path, env: dict, log_path: Path, port: int, what: str = "the app"):
    """Start ``python app.py`` in ``cwd`` with ``env`` (which sets ``GRADIO_SERVER_PORT`` = ``port``), wait
    until it answers (at most 120 s; else fail with the end of its log), yield its URL, stop it after."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{what} did not start:\n{Path(log_path).read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
