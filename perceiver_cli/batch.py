"""Batch mode (`perceiver fill --batch FILE`): every line an independent example.

- Lines are read as a stream (`LineReader`): memory holds one chunk of lines, never the
  file, and a slow producer (`tail -f log | perceiver fill --batch -`) gets each line's
  result as soon as no further line is waiting. A line longer than `MAX_LINE_BYTES` is
  never held: it gets an error and reading goes on at the next newline.
- `fill_lines` fills lines in chunks aligned to line numbers (chunk k holds lines
  k*C+1 .. (k+1)*C, C = --batch-size x CHUNK_BATCHES), so which lines share forward
  passes depends only on the input: a resumed run writes exactly the bytes an
  uninterrupted run would. Each chunk goes through one `fill_many` call (which sorts its
  windows by length, so similar lengths share a pass).
- `run` is the writer loop: every output line whole, with one `os.write`, in input order;
  a run that is killed leaves only complete lines behind, and `--resume` picks up after
  the last one. The output file is locked (`flock`) while a run writes it.
- Plain output holds one line per input line: fills never contain a line break there
  (`FillOptions.single_line`); with `--json` they may (JSON escapes them).
- A line that cannot be filled (no marker, a malformed marker, a span longer than the
  model's window, too long a line) gets its error in its place; the other lines go on.

`fill_many` is any callable `(texts, FillOptions) -> [FillResult | InputError]`: the
in-process filler or a server's client, so both share this module's output logic.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import select
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

from .errors import InputError, PerceiverError
from .options import FillOptions
from .results import FillResult, blank_record, error_record, line_record

if TYPE_CHECKING:
    from rich.console import Console

FillMany = Callable[[list[str], FillOptions], list]
CHUNK_BATCHES = 4  # lines per fill_many call = --batch-size x this
READ_SIZE = 1 << 16
MAX_LINE_BYTES = 1 << 20  # a longer line is an error, never held in memory


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
    A line longer than `max_line` bytes is yielded as (None, end): its bytes are dropped
    as they are read, so memory stays bounded whatever the input (`/dev/zero`).
    `consumed` counts the bytes of the lines yielded so far; `ready()` says whether the
    next line can be had without waiting for the producer.
    """

    def __init__(self, stream: BinaryIO, max_line: int = MAX_LINE_BYTES):
        self.max_line = max_line
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

    def __iter__(self) -> Iterator[tuple[bytes | None, bytes]]:
        while True:
            dropped = 0  # bytes of an overlong line already thrown away
            i = self.buf.find(b"\n", self.scanned)
            while i == -1 and not self.eof:
                if len(self.buf) > self.max_line:  # keep nothing of it but the count
                    dropped += len(self.buf)
                    self.buf.clear()
                self.scanned = len(self.buf)
                self._read()
                i = self.buf.find(b"\n", self.scanned)
            if dropped or (i if i != -1 else len(self.buf)) > self.max_line:
                size = (i + 1) if i != -1 else len(self.buf)
                del self.buf[:size]
                self.scanned = 0
                self.consumed += dropped + size
                yield None, b"\n" if i != -1 else b""
                continue
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


class Output:
    """Where batch results go: stdout, or `-o FILE` opened and locked before the model loads.

    The file is opened without truncating, then locked (`flock`, exclusive, not waiting):
    a second run on the same file fails at once instead of interleaving its lines. Only
    then is it truncated (a new run) or cut after its last complete line (`--resume`).
    """

    def __init__(self, path: Path | None, *, resume: bool = False, as_json: bool = False):
        self.path, self.skip = path, 0
        if path is None:
            if sys.stdout is None:
                raise PerceiverError("standard output is closed: nowhere to write the results (use -o FILE)")
            self.file: BinaryIO = sys.stdout.buffer
            self.writer = LineWriter(self.file)
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from e
        self.file = os.fdopen(fd, "r+b", buffering=0)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise PerceiverError(f"another run is writing {path} (it holds the file's lock): wait for it to end") from None
        except OSError:
            pass  # a file system without locks: go on unlocked
        try:
            if resume:
                self.skip = _resume_point(self.file, as_json, path)
            else:
                self.file.truncate(0)
            self.file.seek(0, os.SEEK_END)
        except BaseException:
            self.file.close()
            raise
        self.writer = LineWriter(self.file)

    def close(self) -> None:
        if self.path is not None:
            self.file.close()  # and with it the lock


