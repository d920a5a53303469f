"""The files of a corpus run (perceiver_cli/corpus.py), without Ray: inputs and their checks,
output names, the output folder's lock and journal, `--resume`'s plan, the writer."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from perceiver_cli.batch import Tally
from perceiver_cli.corpus import (JOURNAL, NAME_MAX, Input, OutputFolder, Writer, expand_inputs, output_name,
                                  read_chunks, run_key)
from perceiver_cli.errors import InputError, PerceiverError
from perceiver_cli.options import Budget, FillOptions, LoadOptions

OPTIONS = run_key(LoadOptions(model="m"), FillOptions())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def records(path: str, first: int, n: int) -> list[bytes]:
    return [json.dumps({"file": path, "line": i}).encode() + b"\n" for i in range(first, first + n)]


def fill_folder(out: Path, inputs: list[Input], *, stop: tuple[int, int] | None = None) -> Writer:
    """What a run writes for `inputs` (the lines of each as read by read_chunks, chunks of 4),
    stopping before chunk `stop` = (file, first line) when given, as a killed run would."""
    with OutputFolder(out) as folder:
        writer = Writer(folder, inputs)
        for file, first, lines in read_chunks(inputs, 4):
            if (file, first) == stop:
                return writer
            skip = inputs[file].skip
            kept = [n for n in range(first, first + len(lines)) if n > skip]
            writer.add(file, kept[0], records(inputs[file].path, kept[0], len(kept)), Tally(filled=len(kept)))
        writer.finish()
    return writer


# -- inputs --------------------------------------------------------------------------------------


def test_a_named_pipe_or_a_device_is_refused_without_being_opened(tmp_path):
    """A pipe is refused by its status: the check neither waits for a writer nor reads what
    one writes (the old check opened it: it hung, or consumed the writer's lines)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    found: list = []
    thread = threading.Thread(target=lambda: found.append(_error(lambda: expand_inputs([str(fifo)]))), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the check waits on the named pipe"
    assert found == [f"{fifo} is a named pipe, not a regular file: ray-fill reads files (save the lines to one)"]
    assert _error(lambda: expand_inputs(["/dev/null"])).startswith("/dev/null is a device, not a regular file")


def _error(call) -> str:
    try:
        call()
    except InputError as e:
        assert e.exit_code == 2
        return str(e)
    return "no error"


@pytest.mark.parametrize("base", [
    "n" * 240 + ".txt",  # ASCII: the old names passed NAME_MAX from 234 bytes on
    "é" * 120 + ".txt",  # UTF-8, cut at a character boundary
    os.fsdecode(b"\xe9" * 250),  # Latin-1 bytes, not UTF-8
])
def test_output_names_fit_name_max_and_stay_distinct(tmp_path, base):
    other = base[:-5] + "Z" + base[-4:]  # differs after the cut
    paths = [write(tmp_path / "in" / os.fsencode(n).decode("utf-8", "surrogateescape"), b"x [MASK:2]\n")
             for n in (base, other)]
    inputs = expand_inputs([str(p) for p in paths])
    names = [item.output for item in inputs]
    assert len(set(names)) == 2
    for item in inputs:
        assert len(os.fsencode(f".{item.output}.partial")) <= NAME_MAX
        assert item.output.startswith(("00001-", "00002-")) and item.output.endswith(".jsonl")
        (tmp_path / f".{item.output}.partial").write_bytes(b"")  # the file system takes it
    if base.isascii():
        assert os.fsencode(names[0]).startswith(b"00001-nnnn") and "~" in names[0]


def test_short_names_are_unchanged():
    assert output_name("00007-", "dir/sub/a b.txt") == "00007-a b.txt.jsonl"


# -- the output folder -----------------------------------------------------------------------------


def test_a_second_run_on_the_folder_fails_at_once_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out):
        before = sorted(os.listdir(out))
        with pytest.raises(InputError, match=r"another run is writing to --output .*out \(it holds the folder's lock\)"):
            OutputFolder(out)
        assert sorted(os.listdir(out)) == before
    OutputFolder(out).close()  # free again once the first run ends


def test_output_that_is_a_file_is_refused(tmp_path):
    write(tmp_path / "f", b"")
    with pytest.raises(InputError, match="is not a directory"):
        OutputFolder(tmp_path / "f")


# -- the writer ------------------------------------------------------------------------------------


def test_writer_names_a_line_that_did_not_come_back(tmp_path):
    a = write(tmp_path / "a.txt", b"1\n2\n3\n")
    inputs = expand_inputs([str(a)])
    list(read_chunks(inputs, 4))
    with OutputFolder(tmp_path / "out") as folder:
        writer = Writer(folder, inputs)
        writer.add(0, 1, records(str(a), 1, 2), Tally(filled=2))
        with pytest.raises(PerceiverError, match="internal error: line 3 of .*a.txt did not come back"):
            writer.finish()
        with pytest.raises(PerceiverError, match="came back out of order"):
            writer.add(0, 4, records(str(a), 4, 1), Tally(filled=1))


def test_a_failure_removes_the_partial_file_and_ctrl_c_keeps_it(tmp_path):
    a = write(tmp_path / "a.txt", b"1\n2\n3\n")
    inputs = expand_inputs([str(a)])
    list(read_chunks(inputs, 4))
    for keep in (False, True):
        with OutputFolder(tmp_path / "out") as folder:
            writer = Writer(folder, inputs)
            writer.add(0, 1, records(str(a), 1, 2), Tally(filled=2))
            writer.abandon(keep=keep)
        partial = tmp_path / "out" / ".00001-a.txt.jsonl.partial"
        assert partial.exists() == keep
    assert partial.read_bytes() == b"".join(records(str(a), 1, 2))


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB file system (tmpfs), to be filled up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_still_removes_the_partial_file(tmp_path, small_disk):
    """The write fails with ENOSPC; the cleanup must not fail again before it unlinks (the
    old writer's buffered file flushed on close, failed, and left the partial file)."""
    a = write(tmp_path / "a.txt", b"x\n" * 100)
    inputs = expand_inputs([str(a)])
    list(read_chunks(inputs, 4))
    with OutputFolder(small_disk / "out") as folder:
        writer = Writer(folder, inputs)
        with pytest.raises(OSError) as raised:
            for first in range(1, 101):
                writer.add(0, first, [b"{}" + b" " * 4000 + b"\n"], Tally(filled=1))
        assert raised.value.errno == errno.ENOSPC
        writer.abandon()
    assert os.listdir(small_disk / "out") == [JOURNAL]


# -- --resume: the plan ----------------------------------------------------------------------------


def corpus_files(tmp_path: Path) -> list[Path]:
    return [write(tmp_path / f"{name}.txt", b"".join(b"%s %d [MASK:2]\n" % (name.encode(), i) for i in range(n)))
            for name, n in (("a", 10), ("b", 7), ("c", 5))]


def test_resume_skips_complete_files_and_continues_the_partial_one(tmp_path):
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    whole = tmp_path / "whole"

    def fresh(resume: bool, options: dict = OPTIONS) -> list[Input]:
        inputs = expand_inputs([str(f) for f in files])
        with OutputFolder(out) as folder:
            folder.plan(inputs, options, resume=resume)
        return inputs

    inputs = expand_inputs([str(f) for f in files])
    with OutputFolder(whole) as folder:
        folder.plan(inputs, OPTIONS, resume=False)
    fill_folder(whole, inputs)
    inputs = fresh(resume=False)
    fill_folder(out, inputs, stop=(1, 5))  # killed in b.txt after its first chunk
    (out / ".00002-b.txt.jsonl.partial").open("ab").write(b'{"file": "half a rec')  # and mid-write
    resumed = fresh(resume=True)
    assert [(i.done, i.skip) for i in resumed] == [(True, 0), (False, 4), (False, 0)]
    assert resumed[1].skip == 4 and (out / ".00002-b.txt.jsonl.partial").read_bytes().endswith(b"}\n")
    fill_folder(out, resumed)
    names = sorted(n for n in os.listdir(whole) if n != JOURNAL)
    assert sorted(n for n in os.listdir(out) if n != JOURNAL) == names
    assert all((out / n).read_bytes() == (whole / n).read_bytes() for n in names)
    # other options, or an input changed since: those files start over
    assert [i.done for i in fresh(True, run_key(LoadOptions(model="m"), FillOptions(top_k=2)))] == [False] * 3
    assert [i.done for i in fresh(True, run_key(LoadOptions(model="m"), FillOptions(), Budget(max_inputs=9)))] == [False] * 3
    os.utime(files[0], ns=(1, 1))
    assert [i.done for i in fresh(True)] == [False, True, True]


def test_resume_without_a_journal_starts_over(tmp_path):
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    write(out / "00001-a.txt.jsonl", b"{}\n")  # some other run's file of that name
    inputs = expand_inputs([str(f) for f in files])
    with OutputFolder(out) as folder:
        folder.plan(inputs, OPTIONS, resume=True)
    assert [(i.done, i.skip) for i in inputs] == [(False, 0)] * 3
