"""Starting the studio for browser tests: a free loopback port and waiting for it to answer."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the studio exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the studio did not answer on {url} within {timeout:.0f} s")


@contextlib.contextmanager
def running_studio(repo: Path, data_dir: Path, log_path: Path, *extra: str, timeout: float) -> Iterator[str]:
    """``python app.py`` on a free loopback port until the block ends; yields its URL. A studio that
    does not answer in ``timeout`` seconds fails the test with the tail of its log."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    args = ["--data-dir", str(data_dir), "--port", str(port), *extra]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "app.py", *args], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            try:
                wait_http(url, proc, timeout=timeout)
            except AssertionError as e:
                log.flush()
                raise AssertionError(f"{e}\n{log_path.read_text()[-3000:]}") from None
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
