"""`perceiver serve` in a child process for the tests that talk to a real server over HTTP:
a free port of 127.0.0.1, the environment of a user's shell without its terminal or
perceiver variables, no network."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "assets" / "perceiver-small"
START_TIMEOUT = 120.0


def server_env(tmp: Path, **extra: str) -> dict:
    """The environment of a server or client process: no network, a fresh cache, one
    thread, none of the caller's terminal, server or key variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "PERCEIVER_DEBUG", "COLUMNS",
                        "PERCEIVER_SERVER", "PERCEIVER_API_KEY", "PERCEIVER_MODEL")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", **extra)
    return env


class Server:
    """`perceiver serve` in a child process, on a free port of 127.0.0.1."""

    def __init__(self, model: Path, tmp: Path, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "perceiver_cli", "serve", "-m", str(model), "--port", "0",
               "--device", "cpu", "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, env={**server_env(tmp), **(env or {})}, cwd=tmp,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.first_line = self._read_line()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", self.first_line)
        assert match, self.first_line
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.stderr: list[bytes] = []
        self._drain = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._drain.start()

    def _read_line(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.proc.kill()
                raise AssertionError("the server did not announce itself")
            chunk = os.read(self.proc.stderr.fileno(), 1)
            if not chunk:
                raise AssertionError(f"the server exited: {line.decode(errors='replace')}")
            line += chunk
        return line.decode()

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """(status, headers, decoded JSON body or the raw bytes if not JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = payload
        return response.status, dict(response.getheaders()), payload, decoded

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        """The exit status, once the process exits on its own (after a signal already sent:
        a second one could land after the graceful stop, in the default handler)."""
        code = self.proc.wait(timeout)
        self._drain.join(5)
        return code


def assert_close(a, b, tol: float = 1e-4) -> bool:
    """Equal JSON, floats within tol."""
    if isinstance(b, float):
        assert isinstance(a, (int, float)) and abs(a - b) <= tol, (a, b)
    elif isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), (a, b)
        for k in b:
            assert_close(a[k], b[k], tol)
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
    else:
        assert a == b
    return True


def perceiver(args: list[str], env: dict, stdin: bytes | None = None, cwd: Path | None = None):
    """Run `perceiver ARGS` to its end; a CompletedProcess with bytes."""
    return subprocess.run([sys.executable, "-m", "perceiver_cli", *args], env=env, input=stdin,
                          capture_output=True, cwd=cwd, timeout=600)
