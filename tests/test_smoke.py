"""Smoke tests of the installed `perceiver` command, as a user runs it: real processes, the
shipped trained model (tests/assets/perceiver-small) and the stand-in Hub. No
transformers, no fixtures that need it: CI also runs this file alone in an environment
holding the lowest versions of the dependencies that pyproject.toml allows (.ci/run), so
every lower bound there is one that has been run.

What a user must see: results on stdout, exit 0 and NOTHING on stderr (no warning from a
dependency, e.g. torch's "Failed to initialize NumPy" where NumPy is not installed);
bad input exits 2 and a failure 1, each with one `error: ...` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from perceiver_cli import __version__

from .hubserver import hub  # noqa: F401  (a fixture: the stand-in Hub, selected with HF_ENDPOINT)

SMALL = Path(__file__).resolve().parent / "assets" / "perceiver-small"
TEXT = "The capital of France is [MASK:6]. Hello [MASK:6]."


def perceiver(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed console script (`python -m perceiver_cli` when there is none), in a
    fresh process with pipes for stdout and stderr and nothing from the developer's shell
    that changes what it prints."""
    script = Path(sys.executable).with_name("perceiver")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "perceiver_cli"]
    environ = dict(os.environ)
    for name in ("PERCEIVER_DEBUG", "PYTHONWARNINGS", "FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS"):
        environ.pop(name, None)
    environ.update(env)
    return subprocess.run([*command, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)


def ok(proc: subprocess.CompletedProcess) -> str:
    """Exit 0 and an empty stderr; returns stdout."""
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    return proc.stdout


def one_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit `code`, nothing on stdout, exactly one `error: ...` line on stderr."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


def check_fill(result: dict, top_k: int = 1) -> None:
    """A filled TEXT: two spans of 6 bytes (the space before a marker is in its span), every
    byte outside them unchanged."""
    assert [(s["start"], s["length"]) for s in result["spans"]] == [(25, 6), (41, 6)]
    first, second = (s["fill"] for s in result["spans"])
    assert result["text"] == f"The capital of France is{first}. Hello{second}."
    for span in result["spans"]:
        assert len(span["bytes"]) == 6
        if top_k > 1:
            assert len(span["candidates"]) == top_k
            assert span["candidates"][0]["fill"] == span["fill"]


def test_local_model(tmp_path):
    plain = ok(perceiver("fill", "-m", str(SMALL), TEXT, cwd=tmp_path))
    assert plain.endswith(".\n") and plain.startswith("The capital of France is")
    result = json.loads(ok(perceiver("fill", "-m", str(SMALL), "--json", TEXT, cwd=tmp_path)))
    check_fill(result)
    assert result["text"] + "\n" == plain
    check_fill(json.loads(ok(perceiver("fill", "-m", str(SMALL), "--json", "-k", "3", TEXT, cwd=tmp_path))), top_k=3)
    # README: TTY_COMPATIBLE=1 renders for a terminal into a pipe (rich reads it from 14.0 on)
    coloured = ok(perceiver("fill", "-m", str(SMALL), TEXT, cwd=tmp_path, TTY_COMPATIBLE="1"))
    assert "\x1b[" in coloured and "fill confidence" in coloured


def test_version_help_and_bad_input(tmp_path):
    assert ok(perceiver("--version", cwd=tmp_path)) == f"perceiver {__version__}\n"
    assert "--model" in ok(perceiver("fill", "--help", cwd=tmp_path))
    one_error(perceiver("fill", "-m", str(SMALL), "no marker here", cwd=tmp_path), 2, "no [MASK] marker")
    # README's words: a Typer that uses the installed click (before 0.26) words it as that click does
    assert one_error(perceiver("fill", "--bogus", cwd=tmp_path), 2) == "error: No such option: --bogus (see 'perceiver fill --help')"


def test_hub(hub, tmp_path):  # noqa: F811  (the fixture)
    """First run downloads; `download` asks the Hub; an unknown repo fails (1); a warm
    `--offline` run and `info --offline` make no request. HF_HOME is fresh (conftest)."""
    commit = hub.add("org/small", SMALL)
    first = json.loads(ok(perceiver("fill", "-m", "org/small", "--json", TEXT, cwd=tmp_path)))
    check_fill(first)
    assert sorted(r.file for r in hub.gets()) == ["config.json", "model.safetensors"]

    fields = dict(line.split(":", 1) for line in ok(perceiver("download", "--model", "org/small", cwd=tmp_path)).splitlines())
    assert fields["commit"].strip() == commit
    one_error(perceiver("fill", "-m", "org/missing", TEXT, cwd=tmp_path), 1, "org/missing")

    hub.requests.clear()
    warm = json.loads(ok(perceiver("fill", "-m", "org/small", "--offline", "--json", TEXT, cwd=tmp_path)))
    assert warm == first
    info = dict(line.split(":", 1) for line in ok(perceiver("info", "-m", "org/small", "--offline", cwd=tmp_path)).splitlines())
    assert (info["model"].strip(), info["commit"].strip()) == ("org/small", commit)
    assert int(info["parameters"].replace(",", "")) > 0
    assert hub.requests == []


def test_serve(tmp_path):
    """The server on the lowest versions of starlette, uvicorn and prometheus_client: it
    starts, answers /health, a fill, /metrics and the page, and stops on SIGTERM with exit
    0; stderr holds the serving line and one access-log line per request, nothing else."""
    import re
    import signal
    import urllib.request

    script = Path(sys.executable).with_name("perceiver")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "perceiver_cli"]
    environ = {k: v for k, v in os.environ.items() if k not in ("PERCEIVER_API_KEY", "PERCEIVER_DEBUG", "PYTHONWARNINGS")}
    proc = subprocess.Popen([*command, "serve", "-m", str(SMALL), "--port", "0", "--threads", "1"], cwd=tmp_path,
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert found, line + (proc.stderr.read() if proc.poll() is not None else "")
        url = found[1]

        def get(path: str, **headers: str) -> tuple[int, str, bytes]:
            request = urllib.request.Request(url + path, headers=headers)
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, answer.headers.get("Content-Type", ""), answer.read()

        assert json.loads(get("/health")[2]) == {"status": "ok"}
        body = json.dumps({"text": TEXT, "options": {"strategy": "oneshot"}}).encode()
        request = urllib.request.Request(url + "/v1/fill", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.headers.get("X-Request-ID")
            check_fill(json.loads(answer.read()))
        status, kind, metrics = get("/metrics")
        assert status == 200 and b"perceiver_requests_total" in metrics
        status, kind, page = get("/", Accept="text/html")
        assert status == 200 and kind.startswith("text/html") and b"<textarea" in page
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        rest = proc.stderr.read().splitlines()
        assert len(rest) == 4 and all(" GET " in r or " POST " in r for r in rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
