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
from .results import FillResult, blank_record, error_record, json_line, line_record

if TYPE_CHECKING:
    from rich.console import Console

FillMany = Callable[[list[str], FillOptions], list]
CHUNK_BATCHES = 4  # lines per fill_many call = --batch-size x this
READ_SIZE = 1 << 16
MAX_LINE_BYTES = 1 << 20  # a longer line is an error, never held in memory


def open_input(name: str, output: Path | None = None) -> BinaryIO:
    """The input as a binary stream: `-` is stdin. An unreadable file is bad input (exit 2)."""
    if name == "-":
        if sys.stdin is None:
            raise InputError("--batch -: standard input is closed")
        if output is not None and _same_file(sys.stdin, output):  # `-o FILE < FILE`
            raise InputError(f"-o {output} is the file standard input reads: write the results somewhere else")
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


def _same_file(stream, path: Path) -> bool:
    """Whether the open `stream` reads the existing regular file at `path`."""
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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
    A FILE that is not a regular file (`/dev/null`, a FIFO) is written as it is, and
    cannot be resumed.
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
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # /dev/null, a FIFO, a terminal: written as a stream
                if resume:
                    raise InputError(f"--resume needs -o to name a regular file; {path} is not one")
            elif resume:
                self.skip = _resume_point(self.file, as_json, path)
                self.file.seek(0, os.SEEK_END)
            else:
                self.file.truncate(0)
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
            yield from fill_chunk(fill_many, pending, options, skip)
            pending = []
    if number < skip:
        raise InputError(f"cannot resume: the output already has {skip} lines, the input only {number}")
    yield from fill_chunk(fill_many, pending, options, skip)


def fill_chunk(fill_many: FillMany, pending: list, options: FillOptions, skip: int = 0) -> Iterator[Outcome]:
    """The outcomes of one chunk's lines after the first `skip`. `pending` holds (number,
    line, end) per line, line None for a line too long to keep (an error); a blank line
    (only ASCII whitespace) is passed through; the others go through one `fill_many` call."""
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


@dataclass
class Tally:
    """What became of the lines of a run, and its one-line summary."""

    filled: int = 0
    failed: int = 0
    blank: int = 0

    def add(self, result: FillResult | InputError | None) -> None:
        if result is None:
            self.blank += 1
        elif isinstance(result, Exception):
            self.failed += 1
        else:
            self.filled += 1

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.filled + other.filled, self.failed + other.failed, self.blank + other.blank)

    def summary(self) -> str:
        text = f"{self.filled} filled, {self.failed} failed"
        return text + (f", {self.blank} blank passed through" if self.blank else "")


def report(stderr: "Console", tally: Tally, note: str = "") -> None:
    """The run's summary (and `note`) on stderr, when a line failed or stderr is a terminal."""
    from rich.text import Text

    if tally.failed or stderr.is_terminal:
        stderr.print(Text(tally.summary() + note, style="bold red" if tally.failed else "green"), soft_wrap=True)


def record(o: Outcome, options: FillOptions) -> dict:
    """The JSON object of one input line (`--json`): filled, failed or blank."""
    if o.result is None:
        return blank_record(o.number, o.line.decode("utf-8", "replace"))
    if isinstance(o.result, Exception):
        return error_record(o.number, str(o.result))
    return line_record(o.number, o.result, options.top_k, options.explain)


def output_line(o: Outcome, options: FillOptions, as_json: bool) -> bytes:
    """The output line of one input line: a JSON Lines object, or the plain filled line (a
    line that failed or was blank comes back as it was)."""
    if as_json:
        return json_line(record(o, options))
    data = o.line if o.result is None or isinstance(o.result, Exception) else o.result.data
    return data + (o.end or b"\n")


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

    reader = LineReader(source)
    tally = Tally()
    if not as_json:
        options = options.replace(single_line=True)  # one output line per input line
    # A progress bar when stderr is a terminal, unless the results scroll on that terminal.
    shown = can_redraw(stderr) and not (output.path is None and stdout_is_terminal)
    bar = _Bar(stderr if shown else None, reader, source, output.skip)
    try:
        for outcome in fill_lines(fill_many, reader, options, chunk=chunk, skip=output.skip):
            tally.add(outcome.result)
            if isinstance(outcome.result, Exception) and not as_json:
                stderr.print(Text(f"line {outcome.number}: {outcome.result}", style="yellow"),
                             soft_wrap=True, markup=False, emoji=False)
            output.writer.write(output_line(outcome, options, as_json))
            bar.advance(every=chunk)
    except KeyboardInterrupt:
        bar.stop()
        where = f" to {output.path}; run again with --resume to go on" if output.path is not None else ""
        stderr.print(f"interrupted: {output.skip + output.writer.lines} lines written{where}",
                     soft_wrap=True, markup=False, highlight=False)
        raise
    finally:
        bar.stop()
    report(stderr, tally, f" ({output.skip} lines already in {output.path})" if output.skip else "")
    return tally.failed


class ProgressBar:
    """A progress bar on `console` (None: no bar): the lines done, lines per second (of
    this run) and, when `total` is known, the time left. `completed` and `total` are in
    any unit (bytes of input for batch mode, lines for ray-fill)."""

    def __init__(self, console: "Console | None", total: int | None, completed: int = 0, lines: int = 0):
        self.first, self.start = lines, time.perf_counter()
        self.progress = _progress(console) if console is not None else None
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("filling", total=total, completed=completed, lines=lines, rate="-")

    def update(self, completed: int, lines: int) -> None:
        if self.progress is not None:
            rate = (lines - self.first) / max(time.perf_counter() - self.start, 1e-9)
            self.progress.update(self.task, completed=completed, lines=lines, rate=f"{rate:.1f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class _Bar:
    """Batch mode's `ProgressBar`, over the bytes of the input read."""

    def __init__(self, console: "Console | None", reader: LineReader, source: BinaryIO, skip: int):
        self.reader, self.skip, self.done = reader, skip, 0
        self.bar = ProgressBar(console, _size(source), reader.consumed, skip)

    def advance(self, every: int) -> None:
        """One more line written; the bar is redrawn once a chunk or when input is awaited."""
        self.done += 1
        if self.bar.progress is not None and (not self.reader.ready() or self.done % every == 0):
            self.bar.update(self.reader.consumed, self.skip + self.done)

    def stop(self) -> None:
        self.bar.update(self.reader.consumed, self.skip + self.done)
        self.bar.stop()


def can_redraw(console: "Console") -> bool:
    """Whether a progress bar may be drawn on `console`: a terminal, and a real one
    (FORCE_COLOR / TTY_COMPATIBLE into a file give colour, not a bar redrawn into it)."""
    try:
        return console.is_terminal and bool(console.file.isatty())
    except (OSError, ValueError, AttributeError):
        return False


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
        redirect_stdout=False,  # what is printed on sys.stdout stays there (ray-fill's Ray prints to its log)
    )
