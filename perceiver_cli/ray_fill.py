"""Fill corpora on Ray Data: `perceiver ray-fill`, and the pieces for Ray users' own pipelines.

    import ray
    from perceiver_cli import FillOptions, LoadOptions
    from perceiver_cli.ray_fill import fill_dataset

    ds = ray.data.from_items([{"text": "The capital of France is [MASK:6]."}])
    filled = fill_dataset(ds, LoadOptions(model="tests/assets/perceiver-small"), actors=2)
    filled.take_all()  # each row gains "filled", "spans" (JSON) and "error"

The model runs in a pool of Ray actors (`Dataset.map_batches` with a callable class), each
loading it once, as `perceiver fill` does, and filling a batch with batch mode's
`fill_chunk` (one `fill_many` call). Ray restarts an actor that dies and runs its batch
again; the actors write nothing, so the dataset that map_batches returns (and `ray-fill`'s
output, which the driver writes from it) holds every row exactly once.

`perceiver ray-fill` (`run`): the driver reads the input files with batch mode's
`LineReader` and cuts them into batch mode's chunks (4 x --batch-size lines aligned to line
numbers), one row per chunk in Ray's object store; an actor call fills a chunk with one
`fill_many` call and returns batch mode's records (`batch.record`) with `"file"`
(`results.file_record`), so each equals `fill --batch --json`'s. The rows come back in
order (`preserve_order`) to corpus.py's `Writer`, which owns the files, the output folder
and `--resume`; the tally, summary and progress bar are batch mode's; starting, quieting
and stopping Ray is ray_session.py's.

This is the only module that imports ray (and only inside functions: `perceiver --help`
never loads it, and a missing ray is one line, `require_ray`). torch loads in the actors
only; the `ray-fill` driver never imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import TYPE_CHECKING

from .batch import CHUNK_BATCHES, Outcome, ProgressBar, Tally, can_redraw, fill_chunk, record
from .budget import as_flags
from .corpus import Input, OutputFolder, Writer, read_chunks
from .errors import InputError, PerceiverError
from .options import Budget, FillOptions, LoadOptions, OptionError, RayOptions
from .ray_session import RaySession, check_local_resources, from_ray
from .results import dumps, file_record, json_line

if TYPE_CHECKING:
    from rich.console import Console

INSTALL_HINT = "perceiver ray-fill needs Ray Data: pip install 'perceiver-cli[ray]' (or pip install 'ray[data]')"


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
        if isinstance(error, ActorFailure):
            return error
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
                       batch_size=32, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=2))

    `load` and `fill` are `LoadOptions` / `FillOptions` (or their dicts, or a model name
    for `load`). A batch is a pyarrow Table (`batch_format="pyarrow"`, as `fill_dataset`
    asks) with the column `column` (default "text": str, or bytes read as UTF-8 with
    surrogateescape); each row gains three columns: `filled` (the filled text; a blank
    text as it is; None when the text failed), `spans` (the `spans` array of `perceiver
    fill --json`, as JSON text; None when it failed) and `error` (why it failed, else
    None). A text that cannot be filled (no marker, a malformed marker) gets its error;
    the others go on. The texts of one batch are one chunk of batch mode: one `fill_many`
    call, `load.batch_size` texts per forward pass. `budget` (a `Budget` or its dict; default
    `Budget()`) is what one text may cost: a text over it gets its `OverBudget` as its error.

    In a Ray actor, torch uses as many threads as the actor has CPUs (`num_cpus`) unless
    `load.threads` says otherwise; the device is `load.device` (auto: the actor's GPU, if
    any). A model that cannot be loaded, or a `fill` that does not fit it, is raised (as
    `ActorFailure`) by the first call: the run stops with that message instead of Ray
    starting actor after actor.
    """

    def __init__(self, load: LoadOptions | dict | str | None = None, fill: FillOptions | dict | None = None,
                 *, column: str = "text", budget: Budget | dict | None = None):
        self.column, self.error, self.filler = column, None, None
        try:
            self.load_options = _load_options(load)
            self.fill_options = _fill_options(fill)
            from . import runtime

            runtime.configure_threads()  # before torch loads: idle OpenMP threads sleep, as in the CLI
            from .filler import MaskFiller

            self.filler = MaskFiller.from_pretrained(self.load_options)
            if budget is not None:  # what one text may cost (budget.py); else Budget()'s defaults
                self.filler.budget = budget if isinstance(budget, Budget) else Budget.from_dict(budget)
            self.filler.check(self.fill_options)
            _set_threads(self.load_options)
        except PerceiverError as e:
            self.error = ActorFailure.of(e)

    def outcomes(self, lines: list[bytes | None], first: int = 1, skip: int = 0) -> list[Outcome]:
        """Batch mode's outcomes of one chunk: `lines` are lines `first`, `first` + 1, ...
        (None: too long to keep); those up to line `skip` are filled, not returned."""
        if self.error is not None:
            raise self.error
        pending = [(first + i, line, b"") for i, line in enumerate(lines)]
        fill_many = lambda texts, options: self.filler.fill_many(texts, options, return_errors=True)  # noqa: E731
        return list(fill_chunk(fill_many, pending, self.fill_options, skip))

    def __call__(self, batch):
        import pyarrow as pa

        if not (type(batch).__module__.startswith("pyarrow") and hasattr(batch, "column_names")):
            raise TypeError(f"MaskFill takes pyarrow batches: map_batches(..., batch_format=\"pyarrow\") "
                            f"(got {type(batch).__name__})")
        texts = [t.encode("utf-8", "surrogateescape") if isinstance(t, str) else t
                 for t in batch.column(self.column).to_pylist()]
        outcomes = iter(self.outcomes([t for t in texts if t is not None]))
        columns: dict[str, list] = {"filled": [], "spans": [], "error": []}
        for text in texts:
            obj = record(next(outcomes), self.fill_options) if text is not None else {"error": "no text (a null value)"}
            columns["filled"].append(obj.get("text"))
            columns["spans"].append(dumps(obj["spans"]).decode("utf-8") if "spans" in obj else None)
            columns["error"].append(obj.get("error"))
        for name, values in columns.items():  # typed: a batch whose texts all failed still has string columns
            if name in batch.column_names:
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, pa.array(values, pa.string()))
        return batch


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
    """`ray-fill`'s actor: one row per chunk in (`file` index, `name` the file's path as
    bytes, `first` line number, `skip` lines already written, `lines` the chunk's lines,
    null for one longer than MAX_LINE_BYTES), one row per chunk out: `file`, `first` (of
    the lines returned), `records` (the JSON lines of `ray-fill`'s output), the tally
    (`filled`, `failed`, `blank`) and `fatal`. A `PerceiverError` that is not about one
    line (the model could not be loaded, a pass failed) is `fatal` (its exit code in
    `fatal_code`): data, not an exception, so the driver reads it as it was raised here
    (Ray hands exceptions back wrapped, their causes as text)."""

    def __init__(self, load=None, fill=None, budget=None):
        super().__init__(load, fill, column="lines", budget=budget)

    def outcomes(self, lines: list[bytes | None], first: int = 1, skip: int = 0) -> list[Outcome]:
        """MaskFill's, a line over the budget with its error in the command's flags (`--max-inputs`)."""
        return [Outcome(o.number, o.line, o.end, as_flags([o.result])[0]) for o in super().outcomes(lines, first, skip)]

    def __call__(self, batch):  # a pyarrow Table
        import pyarrow as pa

        rows = [self._chunk(**row) for row in batch.to_pylist()]
        types = {"file": pa.int32(), "first": pa.int64(), "records": pa.list_(pa.binary()), "filled": pa.int64(),
                 "failed": pa.int64(), "blank": pa.int64(), "fatal": pa.string(), "fatal_code": pa.int8()}
        return pa.table({key: pa.array([row[key] for row in rows], kind) for key, kind in types.items()})

    def _chunk(self, file: int, name: bytes, first: int, skip: int, lines: list) -> dict:
        tally, records, fatal = Tally(), [], None
        try:
            for o in self.outcomes(lines, first, skip):
                tally.add(o.result)
                records.append(json_line(file_record(os.fsdecode(name), record(o, self.fill_options))))
        except PerceiverError as e:
            fatal, records = ActorFailure.of(e), []
        return {"file": file, "first": max(first, skip + 1), "records": records, "fatal": fatal and str(fatal),
                "fatal_code": fatal.exit_code if fatal else 0, **vars(tally)}