def resume_point(path: Path, as_json: bool) -> int:
    """Complete lines already in `path` (0 when it does not exist); a trailing partial line
    (from a kill) is cut off. See `_resume_point`."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise InputError(f"cannot resume {path}: {e.strerror or e}") from e
    with f:
        return _resume_point(f, as_json, path)


def _resume_point(f: BinaryIO, as_json: bool, path: Path) -> int:
    """Complete lines in the open file `f`; a trailing partial line is cut off.

    With `--json`, the last complete line must be the object of that line number, or the
    file is not the output of an earlier run of this command.
    """
    f.seek(0)
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


class TooLong(InputError):
    """A line longer than MAX_LINE_BYTES (its bytes were not kept)."""


@dataclass
class Outcome:
    """One input line and what became of it: `result` is a FillResult, an InputError, or
    None for a blank line (passed through)."""

    number: int  # 1-based
    line: bytes  # without its line end (empty for a line too long to keep)
    end: bytes  # b"\n", b"\r\n" or b""
    result: FillResult | InputError | None


def fill_lines(
    fill_many: FillMany, reader: LineReader, options: FillOptions, *, chunk: int, skip: int = 0
) -> Iterator[Outcome]:
    """Every line of `reader` after the first `skip`, filled, in order (module docstring).

    The lines of the first chunk that come before `skip` are filled again (not yielded), so
    the chunk's forward passes are the same as in a run that never stopped.
    """
    lines = iter(reader)
    first_chunk = skip - skip % chunk  # lines before this are skipped unread by the model
    pending: list[tuple[int, bytes | None, bytes]] = []
    number = 0
    for number in range(1, first_chunk + 1):
        if next(lines, None) is None:
            raise InputError(f"cannot resume: the output already has {skip} lines, the input only {number - 1}")
    for line, end in lines:
        number += 1
        pending.append((number, line, end))
        if number % chunk == 0 or not reader.ready():
            yield from _fill_chunk(fill_many, pending, options, skip)
            pending = []
    if number < skip:
        raise InputError(f"cannot resume: the output already has {skip} lines, the input only {number}")
    yield from _fill_chunk(fill_many, pending, options, skip)


def _fill_chunk(fill_many: FillMany, pending, options: FillOptions, skip: int) -> Iterator[Outcome]:
    texts = [line.decode("utf-8", "surrogateescape") for _, line, _ in pending if line is not None and line.strip()]
    results = iter(fill_many(texts, options) if texts else [])
    for number, line, end in pending:
        if line is None:
            result: FillResult | InputError | None = TooLong(f"the line is longer than {MAX_LINE_BYTES:,} bytes: not filled")
        elif not line.strip():
            result = None
        else:
            result = next(results)
        if number > skip:
            yield Outcome(number, line or b"", end, result)


def run(
    fill_many: FillMany,
    source: BinaryIO,
    output: Output,
    options: FillOptions,
    *,
    as_json: bool,
    chunk: int,
    stderr: "Console",
    stdout_is_terminal: bool,
) -> int:
    """Fill every line of `source` into `output`, in order. Returns the number of lines that failed."""
    from rich.text import Text

    skip = output.skip
    reader = LineReader(source)
    writer = output.writer
    counts = {"filled": 0, "failed": 0, "empty": 0}
    if not as_json:
        options = options.replace(single_line=True)  # one output line per input line

    def record(o: Outcome) -> bytes:
        if o.result is None:  # empty or blank: passed through as is
            counts["empty"] += 1
            return _json(blank_record(o.number, o.line.decode("utf-8", "replace"))) if as_json else o.line + (o.end or b"\n")
        if isinstance(o.result, Exception):
            counts["failed"] += 1
            if as_json:
                return _json(error_record(o.number, str(o.result)))
            stderr.print(Text(f"line {o.number}: {o.result}", style="yellow"), soft_wrap=True, markup=False, emoji=False)
            return o.line + (o.end or b"\n")  # the line as it was
        counts["filled"] += 1
        if as_json:
            return _json(line_record(o.number, o.result, options.top_k, options.explain))
        return o.result.data + (o.end or b"\n")

    # A progress bar when stderr is a terminal, unless the results scroll on that terminal.
    progress = _progress(stderr) if stderr.is_terminal and not (output.path is None and stdout_is_terminal) else None
    start = time.perf_counter()
    done = 0
    try:
        if progress is not None:
            progress.start()
            task = progress.add_task("filling", total=_size(source), completed=reader.consumed, lines=skip, rate="-")
        for outcome in fill_lines(fill_many, reader, options, chunk=chunk, skip=skip):
            writer.write(record(outcome))
            done += 1
            if progress is not None and (not reader.ready() or done % chunk == 0):
                rate = done / max(time.perf_counter() - start, 1e-9)
                progress.update(task, completed=reader.consumed, lines=skip + done, rate=f"{rate:.1f}")
        if progress is not None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, completed=reader.consumed, lines=skip + done, rate=f"{rate:.1f}")
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
            progress = None
        where = f" to {output.path}; run again with --resume to go on" if output.path is not None else ""
        stderr.print(f"interrupted: {skip + writer.lines} lines written{where}", soft_wrap=True, markup=False, highlight=False)
        raise
    finally:
        if progress is not None:
            progress.stop()

    if counts["failed"] or stderr.is_terminal:
        summary = f"{counts['filled']} filled, {counts['failed']} failed"
        if counts["empty"]:
            summary += f", {counts['empty']} blank passed through"
        if skip:
            summary += f" ({skip} lines already in {output.path})"
        stderr.print(Text(summary, style="bold red" if counts["failed"] else "green"), soft_wrap=True)
    return counts["failed"]


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


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
