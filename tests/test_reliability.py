"""What an adversarial round broke: lost batch lines, unbounded memory, closed streams,
concurrent writers, resumes that were not exact, an early Ctrl-C. Each test failed before
its fix. Real subprocesses wherever a stream or a signal is involved."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from perceiver_cli.cli import app

from .conftest import TINY, make_reference, perceiver, process_env
from .test_batch import json_lines, sentences, write_lines

CMD = perceiver()


def run(*args: str, stdin: bytes | None = None, env: dict | None = None, tmp: Path, shell: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """`perceiver ARGS` (or a bash line using $PERCEIVER) as a real process."""
    environment = process_env(tmp, **(env or {}))
    if shell is not None:
        environment["PERCEIVER"] = " ".join(CMD)  # word-split by bash: no spaces in these paths
        return subprocess.run(["bash", "-c", shell], input=stdin, capture_output=True, env=environment, timeout=timeout)
    return subprocess.run([*CMD, *args], input=stdin, capture_output=True, env=environment, timeout=timeout)


@pytest.fixture(scope="module")
def line_breaker(tmp_path_factory) -> Path:
    """A tiny checkpoint whose favourite byte is a newline, then a carriage return."""
    directory = tmp_path_factory.mktemp("line-breaker")
    make_reference(directory, seed=3, **TINY)
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    bias = tensors["embedding_decoder.bias"].clone()
    bias[ord("\n") + 6] += 60.0
    bias[ord("\r") + 6] += 50.0
    tensors["embedding_decoder.bias"] = bias
    save_file(tensors, weights, metadata={"format": "pt"})
    return directory


# -- 1. a fill with a line break never costs plain batch output a line ------------------------------


def test_plain_batch_fills_never_hold_a_line_break_so_resume_counts_right(line_breaker, tmp_path):
    lines = [f"line {i} has [MASK:2] here" for i in range(12)]
    source = write_lines(tmp_path / "in.txt", lines)
    as_json = CliRunner().invoke(app, ["fill", "-m", str(line_breaker), "--batch", str(source), "--json"])
    fills = [bytes(o["spans"][0]["bytes"]) for o in json_lines(as_json.stdout)]
    assert all(b"\n" in f for f in fills)  # the model's own choice is a line break...
    out = tmp_path / "out.txt"
    args = ["fill", "-m", str(line_breaker), "--batch", str(source), "-o", str(out), "--batch-size", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    whole = out.read_bytes()
    assert whole.count(b"\n") == len(lines) and b"\r" not in whole  # ...but plain output keeps one line per line
    for line, got in zip(lines, whole.splitlines()):
        before, after = line.split(" [MASK:2]")
        assert got.startswith(before.encode()) and got.endswith(after.encode()) and len(got) == len(before) + 2 + len(after)
    out.write_bytes(b"".join(whole.splitlines(keepends=True)[:5]) + b"line 5 h")  # killed mid-line
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 0
    assert out.read_bytes() == whole  # no input line's result lost or doubled


# -- 2. bounded memory and time --------------------------------------------------------------------


def test_an_endless_line_is_an_error_read_in_bounded_memory(tiny_checkpoint, tmp_path):
    """200 MB without a newline, then a good line: the long one gets an error, the next is filled,
    and the process never holds the long line (its peak memory stays far below 200 MB more)."""
    p = subprocess.Popen([*CMD, "fill", "-m", str(tiny_checkpoint), "--batch", "-", "--json"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=process_env(tmp_path))

    def feed():
        block = b"\0" * (1 << 20)
        try:
            for _ in range(200):
                p.stdin.write(block)
            p.stdin.write(b"\nthe [MASK:3] line\n")
        finally:
            p.stdin.close()

    writer = threading.Thread(target=feed)
    writer.start()
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    writer.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 1, err  # a line failed
    first, second = json_lines(out)
    assert first == {"line": 1, "error": "the line is longer than 1,048,576 bytes: not filled"}
    assert second["line"] == 2 and len(second["spans"]) == 1
    assert usage.ru_maxrss * 1024 < 150_000_000 + baseline_rss(tiny_checkpoint, tmp_path), usage.ru_maxrss


def baseline_rss(checkpoint: Path, tmp: Path) -> int:
    """Peak memory (bytes) of a one-line batch run: the cost of torch and the model alone."""
    p = subprocess.Popen([*CMD, "fill", "-m", str(checkpoint), "--batch", "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=process_env(tmp))
    p.stdin.write(b"a [MASK:2] b\n")
    p.stdin.close()
    _, _, usage = os.wait4(p.pid, 0)
    return usage.ru_maxrss * 1024


@pytest.mark.parametrize("args, message", [
    (["-k", "100000"], "--top-k must be between 1 and 256 (got 100000)"),
    (["--batch-size", str(10**9)], "--batch-size must be between 1 and 256 (got 1000000000)"),
])
def test_huge_sizes_are_refused_before_any_work(tmp_path, args, message):
    result = run("fill", "-m", "/nonexistent/never-loaded", *args, "a [MASK]", tmp=tmp_path)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [f"error: {message}"]


# -- 3. a closed stdout ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["fill", "{model}", "a [MASK:2] b"],
    ["fill", "{model}", "--json", "a [MASK:2] b"],
    ["fill", "{model}", "--batch", "{lines}"],
    ["info", "{model}"],
], ids=["fill", "json", "batch", "info"])
def test_a_closed_stdout_is_one_error_line(tiny_checkpoint, tmp_path, args):
    lines = write_lines(tmp_path / "in.txt", ["a [MASK:2] b"])
    words = [a.format(model=f"--model={tiny_checkpoint}", lines=lines) for a in args]
    quoted = " ".join(f"'{w}'" for w in words)
    result = run(tmp=tmp_path, shell=f"$PERCEIVER {quoted} >&-")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == ["error: standard output is closed: nowhere to write the results"
                                                   + (" (use -o FILE)" if "--batch" in args else "")]


# -- 4. a pipe closed early ------------------------------------------------------------------------


def test_a_pipe_closed_before_the_output_is_all_written_exits_141(tiny_checkpoint, tmp_path):
    document = tmp_path / "big.txt"
    document.write_bytes(b"word " * 700_000 + b"the [MASK:3] end\n")  # 3.5 MB back out
    result = run(tmp=tmp_path, shell=(
        f"$PERCEIVER fill --model='{tiny_checkpoint}' - < '{document}' | head -c 100 > /dev/null; "
        "exit ${PIPESTATUS[0]}"
    ))
    assert result.returncode == 141 and result.stderr == b""


# -- 8. two runs on one output ---------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_fails_at_once_and_writes_nothing(tiny_checkpoint, tmp_path):
    source = write_lines(tmp_path / "in.txt", sentences(4, seed=1))
    out = tmp_path / "out.txt"
    out.write_bytes(b"first line of the other run\n")
    with open(out, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running batch holds on its output
        result = run("fill", "-m", str(tiny_checkpoint), "--batch", str(source), "-o", str(out), "--resume", tmp=tmp_path)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"error: another run is writing {out} (it holds the file's lock): wait for it to end"
    ]
    assert out.read_bytes() == b"first line of the other run\n"
    again = run("fill", "-m", str(tiny_checkpoint), "--batch", str(source), "-o", str(out), tmp=tmp_path)
    assert again.returncode == 0 and out.read_bytes().count(b"\n") == 4  # once free, it is written


# -- 9. a resume is byte-exact ---------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 9, 17])
def test_json_resume_after_any_cut_is_byte_identical(tiny_checkpoint, tmp_path, cut):
    lines = sentences(26, seed=11, lo=1, hi=30)  # lengths differ: padding differs with the batch's company
    source = write_lines(tmp_path / "in.txt", lines)
    out = tmp_path / "out.jsonl"
    args = ["fill", "-m", str(tiny_checkpoint), "--batch", str(source), "--json", "--batch-size", "2", "-o", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    whole = out.read_bytes()
    out.write_bytes(b"".join(whole.splitlines(keepends=True)[:cut]))
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 0
    assert out.read_bytes() == whole


# -- 10. Ctrl-C while the command's modules load ------------------------------------------------------


def test_ctrl_c_while_the_cli_loads_exits_130_quietly(tmp_path):
    """The console script's entry point, with the interrupt landing in the import of the CLI."""
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'perceiver_cli.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['perceiver', 'fill', 'a [MASK]']\n"
        "from perceiver_cli.entry import main\n"
        "sys.exit(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=process_env(tmp_path), timeout=60)
    assert result.returncode == 130 and result.stderr == b"" and result.stdout == b""