# -- Python helper for Ray users ----------------------------------------------------------------


def fill_dataset(ds, load: LoadOptions | dict | str | None = None, fill: FillOptions | dict | None = None, *,
                 column: str = "text", actors: int = 1, gpus_per_actor: float = 0, cpus_per_actor: float = 1,
                 rows_per_call: int | None = None, budget: Budget | dict | None = None, **map_batches_args):
    """`ds` (a `ray.data.Dataset` with a text column) with each row filled: `MaskFill`'s
    columns `filled`, `spans` and `error` added. Lazy, as any Dataset: write it
    (`.write_json(...)`, `.write_parquet(...)`) or iterate it to run it.

    `actors` model copies run at once, each with `cpus_per_actor` CPUs and
    `gpus_per_actor` GPUs (fractions share a GPU); each call fills `rows_per_call` rows
    (default 4 x `load.batch_size`, as batch mode), each text held to `budget` (MaskFill's); `map_batches_args` go to
    `map_batches` as they are (`memory=`, `accelerator_type=`, ...). An actor that dies is
    restarted and its batch run again (Ray Data's defaults: without limit). The actors hold
    their CPUs for the whole run: leave the cluster a CPU for the stages before them
    (reading files takes tasks), or those wait forever (a warning says so).
    """
    ray = require_ray()

    load = _load_options(load)
    fill = _fill_options(fill)
    RayOptions(actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor).check_load(load)
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    if cpus and actors * cpus_per_actor >= cpus:
        import warnings

        warnings.warn(f"{actors} actors x {cpus_per_actor:g} CPUs take all {cpus:g} CPUs of the Ray cluster: a stage "
                      "that needs a CPU (a read such as ray.data.read_text) would wait for one forever; leave one free",
                      stacklevel=2)
    return ds.map_batches(
        MaskFill,
        fn_constructor_kwargs={"load": load, "fill": fill, "column": column, "budget": budget},
        batch_size=rows_per_call or load.batch_size * CHUNK_BATCHES,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        **map_batches_args,
    )


