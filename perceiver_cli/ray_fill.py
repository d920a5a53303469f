"""Fill corpora on Ray Data: `perceiver ray-fill`, and the pieces for Ray users' own pipelines.

    import ray
    from perceiver_cli import FillOptions, LoadOptions
    from perceiver_cli.ray_fill import fill_dataset

    ds = ray.data.from_items([{"text": "The capital of France is [MASK:6]."}])
    filled = fill_dataset(ds, LoadOptions(model="tests/assets/perceiver-small"), actors=2)
    filled.take_all()  # each row gains "filled", "spans" (JSON) and "error"

The model runs in a pool of Ray actors (`Dataset.map_batches` with a callable class): each
actor loads it once, in `__init__`, from the Hub cache or a local directory exactly as
`perceiver fill` does, and fills batches of texts with `MaskFiller.fill_many`. Ray restarts
an actor that dies and runs its batch again; the actors write nothing themselves, so the
dataset that map_batches returns (and `ray-fill`'s output, written from it by the driver)
holds every row exactly once.

`perceiver ray-fill` (`run`): the driver reads the input files with batch mode's byte-exact
`LineReader`, cuts each file into blocks of 4 x --batch-size lines aligned to line numbers
(batch mode's chunks: the same lines share a `fill_many` call, so each record equals
`fill --batch --json`'s), puts them into Ray's object store, runs them through the actor
pool in order (`preserve_order`), and writes one JSON Lines file per input file, in input
order, checking that every (file, line) comes back exactly once.

This is the only module that imports ray (and only inside functions: `perceiver --help`
never loads it, and a missing ray is one line, `require_ray`). torch loads in the actors
only; the `ray-fill` driver never imports it.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .batch import CHUNK_BATCHES, MAX_LINE_BYTES, LineReader, open_input
from .errors import InputError, PerceiverError
from .options import FillOptions, LoadOptions, OptionError, RayOptions
from .results import blank_record, dumps, error_record, line_record

if TYPE_CHECKING:
    from rich.console import Console

INSTALL_HINT = "perceiver ray-fill needs Ray Data: pip install 'perceiver-cli[ray]' (or pip install 'ray[data]')"
FILLED, FAILED, BLANK = 0, 1, 2  # a record's kind


def require_ray():
    """The `ray` module, or an `InputError` (exit 2) saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra, not just ray core)
    except ImportError as e:
        raise InputError(f"{INSTALL_HINT} ({e})") from None
    return ray


# -- the actors' side ---------------------------------------------------------------------------


