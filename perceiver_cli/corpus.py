"""The files of a corpus run (`perceiver ray-fill`), apart from Ray: which files are read,
where their results go, what an earlier run already did, and the writing itself.

- `expand_inputs`: files, directories and globs to a list of regular files, each checked
  (readable, not a pipe or a device: `stat` first, so a named pipe is never opened) and
  given its output name `NNNNN-NAME.jsonl`, shortened with a hash of NAME when it would
  not fit the file system's NAME_MAX (255 bytes) with its `.partial` form.
- `OutputFolder`: the output directory, made if missing and locked (`flock` on the
  directory, not waiting: a second run on it fails at once, exit 2, having written
  nothing). Its journal (`.ray-fill.journal`, JSON Lines) says which run started and
  finished each output file: a `key`, the hash of the input (path, size, mtime) and of
  the options that change a record. `plan` decides, for `--resume`, which files are done
  (complete, same key), which continue from their partial file's last whole record
  (batch mode's `resume_point`), and which start over.
- `read_chunks`: each input's lines (batch mode's `LineReader`) as batch mode's chunks,
  aligned to line numbers; on `--resume`, from the chunk that holds the first line not
  written (filled again whole, so its records are the same bytes).
- `Writer`: each input's records in input order into `.NAME.partial`, one write per
  chunk, renamed to NAME when complete (a file under its own name is whole); it checks
  that every line comes exactly once. On a failure the partial file is removed, even on a
  full disk (the file is unbuffered: closing it writes nothing); on Ctrl-C it is kept for
  `--resume`.

Records are built elsewhere (ray_fill's actors, from batch mode's records); this module
only moves their bytes. It imports neither ray nor torch.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .batch import LineReader, LineWriter, Tally, open_input, resume_point
from .errors import InputError, PerceiverError
from .options import Budget, FillOptions, LoadOptions
from .results import dumps, json_line

NAME_MAX = 255  # bytes in a file name (ext4, xfs, btrfs, tmpfs)
PARTIAL = ".partial"
JOURNAL = ".ray-fill.journal"


@dataclass
class Input:
    """One input file: its path as given (or as found in a directory or by a glob)."""

    path: str
    output: str = ""  # the name of its JSON Lines file in the output directory
    size: int = 0
    mtime_ns: int = 0
    key: str = ""  # this input with this run's options (`OutputFolder.plan`)
    skip: int = 0  # lines already in its partial file (--resume)
    done: bool = False  # its output is complete from an earlier run with the same key (--resume)
    lines: int = 0  # counted when read


def expand_inputs(names: list[str], output_dir: Path | None = None) -> list[Input]:
    """The files that `names` name, in order: a file as given; a directory's regular files,
    recursively, sorted by path, hidden names (starting with ".") and links to nowhere
    skipped; a glob pattern (`*`, `?`, `[`, `**`) that is not itself a path, its matches
    sorted (regular files, and directories as above). A file named twice (the same device
    and inode) counts once, where it first appears. Files inside `output_dir` are never
    inputs (a rerun would read its own results): a directory or glob skips them, a file
    named there is refused. Every file is checked here (`InputError`, exit 2, before Ray
    starts): it must be readable and a regular file."""
    skip = output_dir.resolve() if output_dir is not None else None
    inputs: list[Input] = []
    seen: set[tuple[int, int]] = set()
    for path in _expand(names, skip, output_dir):
        st = _check_file(path)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            inputs.append(Input(path, size=st.st_size, mtime_ns=st.st_mtime_ns))
    width = max(5, len(str(len(inputs))))
    for i, item in enumerate(inputs, 1):
        item.output = output_name(f"{i:0{width}d}-", item.path)
    return inputs


def _expand(names: list[str], skip: Path | None, output_dir: Path | None) -> list[str]:
    found: list[str] = []
    for name in names:
        if name == "-":
            raise InputError("ray-fill reads files, not standard input: save the lines to a file and name it")
        if not os.path.lexists(name) and glob.has_magic(name):
            matches = sorted(glob.glob(name, recursive=True))
            files = [f for m in matches
                     for f in (_walk(m, skip) if os.path.isdir(m) else [m] if os.path.isfile(m) and not _inside(m, skip)
                               else [])]
            if not files:
                raise InputError(f"no file matches {name}" + (" outside --output" if matches else ""))
            found.extend(files)
        elif os.path.isdir(name):
            files = _walk(name, skip)
            if not files:
                raise InputError(f"{name} is a directory without files to read" + (" outside --output" if skip else ""))
            found.extend(files)
        elif _inside(name, skip):
            raise InputError(f"{name} is inside --output {output_dir}: results are written there, not read")
        else:
            found.append(name)
    return found


def _check_file(path: str) -> os.stat_result:
    """A named file's status: it exists, is a regular file (looked at before it is opened:
    opening a named pipe would wait for a writer, reading it would consume it) and opens."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a named pipe" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
            raise InputError(f"{path} is {kind}, not a regular file: ray-fill reads files (save the lines to one)")
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    return st