# -- perceiver ray-fill: the driver --------------------------------------------------------------


def run(inputs: list[Input], folder: OutputFolder, load: LoadOptions, fill: FillOptions, settings: RayOptions, *,
        stderr: "Console | None" = None, worker: type = RecordFill, budget: Budget | None = None) -> Tally:
    """Fill every line of `inputs` on Ray into one JSON Lines file per input in `folder`
    (whose `plan` said what is done already); returns the tally of this run's lines. Uses
    the Ray this process is already connected to, if any; else connects to
    `settings.address`, or starts a local Ray (and stops it at the end). `worker` is the
    actor class (RecordFill; tests pass a subclass), `budget` what each line may cost
    (default Budget()). Ctrl-C keeps the file being written
    (for --resume) and says so on `stderr`; any other failure removes it."""
    ray = require_ray()
    writer = Writer(folder, inputs)
    if all(item.done for item in inputs):  # --resume: nothing left to fill, no Ray to start
        return writer.tally
    with RaySession(ray, settings) as session, _interrupts() as seen:
        try:
            refs = [ray.put(_chunk_table(inputs, *c)) for c in read_chunks(inputs, load.batch_size * CHUNK_BATCHES)]
            if refs:
                ds, refs = _dataset(ray, refs, worker, load, fill, settings, started=session.started, budget=budget), None
                total = sum(item.lines - item.skip for item in inputs if not item.done)
                _drain(ds, writer, ProgressBar(stderr if stderr is not None and can_redraw(stderr) else None, total))
            writer.finish()
        except BaseException as e:
            if not (isinstance(e, KeyboardInterrupt) or seen):
                writer.abandon()
                raise
            writer.abandon(keep=True)
            if stderr is not None:
                stderr.print(f"interrupted: {writer.files()} of {len(inputs)} files complete in {folder.directory}; "
                             "run again with --resume to go on", soft_wrap=True, markup=False, highlight=False)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from e
    return writer.tally


