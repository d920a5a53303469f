"""Batch mode (`perceiver fill --batch FILE`): every line an independent example.

- Lines are read as a stream (`LineReader`): memory holds one chunk of lines, never the
  file, and a slow producer (`tail -f log | perceiver fill --batch -`) gets each line's
  result as soon as no further line is waiting.
- Lines are filled in chunks through `MaskFiller.fill_many` (which sorts the chunk's
  windows by length, so similar lengths share a forward pass); results are written in
  input order, each as soon as its chunk is done.
- `LineWriter` writes every output line whole, with one `os.write`: a run that is killed
  leaves only complete lines behind, and `--resume` picks up after the last one.
- A line that cannot be filled (no marker, a malformed marker, a span longer than the
  model's window) gets its error in its place; the other lines go on.

This module writes the results it is given a destination for (stdout or `-o FILE`) and
its progress and per-line errors on the stderr console the CLI hands it.
"""

from __future__ import annotations

import io
import json
import os
import select
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from .errors import InputError

if TYPE_CHECKING:
    from rich.console import Console

    from .filler import MaskFiller

CHUNK_BATCHES = 4  # lines per fill_many call = --batch-size x this
READ_SIZE = 1 << 16


def open_input(name: str, output: Path | None = None) -> BinaryIO:
    """The input as a binary stream: `-` is stdin. An unreadable file is bad input (exit 2)."""
    if name == "-":
        return sys.stdin.buffer
    try:
        f = open(name, "rb")
        if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):  # open() lets a directory through on some systems
            f.close()
            raise IsADirectoryError(21, "Is a directory", name)
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror or e}") from e
    if output is not None and output.exists() and os.path.samefile(name, output):
        f.close()
        raise InputError(f"-o {output} is the input file: write the results somewhere else")
    return f


class LineReader:
    """Lines of a binary stream, without their line ends, read in blocks of READ_SIZE.

    Yields (line, end) where end is b"\\n", b"\\r\\n" or b"" (a last line with no newline).
    `consumed` counts the bytes of the lines yielded so far; `ready()` says whether the
    next line can be had without waiting for the producer.
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        try:
            self.fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # e.g. an in-memory stream
            self.fd = None
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline
        self.eof = False
        self.consumed = 0

    def _read(self) -> None:
        data = os.read(self.fd, READ_SIZE) if self.fd is not None else self.stream.read(READ_SIZE)
        if not data:
            self.eof = True
        self.buf += data

    def ready(self) -> bool:
        if self.eof or self.buf.find(b"\n", self.scanned) != -1 or self.fd is None:
            return True
        try:
            return bool(select.select([self.fd], [], [], 0)[0])  # data or end of input waiting
        except (OSError, ValueError):
            return True

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        while True:
            i = self.buf.find(b"\n", self.scanned)
            while i == -1 and not self.eof:
                self.scanned = len(self.buf)
                self._read()
                i = self.buf.find(b"\n", self.scanned)
            if i == -1:  # end of input
                if not self.buf:
                    return
                line, end, size = bytes(self.buf), b"", len(self.buf)
            else:
                line, end, size = bytes(self.buf[:i]), b"\n", i + 1
                if line.endswith(b"\r"):
                    line, end = line[:-1], b"\r\n"
            del self.buf[:size]
            self.scanned = 0
            self.consumed += size
            yield line, end


class LineWriter:
    """Writes whole lines, flushed at once; to a file descriptor with one `os.write` per
    line (looping only on a short write), so a kill never leaves a partial line behind."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        try:
            stream.flush()
            self.fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            self.fd = None
        self.lines = 0  # lines written

    def write(self, line: bytes) -> None:
        if self.fd is None:
            self.stream.write(line)
            self.stream.flush()
        else:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view) :]
        self.lines += 1


def resume_point(path: Path, as_json: bool) -> int:
    """Complete lines already in `path`; a trailing partial line (from a kill) is cut off.

    With `--json`, the last complete line must be the object of that line number, or the
    file is not the output of an earlier run of this command.
    """
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise InputError(f"cannot resume {path}: {e.strerror or e}") from e
    with f:
        count = end = pos = 0  # complete lines, the byte after the last of them, bytes read
        while block := f.read(1 << 20):
            n = block.count(b"\n")
            if n:
                count += n
                end = pos + block.rindex(b"\n") + 1
            pos += len(block)
        if end < pos:
            f.truncate(end)
        if as_json and count:
            try:
                ok = json.loads(_last_line(f, end)).get("line") == count
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                raise InputError(
                    f"cannot resume {path}: its line {count} is not the JSON result of input line {count} "
                    "(was it written by another command?)"
                )
    return count


