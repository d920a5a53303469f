"""Download and cache: the real `huggingface_hub` client against a stand-in Hub on 127.0.0.1.

The CLI runs in real subprocesses (exit codes, stdout, one-line errors on stderr), with
`HF_ENDPOINT` pointing at the stand-in (or at a closed port: the Hub cannot be reached) and a
fresh `HF_HOME` per test (conftest). The server logs every request, so "a warm run makes no
request at all" is checked, not assumed.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from perceiver_cli.errors import CheckpointError
from perceiver_cli.hub import CONVERTED_DIR, resolve, safetensors_problem

from .conftest import TINY, RunsCode, make_reference
from .hubserver import HubServer, hub  # noqa: F401  (`hub` is a fixture)

TEXT = "Hello [MASK:3] world"
CLOSED = "http://127.0.0.1:9"  # nothing listens there: the Hub cannot be reached


@pytest.fixture(scope="session")
def tiny_bin(tmp_path_factory) -> Path:
    """The same tiny random model as `tiny_checkpoint` (same seed), as a pytorch_model.bin-only repo."""
    directory = tmp_path_factory.mktemp("tiny-bin")
    make_reference(directory, safe=False, **TINY)
    return directory


@pytest.fixture(scope="session")
def expected(tiny_checkpoint) -> dict:
    """The fill of TEXT by the tiny model, loaded from its local directory in this process."""
    from perceiver_cli.filler import MaskFiller

    result = MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu").fill(TEXT)
    return {"text": result.text, "fill": result.spans[0].fill}


def cli(*args: str, endpoint: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -m perceiver_cli ARGS` in a subprocess (stdout and stderr are pipes)."""
    environ = {**os.environ, **env}
    if endpoint is not None:
        environ["HF_ENDPOINT"] = endpoint
    environ.pop("PERCEIVER_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "perceiver_cli", *args], env=environ, capture_output=True, text=True, timeout=120
    )