class ActorFailure(PerceiverError):
    """A `PerceiverError` raised in an actor, carried to the driver as plain text: the
    command-line wording (`--max-span ...`) and its exit code. Picklable, unlike some of
    the errors it stands for."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return (ActorFailure, (str(self), self.exit_code))

    @classmethod
    def of(cls, error: PerceiverError) -> "ActorFailure":
        return cls(error.flag() if isinstance(error, OptionError) else str(error), error.exit_code)


def _load_options(load: LoadOptions | dict | str | None) -> LoadOptions:
    if isinstance(load, LoadOptions):
        return load
    if isinstance(load, str):
        return LoadOptions(model=load)
    return LoadOptions.from_dict(load or {})


def _fill_options(fill: FillOptions | dict | None) -> FillOptions:
    return fill if isinstance(fill, FillOptions) else FillOptions.from_dict(fill or {})


class MaskFill:
    """A callable class for `Dataset.map_batches`: the model is loaded once per actor.

        ds.map_batches(MaskFill, fn_constructor_kwargs={"load": LoadOptions(...), "fill": FillOptions(...)},
                       batch_size=32, compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1)

    `load` and `fill` are `LoadOptions` / `FillOptions` (or their dicts, or a model name
    for `load`). A batch ("pyarrow", as `fill_dataset` asks; Ray's default "numpy"; or
    "pandas") needs the column
    `column` (default "text": str, or bytes read as UTF-8 with surrogateescape); each
    row gains three columns: `filled` (the filled text; a blank text as it is; None when
    the text failed), `spans` (the `spans` array of `perceiver fill --json`, as JSON text;
    None when it failed) and `error` (why it failed, else None). A text that cannot be
    filled (no marker, a malformed marker) gets its error; the others go on. The texts of
    one batch go through one `fill_many` call, `load.batch_size` texts per forward pass.

    Inside a Ray actor, torch uses as many threads as the actor has CPUs (`num_cpus`),
    unless `load.threads` says otherwise; the device is `load.device` (auto: the GPU Ray
    gave the actor, if any). A model that cannot be loaded, or a `fill` that does not fit
    it, is raised (as `ActorFailure`) by the first call, so the run stops with that
    message instead of Ray starting actor after actor.
    """

    def __init__(self, load: LoadOptions | dict | str | None = None, fill: FillOptions | dict | None = None,
                 *, column: str = "text"):
        self.column = column
        self.error: ActorFailure | None = None
        self.filler = None
        try:
            self.load_options = _load_options(load)
            self.fill_options = _fill_options(fill)
            from . import runtime

            runtime.configure_threads()  # before torch loads: idle OpenMP threads sleep, as in the CLI
            from .filler import MaskFiller

            self.filler = MaskFiller.from_pretrained(self.load_options)
            self.filler.check(self.fill_options)
            _set_threads(self.load_options)
        except PerceiverError as e:
            self.error = ActorFailure.of(e)

    def fill_texts(self, texts: list[bytes | str | None]) -> list:
        """Per text: a FillResult, an InputError, or None for a blank text (as batch mode:
        empty, or only ASCII whitespace)."""
        if self.error is not None:
            raise self.error
        decoded = [t.decode("utf-8", "surrogateescape") if isinstance(t, bytes) else t for t in texts]
        todo = [i for i, t in enumerate(decoded) if isinstance(t, str) and t.encode("utf-8", "surrogateescape").strip()]
        results: list = [None if isinstance(t, str) else InputError("no text (a null value)") for t in decoded]
        if todo:
            filled = self.filler.fill_many([decoded[i] for i in todo], self.fill_options, return_errors=True)
            for i, result in zip(todo, filled):
                results[i] = result
        return results

    def __call__(self, batch):
        import numpy as np

        table = _is_table(batch)
        texts = batch.column(self.column).to_pylist() if table else list(batch[self.column])
        results = self.fill_texts(texts)
        top_k, explain = self.fill_options.top_k, self.fill_options.explain
        filled, spans, errors = [], [], []
        for text, result in zip(texts, results):
            if result is None:  # blank: passed through
                filled.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
                spans.append("[]")
                errors.append(None)
            elif isinstance(result, Exception):
                filled.append(None)
                spans.append(None)
                errors.append(str(result))
            else:
                record = result.to_dict(top_k, explain)
                filled.append(record["text"])
                spans.append(dumps(record["spans"]).decode("utf-8"))
                errors.append(None)
        if table:  # typed columns: a batch whose texts all failed still has string columns
            import pyarrow as pa

            for name, values in (("filled", filled), ("spans", spans), ("error", errors)):
                if name in batch.column_names:
                    batch = batch.drop_columns([name])
                batch = batch.append_column(name, pa.array(values, pa.string()))
            return batch
        if isinstance(batch, dict):
            out = dict(batch)
            for name, values in (("filled", filled), ("spans", spans), ("error", errors)):
                array = np.empty(len(values), dtype=object)
                array[:] = values
                out[name] = array
            return out
        batch = batch.copy()  # a pandas DataFrame
        batch["filled"], batch["spans"], batch["error"] = filled, spans, errors
        return batch


def _is_table(batch) -> bool:
    return type(batch).__module__.startswith("pyarrow") and hasattr(batch, "column_names")


def _set_threads(load: LoadOptions) -> None:
    """torch's threads: `load.threads`, else (in a Ray actor) the CPUs Ray gave the actor."""
    import torch

    from . import runtime

    if load.threads is not None:
        runtime.apply_threads(torch, load.threads)
        return
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") if ray.is_initialized() else None
    except Exception:  # not in a Ray worker, or an older API: leave torch's default
        cpus = None
    if cpus:
        torch.set_num_threads(max(1, round(cpus)))