def _inside(path: str, directory: Path | None) -> bool:
    return directory is not None and Path(path).resolve().is_relative_to(directory)


def _walk(directory: str, skip: Path | None) -> list[str]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _inside(os.path.join(root, d), skip))
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:  # a link to nowhere
                regular = False
            if regular and not name.startswith(".") and not _inside(path, skip):
                files.append(path)
    return sorted(files)


def output_name(prefix: str, path: str) -> str:
    """`PREFIX` + the file name of `path` + `.jsonl`; when its partial form `.NAME.partial`
    would pass NAME_MAX bytes, the file name is cut (at a character boundary, when it is
    UTF-8) and `~` + 12 hex digits of its SHA-256 put after it: distinct names stay distinct."""
    base = os.fsencode(os.path.basename(path))
    room = NAME_MAX - len(b".") - len(PARTIAL) - len(prefix.encode()) - len(b".jsonl")
    if len(base) > room:
        digest = b"~" + hashlib.sha256(base).hexdigest()[:12].encode()
        cut = base[: room - len(digest)]
        try:
            base.decode("utf-8")
            cut = cut.decode("utf-8", "ignore").encode("utf-8")  # a name of text: no half character
        except UnicodeDecodeError:
            pass
        base = cut + digest
    return prefix + os.fsdecode(base) + ".jsonl"


def read_chunks(inputs: list[Input], chunk: int) -> Iterator[tuple[int, int, list]]:
    """Each input's lines as batch mode's chunks, `(file index, first line, lines)`: lines
    1..C, C+1..2C, ... (None for a line longer than MAX_LINE_BYTES). Inputs that are
    `done` are not read; the chunks before the one that holds line `skip` + 1 are read
    past. Counts each input's lines."""
    for index, item in enumerate(inputs):
        if item.done:
            continue
        start = item.skip - item.skip % chunk  # the chunk of line skip + 1 is filled again from its start
        number = 0
        lines: list[bytes | None] = []
        with open_input(item.path) as f:
            for line, _end in LineReader(f):
                number += 1
                if number > start:
                    lines.append(line)
                if len(lines) == chunk:
                    yield index, number - chunk + 1, lines
                    lines = []
        if number < item.skip:
            raise InputError(f"cannot resume {item.path}: its output already has {item.skip} lines, the file only "
                             f"{number} (run without --resume)")
        if lines and number > item.skip:
            yield index, number - len(lines) + 1, lines
        item.lines = number


def run_key(load: LoadOptions, fill: FillOptions, budget: Budget | None = None) -> dict:
    """What of a run's options goes into each record (threads and --offline do not; the
    budget does: it decides which lines fail)."""
    kept = {k: v for k, v in load.to_dict().items() if k not in ("threads", "offline")}
    return {"load": kept, "fill": fill.to_dict(), "budget": (budget or Budget()).to_dict()}


def already(inputs: list[Input]) -> list[str]:
    """What `--resume` found done: for the summary (empty when nothing)."""
    files, lines = sum(item.done for item in inputs), sum(item.skip for item in inputs)
    return [f"{files} files and {lines} lines were already there"] if files or lines else []