@contextlib.contextmanager
def _interrupts():
    """A list that holds the SIGINT once Ctrl-C came (the handler then does what it did).
    Ray Data shuts its executor down as a KeyboardInterrupt passes through its iterator; an
    exception raised there would take the interrupt's place, so `run` asks this list, not
    the exception's type. (A guard: the exit 1 seen in CI was the process ending inside
    `ray.shutdown()`, which ray_session._settle prevents.)"""
    seen: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield seen
        return

    def handler(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _chunk_table(inputs: list[Input], file: int, first: int, lines: list):
    import pyarrow as pa

    return pa.table({"file": pa.array([file], pa.int32()), "name": pa.array([os.fsencode(inputs[file].path)]),
                     "first": pa.array([first], pa.int64()), "skip": pa.array([inputs[file].skip], pa.int64()),
                     "lines": pa.array([lines], pa.list_(pa.binary()))})


def _dataset(ray, refs: list, worker: type, load: LoadOptions, fill: FillOptions, settings: RayOptions, *,
             started: bool, budget: Budget | None = None):
    """The chunks of `refs` through a pool of `worker` actors, in order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results come back in input order
    for name in ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats"):
        setattr(ctx, name, getattr(ctx, name) and not settings.quiet_ray)
    local = started and settings.address is None  # this run's own Ray: what it has is known
    if local:
        check_local_resources(ray.cluster_resources(), settings)
    cpus = settings.cpus_per_actor
    if cpus is None:  # 1; on this run's own Ray without GPUs, its CPUs shared out
        whole = local and not settings.gpus_per_actor
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.actors) if whole else 1
    return ray.data.from_arrow_refs(refs).map_batches(
        worker,
        fn_constructor_kwargs={"load": load, "fill": fill, "budget": budget},
        batch_size=1,  # a row is a chunk: one fill_many call, as in batch mode (Ray wants a size with GPUs)
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
        num_cpus=cpus,
        num_gpus=settings.gpus_per_actor,
    )


def _drain(ds, writer: Writer, bar: ProgressBar) -> None:
    """Run `ds`, handing each chunk's records to `writer`; an actor's `fatal` is raised."""
    done = 0
    try:
        with contextlib.closing(_batches(ds)) as batches:
            for batch in batches:
                for row in batch.to_pylist():
                    if row["fatal"] is not None:
                        raise ActorFailure(row["fatal"], row["fatal_code"])
                    writer.add(row["file"], row["first"], row["records"],
                               Tally(row["filled"], row["failed"], row["blank"]))
                    done += len(row["records"])
                bar.update(done, done)
    finally:
        bar.stop()


def _batches(ds):
    """`ds`'s batches; Ray's failures as one line (`_from_ray`)."""
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    try:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except PerceiverError:
                raise
            except Exception as e:
                raise from_ray(e) from e
            yield batch
    finally:  # stop Ray Data's executor now, not while Ray shuts down under it
        try:
            batches.close()
        except Exception:  # noqa: BLE001 - the run's own error, if any, is the one to report
            pass
