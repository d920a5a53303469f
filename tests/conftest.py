"""Fixtures: tiny random checkpoints in the reference layout, written by the reference itself.

`transformers` is the test-only reference; the checkpoints it saves are read by our own
loading code, exactly as a downloaded checkpoint would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from perceiver_cli.model import PerceiverConfig

# A small config that differs from the full size in every dimension; shared by most tests.
TINY = dict(
    num_latents=8, d_latents=32, d_model=16, num_blocks=1, num_self_attends_per_block=2,
    num_self_attention_heads=2, num_cross_attention_heads=2, qk_channels=16, v_channels=32,
    max_position_embeddings=64, initializer_range=0.2,
)

# The config.json of deepmind/language-perceiver: our config's defaults (model.py).
FULL_SIZE = PerceiverConfig().to_dict()

# The small model trained here (scripts/train_small.py): it knows frequent English words.
SMALL = Path(__file__).parent / "assets" / "perceiver-small"


def make_reference(directory: Path, seed: int = 0, safe: bool = True, **config):
    """Save a random `PerceiverForMaskedLM` to `directory`; return the reference model."""
    from transformers import PerceiverConfig, PerceiverForMaskedLM

    torch.manual_seed(seed)
    ref = PerceiverForMaskedLM(PerceiverConfig(**config)).eval()
    if safe:
        ref.save_pretrained(directory)
    else:  # the Hub's pytorch_model.bin: a plain state dict saved by torch.save
        ref.config.save_pretrained(directory)
        torch.save(ref.state_dict(), Path(directory) / "pytorch_model.bin")
    return ref


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint directory (config.json + model.safetensors)."""
    directory = tmp_path_factory.mktemp("tiny")
    make_reference(directory, **TINY)
    return directory


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    from transformers import PerceiverForMaskedLM

    return PerceiverForMaskedLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """No test may reach the real Hub: point it at a closed port and a fresh cache."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("PERCEIVER_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.pop("HUGGINGFACE_HUB_CACHE", None)


# -- shared helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine every op of a
    2-thread pool waits milliseconds for its descheduled second thread. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def filler(one_thread):
    """The library on the shipped small model (tests/assets/perceiver-small), one thread."""
    from perceiver_cli.checkpoint import load_model
    from perceiver_cli.filler import MaskFiller

    return MaskFiller(load_model(SMALL), batch_size=64)


def invoke(checkpoint: Path, *args: str, stdin: bytes | str | None = None, env: dict | None = None):
    """`perceiver fill -m CHECKPOINT ARGS` in-process (typer's CliRunner)."""
    from typer.testing import CliRunner

    from perceiver_cli.cli import app

    return CliRunner().invoke(app, ["fill", "-m", str(checkpoint), *args], input=stdin, env=env, prog_name="perceiver")


class RunsCode:
    """Unpickling this runs a function (it prints "this ran"): what a pytorch_model.bin may
    hold and `torch.load(weights_only=True)` must refuse."""

    def __reduce__(self):
        return (print, ("this ran",))


TERMINAL_VARIABLES = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "PERCEIVER_DEBUG", "COLUMNS")


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """Terminal detection must see what a test sets up, not the developer's shell."""
    for name in TERMINAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def perceiver(*args: str) -> list[str]:
    """The command line of `perceiver ARGS` as a real process of this Python."""
    return [sys.executable, "-m", "perceiver_cli", *args]


def ctrl_c_reaches_it() -> None:
    """`preexec_fn` for a process a test sends SIGINT: Ctrl-C acts as in a terminal even when
    the test run itself was started in the background (a shell's `cmd &` without job
    control makes its children ignore SIGINT, and Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def process_env(tmp: Path, **extra: str) -> dict:
    """The environment of a real `perceiver` process: no network, a fresh cache, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_VARIABLES}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1", TERM="xterm-256color", OMP_NUM_THREADS="1", **extra)
    return env


def run_process(args: list[str], tmp: Path, *, stdin: bytes | None = None, timeout: float = 120, **env: str):
    """Run a command to its end in `process_env(tmp, **env)`; a CompletedProcess with bytes."""
    return subprocess.run(args, input=stdin, capture_output=True, env=process_env(tmp, **env), timeout=timeout)


def read_pty(master: int) -> bytes:
    """Everything a pseudo-terminal shows until its other side closes."""
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            return out
        if not data:
            return out
        out += data


def wait_until_blocked(pid: int, timeout: float = 60.0) -> bool:
    """True once the process has sat asleep (state S, CPU time unchanged) for half a second."""
    deadline, since, last = time.monotonic() + timeout, None, None
    while time.monotonic() < deadline:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        state, cpu = fields[0], int(fields[11]) + int(fields[12])
        if state == "S" and cpu == last:
            since = since or time.monotonic()
            if time.monotonic() - since > 0.5:
                return True
        else:
            since = None
        last = cpu
        time.sleep(0.02)
    return False