def _last_line(f: BinaryIO, end: int) -> bytes:
    """The line that ends at byte `end` (its newline excluded), read backwards."""
    pos = end - 1
    tail = b""
    while pos > 0:
        step = min(READ_SIZE, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
        i = tail.rfind(b"\n")
        if i != -1:
            return tail[i + 1 :]
    return tail


def _json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def run(
    filler: "MaskFiller",
    source: BinaryIO,
    *,
    output: Path | None,
    resume: bool,
    as_json: bool,
    explain: bool,
    chunk: int,
    options: dict,
    stderr: "Console",
    stdout_is_terminal: bool,
) -> int:
    """Fill every line of `source`; results to `output` (or stdout), in order. Returns the
    number of lines that failed."""
    from rich.text import Text

    from .render import json_object

    skip = resume_point(output, as_json) if resume and output is not None else 0
    reader = LineReader(source)
    lines = iter(reader)
    for skipped in range(skip):  # the lines an earlier run already wrote
        if next(lines, None) is None:
            raise InputError(f"cannot resume: {output} already has {skip} lines, the input only {skipped}")
    if output is not None:
        try:
            out = open(output, "ab" if skip else "wb", buffering=0)
        except OSError as e:
            raise InputError(f"cannot write {output}: {e.strerror or e}") from e
    else:
        out = sys.stdout.buffer
    writer = LineWriter(out)

    counts = {"filled": 0, "failed": 0, "empty": 0}
    done = 0
    numbered: list[tuple[int, bytes, bytes]] = []  # (line number, line, line end) waiting to be filled

    def say_failure(n: int, message: str) -> None:
        stderr.print(Text(f"line {n}: {message}", style="yellow"), soft_wrap=True, markup=False, emoji=False)

    def fill_pending() -> None:
        nonlocal done
        todo = [line.decode("utf-8", "surrogateescape") for _, line, _ in numbered if line.strip()]
        results = iter(filler.fill_many(todo, return_errors=True, **options))
        for n, line, end in numbered:
            if not line.strip():  # empty or blank: passed through as is
                counts["empty"] += 1
                text = line.decode("utf-8", "replace")
                writer.write(_json_line({"line": n, "text": text, "spans": []}) if as_json else line + (end or b"\n"))
                continue
            result = next(results)
            if isinstance(result, Exception):
                counts["failed"] += 1
                if as_json:
                    writer.write(_json_line({"line": n, "error": str(result)}))
                else:
                    say_failure(n, str(result))
                    writer.write(line + (end or b"\n"))
                continue
            counts["filled"] += 1
            if as_json:
                writer.write(_json_line({"line": n, **json_object(result, options.get("top_k", 1), explain)}))
            else:
                writer.write(result.data + (end or b"\n"))
        done += len(numbered)
        numbered.clear()

    # A progress bar when stderr is a terminal, unless the results scroll on that terminal.
    progress = _progress(stderr) if stderr.is_terminal and not (output is None and stdout_is_terminal) else None
    start = time.perf_counter()
    try:
        if progress is not None:
            progress.start()
            task = progress.add_task("filling", total=_size(source), completed=reader.consumed, lines=skip, rate="-")
        for line, end in lines:
            numbered.append((skip + done + len(numbered) + 1, line, end))
            if len(numbered) >= chunk or not reader.ready():
                fill_pending()
                if progress is not None:
                    rate = done / max(time.perf_counter() - start, 1e-9)
                    progress.update(task, completed=reader.consumed, lines=skip + done, rate=f"{rate:.1f}")
        fill_pending()
        if progress is not None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, completed=reader.consumed, lines=skip + done, rate=f"{rate:.1f}")
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
            progress = None
        where = f" to {output}; run again with --resume to go on" if output is not None else ""
        stderr.print(f"interrupted: {skip + writer.lines} lines written{where}", soft_wrap=True, markup=False, highlight=False)
        raise
    finally:
        if progress is not None:
            progress.stop()
        if output is not None:
            out.close()

    if counts["failed"] or stderr.is_terminal:
        summary = f"{counts['filled']} filled, {counts['failed']} failed"
        if counts["empty"]:
            summary += f", {counts['empty']} blank passed through"
        if skip:
            summary += f" ({skip} lines already in {output})"
        stderr.print(Text(summary, style="bold red" if counts["failed"] else "green"), soft_wrap=True)
    return counts["failed"]


def _size(source: BinaryIO) -> int | None:
    """Bytes in the input when it is a regular file (the progress bar's total), else None."""
    try:
        st = os.fstat(source.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _progress(console: "Console"):
    """A progress bar over the input's bytes, showing lines done, lines per second and,
    when the input's size is known, the time left."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        BarColumn(),
        TextColumn("{task.fields[lines]} lines"),
        TextColumn("{task.fields[rate]} lines/s"),
        TimeRemainingColumn(),
        console=console,
    )