class OutputFolder:
    """The output directory of a run, locked while the run lasts (module docstring)."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InputError(f"--output {directory} is not a directory") from None
        except OSError as e:
            raise InputError(f"cannot write to --output {directory}: {e.strerror or e}") from None
        if not directory.is_dir():
            raise InputError(f"--output {directory} is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise InputError(f"cannot write to --output {directory}: permission denied")
        self.fd: int | None = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise InputError(f"another run is writing to --output {directory} (it holds the folder's lock): "
                             "wait for it to end, or write elsewhere") from None
        except OSError:
            pass  # a file system without locks: go on unlocked

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # and with it the lock
            self.fd = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, name: str) -> Path:
        return self.directory / name

    def partial(self, name: str) -> Path:
        return self.directory / f".{name}{PARTIAL}"

    def plan(self, inputs: list[Input], options: dict, *, resume: bool) -> None:
        """Set each input's `key`, and with `resume` its `done` and `skip` from the journal
        and the files in the folder. A file done, or a partial file, of another key starts
        over."""
        last = self._journal() if resume else {}
        for item in inputs:
            identity = {"input": item.path, "size": item.size, "mtime_ns": item.mtime_ns, **options}
            item.key = hashlib.sha256(dumps(identity)).hexdigest()
            entry = last.get(item.output)
            if entry is None or entry.get("key") != item.key:
                continue
            if entry.get("state") == "done" and self.path(item.output).is_file():
                item.done = True
            elif entry.get("state") == "started" and self.partial(item.output).is_file():
                item.skip = resume_point(self.partial(item.output), as_json=True)

    def _journal(self) -> dict[str, dict]:
        """The last journal entry of each output name (a line cut by a kill is ignored)."""
        try:
            data = self.path(JOURNAL).read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise InputError(f"cannot resume from --output {self.directory}: {e.strerror or e}") from e
        last: dict[str, dict] = {}
        for line in data.splitlines():
            try:
                entry = json.loads(line)
                last[entry["output"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
        return last

    def note(self, item: Input, state: str) -> None:
        """Append to the journal that `item`'s output was started or is done."""
        entry = {"output": item.output, "key": item.key, "state": state, "file": item.path}
        with open(self.path(JOURNAL), "ab", buffering=0) as f:
            LineWriter(f).write(json_line(entry))


class Writer:
    """Writes each input's records to its output file, in input order (module docstring).
    Inputs that are `done` are passed over; one with `skip` lines is appended to."""

    def __init__(self, folder: OutputFolder, inputs: list[Input]):
        self.folder, self.inputs = folder, inputs
        self.index = -1  # the input being written
        self.expected = 0  # its next line
        self.out: LineWriter | None = None  # the partial file, once this run opened it
        self.tally = Tally()
        self._next()

    def _next(self) -> None:
        self.index += 1
        while self.index < len(self.inputs) and self.inputs[self.index].done:
            self.index += 1
        if self.index < len(self.inputs):
            self.expected = self.inputs[self.index].skip + 1

    def _open(self) -> None:
        item = self.inputs[self.index]
        if item.skip:
            fd = os.open(self.folder.partial(item.output), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        else:
            self.folder.note(item, "started")
            fd = os.open(self.folder.partial(item.output), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self.out = LineWriter(os.fdopen(fd, "wb", buffering=0))

    def _close(self) -> None:
        item = self.inputs[self.index]
        if self.expected <= item.lines:
            raise PerceiverError(f"internal error: line {self.expected} of {item.path} did not come back")
        if self.out is None:
            self._open()
        self.out.stream.close()
        self.out = None
        os.replace(self.folder.partial(item.output), self.folder.path(item.output))
        self.folder.note(item, "done")
        self._next()

    def add(self, file: int, first: int, records: list[bytes], tally: Tally) -> None:
        """The records (JSON lines) of `file`'s lines `first`, `first` + 1, ..."""
        while self.index < file:  # the inputs before this one must be complete
            self._close()
        if file != self.index or first != self.expected:
            raise PerceiverError(f"internal error: line {first} of {self.inputs[file].path} came back out of order "
                                 f"(expected line {self.expected} of {self.inputs[self.index].path})")
        if self.out is None:
            self._open()
        self.out.write(b"".join(records))
        self.expected += len(records)
        self.tally = self.tally + tally

    def finish(self) -> None:
        while self.index < len(self.inputs):
            self._close()

    def abandon(self, *, keep: bool = False) -> None:
        """After a failure: the file being written is removed (`keep`: left for --resume);
        complete files stay."""
        out, self.out = self.out, None
        if out is None:
            return  # nothing of this run's (a partial file of an earlier run stays)
        try:
            out.stream.close()
        except OSError:
            pass
        finally:
            if not keep:
                try:
                    os.unlink(self.folder.partial(self.inputs[self.index].output))
                except OSError:
                    pass

    def files(self) -> int:
        """Complete output files, this run's and earlier ones'."""
        return self.index + sum(item.done for item in self.inputs[self.index :])