def cli_together(*commands: tuple[tuple[str, ...], dict]) -> list[subprocess.CompletedProcess]:
    """Several independent `cli(*args, **env)` runs at once (each pays torch's import time)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda command: cli(*command[0], **command[1]), commands))


def fill_args(*options: str, model: str = "org/tiny") -> tuple[str, ...]:
    return ("fill", "--model", model, "--device", "cpu", "--json", *options, TEXT)


def fill(*options: str, model: str = "org/tiny", **kw) -> subprocess.CompletedProcess:
    return cli(*fill_args(*options, model=model), **kw)


def assert_filled(proc: subprocess.CompletedProcess, expected: dict) -> None:
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["text"] == expected["text"]
    assert result["spans"][0]["fill"] == expected["fill"]
    assert result["spans"][0]["length"] == 3


def assert_fails(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 1, nothing on stdout, one line on stderr naming `words`, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


def fields(stdout: str) -> dict[str, str]:
    """`key: value` lines of `perceiver download` / `info`."""
    return {key: value.strip() for key, value in (line.split(":", 1) for line in stdout.splitlines())}


def hub_cache() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def snapshot(repo: str, commit: str) -> Path:
    return hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


# -- first run, warm runs, offline --------------------------------------------------------


def test_first_run_downloads_and_the_second_makes_no_request(hub, tiny_checkpoint, expected):
    commit = hub.add("org/tiny", tiny_checkpoint)
    first = fill()
    assert_filled(first, expected)
    assert first.stderr == ""  # stderr is not a terminal: no progress bars
    assert [r.file for r in hub.gets()] == ["config.json", "model.safetensors"]
    assert (snapshot("org/tiny", commit) / "model.safetensors").is_file()

    hub.requests.clear()
    second = fill()
    assert_filled(second, expected)
    assert hub.requests == []

    # the warm path reads the cache itself: huggingface_hub's download machinery (~0.2 s of
    # imports) is not even loaded
    probe = subprocess.run([sys.executable, "-c", (
        "import sys\nfrom perceiver_cli.hub import resolve\nfound = resolve('org/tiny')\n"
        "print(found.commit, sorted(m for m in sys.modules if m.startswith(('huggingface_hub.file_download', 'httpx'))))"
    )], env=os.environ, capture_output=True, text=True, timeout=60)
    assert probe.stdout.split(" ", 1) == [commit, "[]\n"], probe.stderr


def test_warm_cache_works_when_the_hub_is_down(hub, tiny_checkpoint, expected):
    commit = hub.add("org/tiny", tiny_checkpoint)
    assert cli("download", "--model", "org/tiny").returncode == 0
    hub.stop()
    assert_filled(fill(), expected)
    # `download` asks the Hub first; when it cannot be reached the cache answers.
    again = cli("download", "--model", "org/tiny")
    assert again.returncode == 0, again.stderr
    assert fields(again.stdout)["commit"] == commit


# What the user asked for, and the words its one-line error must hold. All of them fail
# before the model loads: they run at once, as independent processes.
ERRORS = {
    "hub unreachable, nothing cached": (
        fill_args(), {"HF_ENDPOINT": CLOSED},
        ("cannot reach the Hub", "org/tiny", "is not in the cache", "local checkpoint directory"),
    ),
    "repo not on the Hub": (
        fill_args(model="org/missing"), {}, ("'org/missing' not found on the Hub", "check the model name"),
    ),
    "revision not in the repo": (
        fill_args("--revision", "nope"), {}, ("revision 'nope' not found in org/tiny", "check the revision"),
    ),
    "HF_HUB_OFFLINE=1, nothing cached": (
        fill_args(), {"HF_HUB_OFFLINE": "1"}, ("org/tiny is not in the cache", "offline", "perceiver download"),
    ),
    "--offline, nothing cached": (
        ("info", "--model", "org/tiny", "--offline"), {}, ("org/tiny is not in the cache", "offline"),
    ),
}


def test_hub_errors_fail_cleanly_with_what_to_do(hub, tiny_checkpoint):
    hub.add("org/tiny", tiny_checkpoint)
    runs = cli_together(*((args, {"HF_ENDPOINT": hub.url, **env}) for args, env, _ in ERRORS.values()))
    for (case, (_, _, words)), proc in zip(ERRORS.items(), runs):
        try:
            assert_fails(proc, *words)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None
    # One HEAD each for the missing repo and revision; the offline runs sent nothing.
    assert sorted((r.method, r.path) for r in hub.requests) == [
        ("HEAD", "/org/missing/resolve/main/config.json"), ("HEAD", "/org/tiny/resolve/nope/config.json"),
    ]


def test_revision_by_tag_or_commit(hub, tiny_checkpoint):
    commit = hub.add("org/tiny", tiny_checkpoint, tags=("v1",))
    for revision in ("v1", commit):
        proc = cli("download", "--model", "org/tiny", "--revision", revision)
        assert proc.returncode == 0, proc.stderr
        assert fields(proc.stdout)["revision"] == revision
        assert fields(proc.stdout)["commit"] == commit


def test_repo_without_weights_fails_cleanly(hub, tiny_checkpoint, tmp_path):
    (tmp_path / "repo").mkdir()
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "repo")
    hub.add("org/empty", tmp_path / "repo")
    assert_fails(cli("download", "--model", "org/empty"), "neither model.safetensors nor pytorch_model.bin")


# -- pytorch_model.bin ----------------------------------------------------------------------


def test_bin_only_repo_is_converted_once_and_then_loaded_from_the_copy(hub, tiny_bin, expected):
    commit = hub.add("org/bin", tiny_bin)
    assert_filled(fill(model="org/bin"), expected)  # the same weights as the safetensors repo
    assert [r.file for r in hub.gets()] == ["config.json", "pytorch_model.bin"]
    copy = hub_cache() / "models--org--bin" / CONVERTED_DIR / commit
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "model.safetensors"]

    # Without the .bin and without the Hub, the copy alone serves the next load.
    bin_file = snapshot("org/bin", commit) / "pytorch_model.bin"
    bin_file.resolve().unlink()
    bin_file.unlink()
    hub.stop()
    info = cli("info", "--model", "org/bin", "--device", "cpu")  # loads the model
    assert info.returncode == 0, info.stderr
    out = fields(info.stdout)
    assert out["path"] == str(copy)
    assert out["weights"] == "model.safetensors (converted from pytorch_model.bin)"


def test_corrupted_converted_copy_is_made_again_from_the_cached_bin(hub, tiny_bin):
    hub.add("org/bin", tiny_bin)
    first = resolve("org/bin", cache_dir=hub_cache(), endpoint=hub.url)
    assert first.converted and safetensors_problem(first.weights) is None
    first.weights.write_bytes(first.weights.read_bytes()[:1000])
    hub.requests.clear()
    again = resolve("org/bin", cache_dir=hub_cache(), endpoint=hub.url, offline=True)
    assert again.weights == first.weights and safetensors_problem(again.weights) is None
    assert hub.requests == []


def test_converted_copy_has_the_mode_of_the_hub_blobs(hub, tiny_bin):
    hub.add("org/bin", tiny_bin)
    old = os.umask(0o022)
    try:
        found = resolve("org/bin", cache_dir=hub_cache(), endpoint=hub.url)
    finally:
        os.umask(old)
    blob = (snapshot("org/bin", found.commit) / "pytorch_model.bin").resolve()
    assert blob.stat().st_mode & 0o777 == 0o644
    for path in (found.weights, found.directory / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path  # was 0600 for model.safetensors


def test_legacy_non_zip_bin_converts_and_loads_as_from_a_local_directory(hub, tiny_checkpoint, tmp_path):
    import torch

    from perceiver_cli.checkpoint import load_model

    legacy = tmp_path / "legacy"
    ref = make_reference(legacy, safe=False, **TINY)
    torch.save(ref.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    hub.add("org/legacy", legacy)
    found = resolve("org/legacy", cache_dir=hub_cache(), endpoint=hub.url)
    assert found.converted
    via_hub, local, expected = load_model(found.directory), load_model(legacy), load_model(tiny_checkpoint)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(via_hub.state_dict()[name], tensor) and torch.equal(local.state_dict()[name], tensor), name


def test_bin_that_would_run_code_is_refused(hub, tmp_path):
    import torch

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    torch.save({"weight": torch.zeros(2), "payload": RunsCode()}, tmp_path / "repo" / "pytorch_model.bin")
    hub.add("org/code", tmp_path / "repo")
    with pytest.raises(CheckpointError, match="pytorch_model.bin of org/code .* plain tensors .*could run code"):
        resolve("org/code", cache_dir=hub_cache(), endpoint=hub.url)
    assert len(hub.gets("pytorch_model.bin")) == 1  # a whole download that is bad is not fetched twice


# -- downloads cut off, corrupted files ---------------------------------------------------------


def test_connection_closed_mid_body_is_resumed(hub, tiny_checkpoint):
    commit = hub.add("org/tiny", tiny_checkpoint)
    hub.cut["model.safetensors"] = 1  # the first GET stops half-way
    proc = cli("download", "--model", "org/tiny")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # huggingface_hub's "Trying to resume download..." is not printed
    assert len(hub.gets("model.safetensors")) == 2
    assert safetensors_problem(snapshot("org/tiny", commit) / "model.safetensors") is None


def test_fewer_bytes_than_announced_fails_cleanly_and_the_next_run_recovers(hub, tiny_checkpoint):
    commit = hub.add("org/tiny", tiny_checkpoint)
    hub.short.add("model.safetensors")
    assert_fails(fill(), "download of model.safetensors", "cut off", "run the command again")
    assert not (snapshot("org/tiny", commit) / "model.safetensors").exists()
    blobs = hub_cache() / "models--org--tiny" / "blobs"
    assert len(list(blobs.iterdir())) == 1  # config.json's; no partial weights left behind

    hub.short.clear()
    again = cli("download", "--model", "org/tiny")
    assert again.returncode == 0, again.stderr
    assert safetensors_problem(snapshot("org/tiny", commit) / "model.safetensors") is None


def test_download_killed_half_way_is_never_loaded_and_the_next_run_recovers(hub, tiny_checkpoint, expected):
    commit = hub.add("org/tiny", tiny_checkpoint)
    hub.stall.add("model.safetensors")  # half the body, then the connection hangs
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen([sys.executable, "-m", "perceiver_cli", "download", "--model", "org/tiny"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.stalled.wait(60)
    finally:
        proc.kill()
        proc.wait()
    hub.stall.clear()
    hub.release.set()
    assert not (snapshot("org/tiny", commit) / "model.safetensors").exists()

    assert_filled(fill(), expected)


def test_corrupted_cached_weights_are_named_offline_and_fetched_again_online(hub, tiny_checkpoint, expected):
    commit = hub.add("org/tiny", tiny_checkpoint)
    assert cli("download", "--model", "org/tiny").returncode == 0
    blob = (snapshot("org/tiny", commit) / "model.safetensors").resolve()
    whole = blob.read_bytes()
    blob.write_bytes(whole[: len(whole) // 2])  # a cut-off file, where a whole one should be

    assert_fails(fill("--offline"), "cached model.safetensors of org/tiny is corrupted", "run once online")
    hub.requests.clear()
    assert_filled(fill(), expected)
    assert [r.file for r in hub.gets()] == ["model.safetensors"]
    assert blob.read_bytes() == whole

    blob.write_bytes(b"\xff" * 16 + whole[16:])  # same size, garbage header
    hub.stop()
    assert_fails(cli("download", "--model", "org/tiny"), "corrupted", "cannot be reached")


def test_download_fetches_a_corrupted_cached_file_again(hub, tiny_checkpoint):
    hub.add("org/tiny", tiny_checkpoint)
    first = resolve("org/tiny", cache_dir=hub_cache(), endpoint=hub.url)
    whole = first.weights.read_bytes()
    first.weights.resolve().write_bytes(whole[:-10])
    hub.requests.clear()
    again = resolve("org/tiny", cache_dir=hub_cache(), endpoint=hub.url, update=True)  # `perceiver download`
    assert again.weights.read_bytes() == whole
    assert [r.file for r in hub.gets()] == ["model.safetensors"]


def test_safetensors_problem_reads_only_the_header(tiny_checkpoint, tmp_path):
    whole = (tiny_checkpoint / "model.safetensors").read_bytes()
    cases = {
        "whole": whole,
        "cut": whole[:-1],
        "longer": whole + b"\0",
        "header": whole[:8] + b"{" * 16 + whole[24:],
        "length": (10**12).to_bytes(8, "little") + whole[8:],
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert safetensors_problem(tmp_path / "whole") is None
    for name in cases.keys() - {"whole"}:
        assert safetensors_problem(tmp_path / name), name


# -- download / info output, local paths, progress -----------------------------------------------


def test_download_and_info_say_where_the_model_lives(hub, tiny_checkpoint):
    from perceiver_cli.checkpoint import load_model

    commit = hub.add("org/tiny", tiny_checkpoint)
    down = cli("download", "--model", "org/tiny")
    assert down.returncode == 0, down.stderr
    out = fields(down.stdout)
    size = sum(f.stat().st_size for f in tiny_checkpoint.iterdir())
    assert out == {
        "model": "org/tiny", "revision": "main", "commit": commit, "path": str(snapshot("org/tiny", commit)),
        "weights": "model.safetensors", "size": f"{size / 1e6:.1f} MB ({size:,} bytes)",
    }

    hub.requests.clear()
    info = cli("info", "--model", "org/tiny", "--device", "cpu")
    assert info.returncode == 0, info.stderr
    parameters = sum(p.numel() for p in load_model(tiny_checkpoint).parameters())
    assert fields(info.stdout) == {**out, "parameters": f"{parameters:,}", "device": "cpu", "dtype": "float32"}
    assert hub.requests == []


def test_local_directories_and_bad_model_names(tiny_checkpoint, tmp_path):
    local = cli("download", "--model", str(tiny_checkpoint))
    assert local.returncode == 0, local.stderr
    assert fields(local.stdout)["revision"] == "(local directory)"
    assert fields(local.stdout)["path"] == str(tiny_checkpoint)

    assert_fails(cli("download", "--model", "./no-such-dir"), "local model directory ./no-such-dir does not exist")
    for bad in ("a/b/c", "org--x", "-org/x", "org/x.git", "org/" + "x" * 97):
        assert_fails(cli("download", "--model", bad, HF_HUB_OFFLINE="1"), "neither a local directory nor a Hub repo id")
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert_fails(cli("download", "--model", str(tmp_path / "weights.bin")), "is a file")


def test_progress_bars_on_a_terminal_only(hub, tiny_checkpoint):
    hub.add("org/tiny", tiny_checkpoint)
    leader, follower = pty.openpty()  # stderr is a terminal; stdout stays a pipe
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns for the bar
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    proc = subprocess.run([sys.executable, "-m", "perceiver_cli", "download", "--model", "org/tiny"], env=env,
                          stdout=subprocess.PIPE, stderr=follower, timeout=60)
    os.close(follower)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is closed once read to its end
            break
        if not chunk:
            break
        terminal += chunk
    os.close(leader)
    assert proc.returncode == 0
    assert b"model.safetensors: 100%" in terminal
    assert b"100%" not in proc.stdout


# -- the cache lookup, huggingface_hub's rules, revisions, warnings --------------------------------


def test_our_cache_lookup_finds_what_huggingface_hub_finds(hub, tiny_checkpoint, tiny_bin):
    """The warm path reads refs/ and snapshots/ itself; for a cache filled by the real
    hf_hub_download it must answer exactly as huggingface_hub's try_to_load_from_cache."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from perceiver_cli.hub import _Repo

    cache = hub_cache()
    first = hub.add("org/tiny", tiny_checkpoint, tags=("v1",))
    for revision in ("main", "v1"):
        hf_hub_download("org/tiny", "config.json", revision=revision, cache_dir=cache, endpoint=hub.url)
    hf_hub_download("org/tiny", "model.safetensors", revision=first, cache_dir=cache, endpoint=hub.url)
    second = hub.add("org/tiny", tiny_bin)  # main moves on to a commit without model.safetensors
    hf_hub_download("org/tiny", "config.json", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(Exception):  # recorded in .no_exist/<commit>/
        hf_hub_download("org/tiny", "model.safetensors", cache_dir=cache, endpoint=hub.url)
    assert first != second

    ours = _Repo("org/tiny", None, cache, hub.url, offline=True, progress=False)
    revisions = ["main", "v1", first, second, first[:12], "nope", "refs", ".", "..", "main/../v1"]
    for filename in ("config.json", "model.safetensors", "pytorch_model.bin"):
        for revision in revisions:
            theirs = try_to_load_from_cache("org/tiny", filename, cache_dir=cache, revision=revision)
            theirs = Path(theirs) if isinstance(theirs, str) else None
            assert ours.cached(filename, revision) == theirs, (filename, revision)
    assert ours.cached("model.safetensors", "v1") is not None  # the lookup is not trivially None


@pytest.mark.parametrize("env", [
    {"HF_HOME": "/srv/hf"},
    {"XDG_CACHE_HOME": "/srv/xdg"},
    {"HF_HOME": "~/hf-$USER", "USER": "me"},
    {"HF_HUB_CACHE": "/srv/hub", "HF_HUB_OFFLINE": "true"},
    {"HUGGINGFACE_HUB_CACHE": "/srv/legacy", "TRANSFORMERS_OFFLINE": "1"},
    {"HF_HUB_OFFLINE": "0"},
])
def test_cache_locations_and_offline_mode_follow_huggingface_hubs_rules(monkeypatch, env):
    from perceiver_cli import layout

    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    theirs = subprocess.run([sys.executable, "-c", (
        "from huggingface_hub import constants as c; print(c.HF_HOME); print(c.HF_HUB_CACHE); print(c.HF_HUB_OFFLINE)"
    )], env=dict(os.environ), capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert theirs == [str(layout.hf_home()), str(layout.hub_cache()), str(layout.offline_from_env())]


def test_a_revision_that_is_a_path_is_refused_before_any_request(hub, tiny_checkpoint, tmp_path):
    from perceiver_cli.options import OptionError

    hub.add("org/tiny", tiny_checkpoint)
    before = sorted(p for p in tmp_path.rglob("*"))
    for revision in ("../../x", "/etc", "main/../../x", "a\\b"):
        with pytest.raises(OptionError, match="revision"):
            resolve("org/tiny", revision, cache_dir=hub_cache(), endpoint=hub.url)
        with pytest.raises(OptionError, match="revision"):
            resolve("org/tiny", revision, cache_dir=hub_cache(), endpoint=hub.url, update=True)
    proc = cli("download", "--model", "org/tiny", "--revision", "../../x")
    assert proc.returncode == 2 and "revision" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert hub.requests == []
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, in HF_HOME or beside it


def test_huggingface_hub_warnings_never_reach_stderr(hub, tiny_checkpoint, monkeypatch, capfd):
    """A nearly full disk made huggingface_hub warn on stderr before our own error line."""
    import shutil as shutil_module
    import warnings
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    hub.add("org/tiny", tiny_checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = resolve("org/tiny", cache_dir=hub_cache(), endpoint=hub.url)
    assert found.weights.is_file()
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