def test_plain_batch_line_too_long_passes_an_empty_line_and_says_why(tiny_checkpoint, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b"x" * (1 << 20 | 1) + b"\nok [MASK:2] line\n")
    result = run("fill", "-m", str(tiny_checkpoint), "--batch", str(source), tmp=tmp_path)
    assert result.returncode == 1
    first, second, rest = result.stdout.split(b"\n")
    assert first == b"" and second.startswith(b"ok") and rest == b""
    assert result.stderr.decode().splitlines() == [
        "line 1: the line is longer than 1,048,576 bytes: not filled", "1 filled, 1 failed"
    ]


def test_json_error_objects_are_what_the_json_format_says(tiny_checkpoint, tmp_path):
    source = write_lines(tmp_path / "in.txt", ["no marker", "", "a [MASK:2] b"])
    result = CliRunner().invoke(app, ["fill", "-m", str(tiny_checkpoint), "--batch", str(source), "--json"])
    objects = json_lines(result.stdout)
    assert objects[0] == {"line": 1, "error": json.loads(json.dumps(objects[0]["error"]))} and "no [MASK]" in objects[0]["error"]
    assert objects[1] == {"line": 2, "text": "", "spans": []}
    assert objects[2]["line"] == 3 and set(objects[2]) == {"line", "text", "spans"}