class RecordFill(MaskFill):
    """`ray-fill`'s actor: rows of (file, line, data) in, the JSON Lines records of
    `fill --batch --json` out (without "file", which the driver adds).

    Rows are filled in groups of one file's chunk (lines k*C+1 .. (k+1)*C, C the `chunk`),
    whatever batches Ray makes of them: the same `fill_many` calls as batch mode's.
    `data` is a line's bytes, or null for a line longer than MAX_LINE_BYTES (never read).
    """

    def __init__(self, load=None, fill=None, *, chunk: int):
        super().__init__(load, fill, column="data")
        self.chunk = chunk

    def __call__(self, batch):  # a pyarrow Table
        """The batch's records; or, when the model could not be loaded or a pass failed (a
        `PerceiverError` that is not about one line), the error in the column `fatal` (with
        its exit code in `fatal_code`): data, not an exception, so the driver reads it as
        it was raised here (Ray hands exceptions back wrapped, their causes as text)."""
        import pyarrow as pa

        files = batch.column("file").to_pylist()
        lines = batch.column("line").to_pylist()
        try:
            kinds, records = self._records(files, lines, batch.column("data").to_pylist())
            fatal: list = [None] * len(lines)
            codes = [0] * len(lines)
        except PerceiverError as e:
            failure = e if isinstance(e, ActorFailure) else ActorFailure.of(e)
            kinds, records = [FAILED] * len(lines), [b""] * len(lines)
            fatal, codes = [str(failure)] * len(lines), [failure.exit_code] * len(lines)
        return pa.table({
            "file": pa.array(files, pa.int32()),
            "line": pa.array(lines, pa.int64()),
            "kind": pa.array(kinds, pa.int8()),
            "record": pa.array(records, pa.binary()),
            "fatal": pa.array(fatal, pa.string()),
            "fatal_code": pa.array(codes, pa.int8()),
        })

    def _records(self, files: list[int], lines: list[int], datas: list) -> tuple[list[int], list[bytes]]:
        kinds: list[int] = []
        records: list[bytes] = []
        start = 0
        while start < len(lines):  # one group per (file, chunk)
            key = (files[start], (lines[start] - 1) // self.chunk)
            end = start
            while end < len(lines) and (files[end], (lines[end] - 1) // self.chunk) == key:
                end += 1
            group = datas[start:end]
            results = self.fill_texts([d for d in group if d is not None])
            it = iter(results)
            for n, data in zip(lines[start:end], group):
                if data is None:
                    kind, obj = FAILED, error_record(n, f"the line is longer than {MAX_LINE_BYTES:,} bytes: not filled")
                else:
                    result = next(it)
                    if result is None:
                        kind, obj = BLANK, blank_record(n, data.decode("utf-8", "replace"))
                    elif isinstance(result, Exception):
                        kind, obj = FAILED, error_record(n, str(result))
                    else:
                        kind, obj = FILLED, line_record(n, result, self.fill_options.top_k, self.fill_options.explain)
                kinds.append(kind)
                records.append(dumps(obj))
            start = end
        return kinds, records


# -- Python helper for Ray users ----------------------------------------------------------------


def fill_dataset(ds, load: LoadOptions | dict | str | None = None, fill: FillOptions | dict | None = None, *,
                 column: str = "text", actors: int = 1, gpus_per_actor: float = 0, cpus_per_actor: float = 1,
                 rows_per_call: int | None = None, **map_batches_args):
    """`ds` (a `ray.data.Dataset` with a text column) with each row filled: `MaskFill`'s
    columns `filled`, `spans` and `error` added. Lazy, as any Dataset: write it
    (`.write_json(...)`, `.write_parquet(...)`) or iterate it to run it.

    `actors` model copies run at once, each with `cpus_per_actor` CPUs and
    `gpus_per_actor` GPUs (fractions share a GPU); each call fills `rows_per_call` rows
    (default 4 x `load.batch_size`, as batch mode); `map_batches_args` go to
    `map_batches` as they are (`memory=`, `accelerator_type=`, ...). An actor that dies is
    restarted and its batch run again (Ray Data's defaults: without limit). The actors hold
    their CPUs for the whole run: leave the cluster a CPU for the stages before them
    (reading files takes tasks), or those wait forever (a warning says so).
    """
    ray = require_ray()

    load = _load_options(load)
    fill = _fill_options(fill)
    RayOptions(actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor)  # validates
    if load.quantize == "int8" and gpus_per_actor:
        raise OptionError("quantize", "int8 runs on the CPU only: use no GPUs per actor")
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    if cpus and actors * cpus_per_actor >= cpus:
        import warnings

        warnings.warn(f"{actors} actors x {cpus_per_actor:g} CPUs take all {cpus:g} CPUs of the Ray cluster: a stage "
                      "that needs a CPU (a read such as ray.data.read_text) would wait for one forever; leave one free",
                      stacklevel=2)
    return ds.map_batches(
        MaskFill,
        fn_constructor_kwargs={"load": load, "fill": fill, "column": column},
        batch_size=rows_per_call or load.batch_size * CHUNK_BATCHES,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        **map_batches_args,
    )


# -- perceiver ray-fill: inputs ------------------------------------------------------------------


@dataclass
class Input:
    """One input file: its path as given (or as found in a directory or by a glob)."""

    path: str
    output: str = ""  # the name of its JSON Lines file in the output directory
    lines: int = 0  # counted when read


def expand_inputs(names: list[str], output_dir: Path | None = None) -> list[Input]:
    """The files that `names` name, in order: a file as given; a directory's regular files,
    recursively, sorted by path, hidden names (starting with ".") and links to nowhere
    skipped; a glob pattern (`*`, `?`, `[`, `**`) that is not itself a path, its matches
    sorted (regular files, and directories as above). A file named twice (the same device
    and inode) counts once, where it first appears. Files inside `output_dir` are never inputs (a rerun would read its own
    results): a directory or glob skips them, a file named there is refused. Every file is
    opened here, so an unreadable one is an `InputError` (exit 2) before Ray starts."""
    skip = output_dir.resolve() if output_dir is not None else None
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
    inputs: list[Input] = []
    seen: set[tuple[int, int]] = set()
    for path in found:
        f = open_input(path)  # exit 2 for a missing or unreadable file
        try:
            st = os.fstat(f.fileno())
        finally:
            f.close()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        inputs.append(Input(path))
    width = max(5, len(str(len(inputs))))
    for i, item in enumerate(inputs, 1):
        item.output = f"{i:0{width}d}-{os.path.basename(item.path)}.jsonl"
    return inputs


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


def prepare_output(directory: Path) -> None:
    """Make the output directory (exit 2 when it cannot be made or is not a directory)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"--output {directory} is not a directory") from None
    except OSError as e:
        raise InputError(f"cannot write to --output {directory}: {e.strerror or e}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to --output {directory}: permission denied")


def read_blocks(inputs: list[Input], chunk: int) -> Iterator[dict]:
    """Each file's lines as blocks of at most `chunk` lines, aligned to line numbers (lines
    1..C, C+1..2C, ...), as columns: file (index into `inputs`), line (1-based), data (the
    line's bytes without its line end; None for a line longer than MAX_LINE_BYTES).
    Counts each input's lines."""
    for index, item in enumerate(inputs):
        with open_input(item.path) as f:
            lines: list[int] = []
            datas: list[bytes | None] = []
            number = 0
            for line, _end in LineReader(f):
                number += 1
                lines.append(number)
                datas.append(line)
                if len(lines) == chunk:
                    yield {"file": index, "line": lines, "data": datas}
                    lines, datas = [], []
            if lines:
                yield {"file": index, "line": lines, "data": datas}
            item.lines = number


# -- perceiver ray-fill: the driver --------------------------------------------------------------


@dataclass
class Counts:
    filled: int = 0
    failed: int = 0
    blank: int = 0
    files: int = 0

    def summary(self) -> str:
        text = f"{self.filled} filled, {self.failed} failed"
        if self.blank:
            text += f", {self.blank} blank passed through"
        return text


@dataclass
class _Writer:
    """Writes each input's records to `DIR/<its output name>` in input order, checking that
    every line of every file comes exactly once. A file is written as `.NAME.partial` and
    renamed when complete: a file under its own name is whole."""

    directory: Path
    inputs: list[Input]
    index: int = 0  # the input being written
    expected: int = 1  # its next line
    handle: Any = None
    counts: Counts = field(default_factory=Counts)
    written: list[Path] = field(default_factory=list)

    def _open(self) -> None:
        self.handle = open(self.directory / f".{self.inputs[self.index].output}.partial", "wb")

    def _close(self) -> None:
        item = self.inputs[self.index]
        if self.handle is None:
            self._open()
        self.handle.close()
        self.handle = None
        final = self.directory / item.output
        os.replace(self.directory / f".{item.output}.partial", final)
        self.written.append(final)
        self.counts.files += 1
        self.index += 1
        self.expected = 1

    def add(self, file: int, line: int, kind: int, record: bytes) -> None:
        while self.index < file:  # the inputs before this one must be complete
            if self.expected <= self.inputs[self.index].lines:
                raise PerceiverError(f"internal error: line {self.expected} of {self.inputs[self.index].path} did not come back")
            self._close()
        if file != self.index or line != self.expected:
            raise PerceiverError(f"internal error: line {line} of {self.inputs[file].path} came back out of order "
                                 f"(expected line {self.expected} of {self.inputs[self.index].path})")
        if self.handle is None:
            self._open()
        prefix = b'{"file": ' + dumps(self.inputs[file].path) + b", "
        self.handle.write(prefix + record[1:] + b"\n")
        self.expected += 1
        if kind == FILLED:
            self.counts.filled += 1
        elif kind == FAILED:
            self.counts.failed += 1
        else:
            self.counts.blank += 1

    def finish(self) -> None:
        while self.index < len(self.inputs):
            if self.expected <= self.inputs[self.index].lines:
                raise PerceiverError(f"internal error: line {self.expected} of {self.inputs[self.index].path} did not come back")
            self._close()

    def abandon(self) -> None:
        """After a failure: remove the file being written (complete files stay)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.index < len(self.inputs):
            try:
                os.unlink(self.directory / f".{self.inputs[self.index].output}.partial")
            except OSError:
                pass


def run(inputs: list[Input], output_dir: Path, load: LoadOptions, fill: FillOptions, settings: RayOptions, *,
        stderr: "Console | None" = None, worker: type = RecordFill) -> Counts:
    """Fill every line of `inputs` on Ray into one JSON Lines file per input in
    `output_dir`; returns the counts. Uses the Ray this process is already connected to,
    if any; else connects to `settings.address`, or starts a local Ray (and stops it at the
    end). `worker` is the actor class (RecordFill; tests pass a subclass)."""
    ray = require_ray()
    chunk = load.batch_size * CHUNK_BATCHES
    writer = _Writer(output_dir, inputs)
    started = False
    progress = None
    quiet = _QuietNative() if settings.quiet_ray else None
    try:
        if quiet is not None:
            quiet.start()
        if not ray.is_initialized():
            _init_ray(ray, settings)
            started = True
        import pyarrow as pa
        import ray.data

        refs = []
        for block in read_blocks(inputs, chunk):
            n = len(block["line"])
            refs.append(ray.put(pa.table({
                "file": pa.array([block["file"]] * n, pa.int32()),
                "line": pa.array(block["line"], pa.int64()),
                "data": pa.array(block["data"], pa.binary()),
            })))
        total = sum(item.lines for item in inputs)
        if refs:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # results come back in input order
            if settings.quiet_ray:
                ctx.enable_progress_bars = False
                ctx.print_on_execution_start = False
                ctx.enable_auto_log_stats = False
            if started and settings.address is None:  # this run's own Ray: what it has is known
                _check_local_resources(ray.cluster_resources(), settings)
            cpus = settings.cpus_per_actor
            if cpus is None:
                cpus = 1
                if started and settings.address is None and not settings.gpus_per_actor:
                    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.actors)
            ds = ray.data.from_arrow_refs(refs).map_batches(
                worker,
                fn_constructor_kwargs={"load": load, "fill": fill, "chunk": chunk},
                # a block, one file's chunk, is a batch; Ray wants a size with GPUs (RecordFill
                # groups the rows of a batch by file and chunk either way)
                batch_size=chunk if settings.gpus_per_actor else None,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=settings.actors),
                num_cpus=cpus,
                num_gpus=settings.gpus_per_actor,
            )
            del refs
            from .batch import _progress, can_redraw

            if stderr is not None and can_redraw(stderr):
                progress = _progress(stderr)
                progress.start()
                task = progress.add_task("filling", total=total, completed=0, lines=0, rate="-")
            start = time.perf_counter()
            done = 0
            batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
            try:
                for batch in batches:
                    if batch.column("fatal").null_count < batch.num_rows:
                        i = batch.column("fatal").is_valid().to_pylist().index(True)
                        raise ActorFailure(batch.column("fatal")[i].as_py(), batch.column("fatal_code")[i].as_py())
                    for row in zip(*(batch.column(c).to_pylist() for c in ("file", "line", "kind", "record"))):
                        writer.add(*row)
                    done += batch.num_rows
                    if progress is not None:
                        rate = done / max(time.perf_counter() - start, 1e-9)
                        progress.update(task, completed=done, lines=done, rate=f"{rate:.1f}")
            except PerceiverError:
                raise
            except Exception as e:
                raise _from_ray(e) from e
            finally:  # stop Ray Data's executor now, not while Ray shuts down under it
                try:
                    batches.close()
                except Exception:  # noqa: BLE001 - the run's own error, if any, is the one to report
                    pass
        writer.finish()
        return writer.counts
    except BaseException as e:
        writer.abandon()
        if quiet is not None and type(e) is PerceiverError:  # a failure of Ray, not of the model or the input
            quiet.keep = True
            e.args = (f"{e} (Ray's own messages: {quiet.path})",)
        raise
    finally:
        if progress is not None:
            progress.stop()
        try:
            if started:
                ray.shutdown()
        finally:
            if quiet is not None:
                quiet.stop()


class _QuietNative:
    """Ray's C++ core prints notices on the process's stderr (file descriptor 2) that no
    Python setting silences, e.g. an ERROR line about actor constructor arguments on every
    run. While a run lasts, descriptor 2 goes to a log file and Python's `sys.stderr` (our
    messages, the progress bar) to a copy of the real stderr. The file is removed after
    the run, or kept and named in the error when the run fails."""

    def __init__(self):
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix="perceiver-ray-fill-", suffix=".log")
        os.close(fd)
        self.keep = False
        self.saved: int | None = None
        self.stderr = None

    def start(self) -> None:
        import io
        import sys

        if sys.stderr is not None:
            sys.stderr.flush()
        self.saved = os.dup(2)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 2)
        os.close(fd)
        self.stderr = sys.stderr
        encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        sys.stderr = io.TextIOWrapper(io.FileIO(self.saved, "w", closefd=False), encoding=encoding,
                                      errors="backslashreplace", line_buffering=True)

    def stop(self) -> None:
        import sys

        if self.saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.saved = None
        sys.stderr = self.stderr
        if not self.keep:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _check_local_resources(have: dict, settings: RayOptions) -> None:
    """An actor that asks for more than the local Ray has would wait for it forever."""
    for name, key, want in (("cpus_per_actor", "CPU", settings.cpus_per_actor),
                            ("gpus_per_actor", "GPU", settings.gpus_per_actor)):
        if want and want > have.get(key, 0):
            raise OptionError(name, f"asks for {want:g} {key}{'s' * (want != 1)} per actor, more than the "
                                    f"{have.get(key, 0):g} of the local Ray this run started (give --address for "
                                    "a cluster that has them)")


def _init_ray(ray, settings: RayOptions) -> None:
    quiet = settings.quiet_ray
    if quiet:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    kwargs: dict = dict(include_dashboard=False, log_to_driver=not quiet)
    if quiet:
        kwargs["logging_level"] = logging.ERROR
    try:
        if settings.address is None:
            ray.init(address="local", **kwargs)  # a new local Ray, never one that happens to run here
        else:
            _reachable(settings.address)
            ray.init(address=settings.address, **kwargs)
    except PerceiverError:
        raise
    except Exception as e:
        where = f"the Ray cluster at {settings.address}" if settings.address else "a local Ray"
        raise PerceiverError(f"cannot start or reach {where}: {_first_line(e)}") from e
    if quiet:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _reachable(address: str) -> None:
    """A cluster's `host:port` must take a connection: Ray itself would wait minutes, silent."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # "auto" and the like: Ray's to judge
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise PerceiverError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _from_ray(error: BaseException) -> PerceiverError:
    """A failed Ray run in one line (exit 1): the first exception named in Ray's text of
    the failure (the actor's traceback comes back as text), else Ray's own message."""
    import re

    for line in str(error).splitlines():
        found = re.match(r"([A-Za-z_][\w.]*(?:Error|Exception|Failure|Exit)\w*): (.+)", line)
        if found and not found[1].startswith("ray."):
            return PerceiverError(f"the Ray run failed: {found[1].rsplit('.', 1)[-1]}: {found[2].strip()}")
    return PerceiverError(f"the Ray run failed: {type(error).__name__}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
