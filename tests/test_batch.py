"""Batch mode (`perceiver fill --batch FILE`): every line an independent example, in order,
streamed, nothing lost when a run is killed. Tiny random checkpoint; no network."""

from __future__ import annotations

import io
import json
import os
import pty
import random
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perceiver_cli import batch
from perceiver_cli.cli import app
from perceiver_cli.filler import MaskFiller

from .conftest import TINY, ctrl_c_reaches_it, perceiver, process_env, read_pty, run_process, wait_until_blocked

WINDOW = TINY["max_position_embeddings"] - 2

WORDS = "the of and model byte text window latent query a to in is café naïve".split()


def sentences(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[str]:
    """n lines of lo..hi words with one marker each: [MASK:N] or [MASK], anywhere."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        words[rng.randrange(len(words))] = "[MASK]" if i % 3 == 0 else f"[MASK:{rng.randint(1, 6)}]"
        out.append(" ".join(words))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def alone(tiny_checkpoint) -> MaskFiller:
    """Fills one text per forward pass: what each line gives when filled on its own."""
    return MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", batch_size=1)


def run_batch(checkpoint: Path, *args: str, stdin: bytes | None = None):
    return CliRunner().invoke(app, ["fill", "-m", str(checkpoint), *args], input=stdin)


def write_lines(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_bytes("".join(line + end for line in lines).encode("utf-8", "surrogateescape"))
    return path


def json_lines(data: str | bytes) -> list[dict]:
    text = data.decode() if isinstance(data, bytes) else data
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# -- results and order --------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", ["3", "8"])
def test_batched_lines_equal_each_line_filled_alone(tiny_checkpoint, alone, tmp_path, batch_size):
    lines = sentences(24, seed=1)
    result = run_batch(tiny_checkpoint, "--batch", str(write_lines(tmp_path / "in.txt", lines)), "--json",
                       "--batch-size", batch_size)
    assert result.exit_code == 0, result.stderr
    objects = json_lines(result.stdout)
    assert [o["line"] for o in objects] == list(range(1, 25))
    for line, obj in zip(lines, objects):
        want = alone.fill(line)
        assert obj["text"] == want.text
        assert [bytes(s["bytes"]) for s in obj["spans"]] == [s.data for s in want.spans]  # padding is exact
        for span, w in zip(obj["spans"], want.spans):
            assert span["start"] == w.start and abs(span["logprob"] - w.logprob) <= 1e-4


def test_order_is_kept_with_lines_of_very_different_lengths(tiny_checkpoint, alone, tmp_path):
    short = sentences(10, seed=2, lo=1, hi=2)
    long = sentences(10, seed=3, lo=60, hi=120)  # hundreds of bytes: several windows each
    lines = [x for pair in zip(long, short) for x in pair]
    result = run_batch(tiny_checkpoint, "--batch", str(write_lines(tmp_path / "in.txt", lines)), "--batch-size", "4")
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes.split(b"\n") == [alone.fill(line).data for line in lines] + [b""]


def test_stdin_dash_and_output_file(tiny_checkpoint, alone, tmp_path):
    lines = sentences(5, seed=4)
    data = "\n".join(lines).encode() + b"\n"
    to_stdout = run_batch(tiny_checkpoint, "--batch", "-", stdin=data)
    out = tmp_path / "out.txt"
    to_file = run_batch(tiny_checkpoint, "--batch", "-", "-o", str(out), stdin=data)
    assert to_stdout.exit_code == to_file.exit_code == 0
    assert to_file.stdout_bytes == b""
    assert out.read_bytes() == to_stdout.stdout_bytes == b"".join(alone.fill(line).data + b"\n" for line in lines)


def test_blank_lines_line_ends_and_bytes_pass_through(tiny_checkpoint, tmp_path):
    data = b"a [MASK:2] b\r\n\n   \ncaf\xe9 \x00 [MASK:1] \xff!\nlast [MASK:3] line"  # no final newline
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    plain = run_batch(tiny_checkpoint, "--batch", str(path))
    assert plain.exit_code == 0, plain.stderr
    lines = plain.stdout_bytes.split(b"\n")
    assert len(lines) == 6 and lines[-1] == b""  # one line out per line in; every line ends with \n
    assert lines[0].startswith(b"a") and lines[0].endswith(b" b\r") and len(lines[0]) == len(b"a b\r") + 2
    assert lines[1:3] == [b"", b"   "]
    assert lines[3].startswith(b"caf\xe9 \x00") and lines[3].endswith(b" \xff!") and len(lines[3]) == 6 + 1 + 3
    assert lines[4].startswith(b"last") and lines[4].endswith(b" line") and len(lines[4]) == 4 + 3 + 5
    objects = json_lines(run_batch(tiny_checkpoint, "--batch", str(path), "--json").stdout)
    assert objects[1] == {"line": 2, "text": "", "spans": []}
    assert objects[2] == {"line": 3, "text": "   ", "spans": []}
    assert objects[0]["text"].endswith(" b") and "\r" not in objects[0]["text"]  # \r\n is the line end, not text
    assert objects[3]["text"].startswith("caf\ufffd \x00") and objects[3]["spans"][0]["start"] == 7


# -- failures --------------------------------------------------------------------------------------

MIXED = ["good [MASK:3] line", "no marker at all", "bad [MASK:x] marker", f"far too [MASK:{WINDOW + 1}] long",
         "", "another [MASK] good one"]
ERRORS = {2: "no [MASK] marker", 3: "N must be a whole number", 4: f"longer than the model's {WINDOW}-byte window"}


def test_failing_lines_in_json_mode(tiny_checkpoint, alone, tmp_path):
    result = run_batch(tiny_checkpoint, "--batch", str(write_lines(tmp_path / "in.txt", MIXED)), "--json")
    assert result.exit_code == 1
    objects = json_lines(result.stdout)
    assert [o["line"] for o in objects] == [1, 2, 3, 4, 5, 6]
    for n, fragment in ERRORS.items():
        assert set(objects[n - 1]) == {"line", "error"} and fragment in objects[n - 1]["error"]
    assert objects[0]["text"] == alone.fill(MIXED[0]).text and objects[5]["text"] == alone.fill(MIXED[5]).text
    assert objects[4] == {"line": 5, "text": "", "spans": []}
    assert result.stderr.splitlines() == ["2 filled, 3 failed, 1 blank passed through"]


def test_failing_lines_in_plain_mode(tiny_checkpoint, alone, tmp_path):
    result = run_batch(tiny_checkpoint, "--batch", str(write_lines(tmp_path / "in.txt", MIXED)))
    assert result.exit_code == 1
    out = result.stdout_bytes.split(b"\n")
    assert out[:-1] == [alone.fill(MIXED[0]).data, *(m.encode() for m in MIXED[1:5]), alone.fill(MIXED[5]).data]
    errors = result.stderr.splitlines()
    assert len(errors) == 4
    for line, (n, fragment) in zip(errors, ERRORS.items()):
        assert line.startswith(f"line {n}: ") and fragment in line
    assert errors[-1] == "2 filled, 3 failed, 1 blank passed through"


def test_all_good_lines_exit_0_quietly(tiny_checkpoint, tmp_path):
    result = run_batch(tiny_checkpoint, "--batch", str(write_lines(tmp_path / "in.txt", sentences(3))), "--json")
    assert result.exit_code == 0 and result.stderr == ""
    assert len(json_lines(result.stdout)) == 3


def test_explain_needs_json_and_adds_alternatives(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", ["x [MASK:2] y"])
    refused = run_batch(tiny_checkpoint, "--batch", str(path), "--explain")
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --explain with --batch needs --json")
    (obj,) = json_lines(run_batch(tiny_checkpoint, "--batch", str(path), "--json", "--explain", "-k", "2").stdout)
    assert len(obj["spans"][0]["alternatives"]) == 2 and len(obj["spans"][0]["candidates"]) == 2


def test_output_must_not_be_the_input(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", ["a [MASK:2]"])
    result = run_batch(tiny_checkpoint, "--batch", str(path), "-o", str(path))
    assert result.exit_code == 2 and "is the input file" in result.stderr
    assert path.read_text() == "a [MASK:2]\n"


def test_a_marker_of_thousands_of_digits_fails_its_line_only(tiny_checkpoint, tmp_path):
    lines = ["a [MASK:3] b", f"a [MASK:{'9' * 5000}] b", "c [MASK:2] d"]
    result = run_batch(tiny_checkpoint, "--batch", str(write_lines(tmp_path / "in.txt", lines)), "--json")
    assert result.exit_code == 1
    objects = json_lines(result.stdout)
    assert [o["line"] for o in objects] == [1, 2, 3] and "text" in objects[0] and "text" in objects[2]
    assert "5000-digit number of bytes" in objects[1]["error"]


def test_a_choice_with_a_line_break_is_refused_for_plain_output_before_any_work(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", ["one [MASK] a", "two [MASK] b"])
    out = tmp_path / "out.txt"
    out.write_text("earlier results\n")
    plain = run_batch(tiny_checkpoint, "--batch", str(path), "--choice", "x\ny", "--choice", "z", "-o", str(out))
    assert plain.exit_code == 2 and "holds a line break: plain --batch output is one line per input line" in plain.stderr
    assert out.read_text() == "earlier results\n"  # refused before -o is touched
    as_json = run_batch(tiny_checkpoint, "--batch", str(path), "--choice", "x\ny", "--choice", "z", "--json")
    assert as_json.exit_code == 0 and len(json_lines(as_json.stdout)) == 2  # JSON escapes a line break


def test_output_must_not_be_the_file_stdin_reads(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", ["a [MASK:2]"])
    with open(path, "rb") as stdin:
        p = subprocess.run(perceiver("fill", "-m", str(tiny_checkpoint), "--batch", "-", "-o", str(path)), stdin=stdin,
                           capture_output=True, env=process_env(tmp_path), timeout=120)
    assert p.returncode == 2 and b"is the file standard input reads" in p.stderr
    assert path.read_text() == "a [MASK:2]\n"


def test_output_to_a_device_is_written_as_a_stream_and_cannot_be_resumed(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", ["a [MASK:2]", "b [MASK] c"])
    assert run_batch(tiny_checkpoint, "--batch", str(path), "-o", os.devnull).exit_code == 0
    resumed = run_batch(tiny_checkpoint, "--batch", str(path), "-o", os.devnull, "--resume")
    assert resumed.exit_code == 2 and f"--resume needs -o to name a regular file; {os.devnull} is not one" in resumed.stderr


def test_an_unwritable_stderr_does_not_stop_the_run(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", MIXED)
    out = tmp_path / "out.txt"
    with open("/dev/full", "w") as full:  # every line error and the summary fail to be written
        p = subprocess.run(perceiver("fill", "-m", str(tiny_checkpoint), "--batch", str(path), "-o", str(out)),
                           stdout=subprocess.PIPE, stderr=full, env=process_env(tmp_path), timeout=120)
    assert p.returncode == 1  # lines failed, as with a stderr that works
    assert out.read_bytes().count(b"\n") == len(MIXED)


def test_force_color_into_a_file_gives_no_progress_bar(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", ["no marker", *sentences(20, seed=5)])
    p = run_process(perceiver("fill", "-m", str(tiny_checkpoint), "--batch", str(path), "-o", str(tmp_path / "out.txt")),
                    tmp_path, FORCE_COLOR="1")
    assert p.returncode == 1 and b"lines/s" not in p.stderr
    assert b"line 1: no [MASK] marker" in p.stderr  # the messages are there, in colour


# -- resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["plain", "json"])
def test_resume_after_a_partial_last_line(tiny_checkpoint, tmp_path, mode):
    path = write_lines(tmp_path / "in.txt", sentences(12, seed=5))
    full = tmp_path / "full.txt"
    assert run_batch(tiny_checkpoint, "--batch", str(path), *mode, "-o", str(full)).exit_code == 0
    lines = full.read_bytes().splitlines(keepends=True)
    partial = tmp_path / "partial.txt"
    partial.write_bytes(b"".join(lines[:5]) + lines[5][:7])  # killed while line 6 was half written
    result = run_batch(tiny_checkpoint, "--batch", str(path), *mode, "-o", str(partial), "--resume")
    assert result.exit_code == 0, result.stderr
    assert partial.read_bytes() == full.read_bytes()


def test_resume_with_no_earlier_output_starts_from_the_first_line(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", sentences(3, seed=6))
    out = tmp_path / "out.jsonl"
    assert run_batch(tiny_checkpoint, "--batch", str(path), "--json", "-o", str(out), "--resume").exit_code == 0
    assert [o["line"] for o in json_lines(out.read_bytes())] == [1, 2, 3]


def test_resume_refuses_an_output_it_did_not_write(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", sentences(3, seed=7))
    out = tmp_path / "out.jsonl"
    out.write_text('{"something": "else"}\n')
    result = run_batch(tiny_checkpoint, "--batch", str(path), "--json", "-o", str(out), "--resume")
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot resume")
    assert out.read_text() == '{"something": "else"}\n'  # left alone
    out.write_text("x\n" * 5)  # more lines than the input has
    result = run_batch(tiny_checkpoint, "--batch", str(path), "-o", str(out), "--resume")
    assert result.exit_code == 2 and "already has 5 lines, the input only 3" in result.stderr


def test_resume_point_counts_complete_lines_and_cuts_a_partial_one(tmp_path):
    out = tmp_path / "out.txt"
    out.write_bytes(b"one\ntwo\nthr")
    assert batch.resume_point(out, as_json=False) == 2
    assert out.read_bytes() == b"one\ntwo\n"
    big = b"".join(json.dumps({"line": n, "text": "x" * 5000}).encode() + b"\n" for n in range(1, 400))
    out.write_bytes(big + b'{"line": 400, "te')
    assert batch.resume_point(out, as_json=True) == 399 and out.read_bytes() == big
    assert batch.resume_point(tmp_path / "missing.txt", as_json=True) == 0


# -- reading and writing lines -----------------------------------------------------------------------


def test_line_reader_splits_lines_and_counts_bytes():
    long = b"y" * (3 * batch.READ_SIZE + 5)
    data = b"a\r\n\nb\n" + long + b"\nlast"
    reader = batch.LineReader(io.BytesIO(data))
    assert list(reader) == [(b"a", b"\r\n"), (b"", b"\n"), (b"b", b"\n"), (long, b"\n"), (b"last", b"")]
    assert reader.consumed == len(data)


def test_line_reader_streams_an_endless_input():
    class Endless(io.RawIOBase):
        def __init__(self):
            self.given = 0

        def readable(self):
            return True

        def readinto(self, buf):
            chunk = (b"the [MASK:2] line\n" * 1000)[: len(buf)]
            buf[: len(chunk)] = chunk
            self.given += len(chunk)
            return len(chunk)

    source = Endless()
    lines = iter(batch.LineReader(source))
    first = [next(lines) for _ in range(10_000)]
    assert first[-1] == (b"the [MASK:2] line", b"\n")
    assert source.given < 2 * 10_000 * 18 + batch.READ_SIZE  # read as needed, not to the end


def test_line_reader_knows_when_the_next_line_is_not_there_yet():
    r, w = os.pipe()
    try:
        reader = batch.LineReader(os.fdopen(r, "rb", buffering=0))
        lines = iter(reader)
        os.write(w, b"first\nsec")
        assert next(lines) == (b"first", b"\n")
        assert not reader.ready()  # half a line: filling what we have beats waiting
        os.write(w, b"ond\n")
        assert reader.ready() and next(lines) == (b"second", b"\n")
        os.close(w)
        w = -1
        assert reader.ready() and next(lines, None) is None
    finally:
        if w != -1:
            os.close(w)


def test_line_writer_writes_whole_lines_to_a_file_descriptor(tmp_path):
    path = tmp_path / "out.txt"
    with open(path, "wb", buffering=0) as f:
        writer = batch.LineWriter(f)
        assert writer.fd == f.fileno()
        writer.write(b"x" * 1_000_000 + b"\n")
        writer.write(b"two\n")
        assert path.read_bytes()[-4:] == b"two\n"  # on disk at once, nothing buffered
    assert writer.lines == 2 and path.stat().st_size == 1_000_005


# -- real processes ---------------------------------------------------------------------------------


def command(checkpoint: Path, *args: str) -> list[str]:
    return perceiver("fill", "-m", str(checkpoint), *args)


def test_killed_run_then_resume_equals_an_uninterrupted_run(tiny_checkpoint, tmp_path):
    lines = sentences(400, seed=8, lo=2, hi=12)
    path = write_lines(tmp_path / "in.txt", lines)
    out = tmp_path / "out.jsonl"
    args = ["--batch", str(path), "--json", "--batch-size", "1", "-o", str(out)]
    p = subprocess.Popen(command(tiny_checkpoint, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=process_env(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    killed = out.read_bytes()
    assert 20 <= killed.count(b"\n") < 400  # stopped part-way
    assert killed.endswith(b"\n")  # never a partial line: each line is one write
    resumed = run_batch(tiny_checkpoint, *args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    reference = tmp_path / "reference.jsonl"
    assert run_batch(tiny_checkpoint, *args[:-1], str(reference)).exit_code == 0
    assert out.read_bytes() == reference.read_bytes()
    assert [o["line"] for o in json_lines(out.read_bytes())] == list(range(1, 401))


@pytest.fixture(scope="module")
def stream_process(tiny_checkpoint, tmp_path_factory):
    """`--batch -` fed one line at a time by a slow producer, then Ctrl-C: what came out when."""
    tmp = tmp_path_factory.mktemp("stream")
    p = subprocess.Popen(command(tiny_checkpoint, "--batch", "-", "--json"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=process_env(tmp), preexec_fn=ctrl_c_reaches_it)
    answers = []
    try:
        for line in (b"first [MASK:2] line\n", b"second [MASK:3] line\n"):
            p.stdin.write(line)
            p.stdin.flush()
            ready, _, _ = select.select([p.stdout], [], [], 120)
            answers.append(p.stdout.readline() if ready else b"")
        blocked = wait_until_blocked(p.pid)
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
    finally:
        p.kill()
    return answers, blocked, p.returncode, rest, err


def test_each_line_comes_out_before_the_next_goes_in(stream_process):
    answers, *_ = stream_process
    assert [json.loads(a)["line"] for a in answers] == [1, 2]
    assert json.loads(answers[1])["text"].startswith("second")


def test_ctrl_c_in_batch_mode_says_what_was_written(stream_process):
    _, blocked, code, rest, err = stream_process
    assert blocked and code == 130 and rest == b""
    assert err.decode().splitlines() == ["interrupted: 2 lines written"] and b"Traceback" not in err


def test_progress_bar_on_a_terminal_and_quiet_closed_pipe(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "in.txt", sentences(200, seed=9, lo=2, hi=8))
    env = process_env(tmp_path, COLUMNS="120")
    master, slave = pty.openpty()
    progress = subprocess.Popen(command(tiny_checkpoint, "--batch", str(path), "-o", str(tmp_path / "out.txt")),
                                stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    quoted = " ".join(f"'{c}'" for c in command(tiny_checkpoint, "--batch", str(path)))
    closed = subprocess.Popen(["/bin/bash", "-c", f"{quoted} | head -n 1 > /dev/null; exit ${{PIPESTATUS[0]}}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    screen = read_pty(master)
    os.close(master)
    assert progress.wait(timeout=120) == 0
    assert b"lines/s" in screen and b"200 lines" in screen  # the bar's last state: every line
    assert b"200 filled, 0 failed" in screen  # and the summary, as stderr is a terminal
    out, err = closed.communicate(timeout=120)
    assert err == b"" and closed.returncode == 141  # `| head -n 1`: the rest meets a closed pipe, silently


def test_a_mask_token_that_is_not_utf8_gives_valid_json_lines(tiny_checkpoint, tmp_path):
    """`--mask-token $'\\xff'` with `--batch --json`: the error record of a line without
    the marker quotes it, and used to raise UnicodeEncodeError with 0 lines written. Every
    line now has its record, each valid UTF-8 JSON whose message reads back to the raw byte."""
    args = [*perceiver("fill", "-m", str(tiny_checkpoint), "--device", "cpu", "--batch", "-", "--json"),
            b"--mask-token", b"\xff"]
    proc = run_process(args, tmp_path, stdin=b"a \xff b\nno marker here\n")
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line.decode("utf-8")) for line in proc.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2]
    assert len(records[0]["spans"]) == 1
    assert "error" in records[1] and "\udcff" in records[1]["error"]
    assert records[1]["error"].encode("utf-8", "surrogateescape").startswith(b"no \xff marker")
