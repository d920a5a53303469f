"""The `perceiver` command: parse options, read input, call the library, render results.

Every option's default and rule is the options dataclass's (options.py): each flag is
declared once (flags.py: the load options shared by every command that loads a model, the
fill options shared by `fill` and `ray-fill`, the work budget shared by `fill`, `ray-fill`
and `serve`), and each command builds `LoadOptions`, `FillOptions`, `Budget`,
`ServeOptions` and `RayOptions` from what was parsed (`flags.build`). Where input comes
from, where output goes and how a command ends is console.py's.

torch is imported only by the commands that run the model, so `--help`, `--version` and
`fill --server` (client.py) start fast. Results go to stdout; everything else to stderr.
"""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from . import __version__, runtime
from .console import (Command, OneLineErrors, check_stdout, debug, exit_after, failures, print_fields, read_document, say,
                      stderr_console, stdout_console, write_stdout)
from .flags import (BatchSizeOpt, ChoiceOpt, ChoiceScoreOpt, DeviceOpt, DtypeOpt, ExplainOpt, MaskTokenOpt, MaxAnswerOpt,
                    MaxInputsOpt, MaxMemoryOpt, MaxSearchOpt, MaxSpanOpt, ModelOpt, OfflineOpt, QuantizeOpt, RevisionOpt,
                    StrategyOpt, ThreadsOpt, TopKOpt, build, completer)
from .options import LOG_FORMATS, MODEL_ENV, SERVER_ENV, Budget, FillOptions, LoadOptions, RayOptions, ServeOptions

app = typer.Typer(
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    help="Fill masked text with DeepMind's byte-level Perceiver IO language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"perceiver {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
):
    """Fill masked text with DeepMind's byte-level Perceiver IO language model."""


def _check_modes(*, text, batch, output, resume, explain, top_k, as_json) -> None:
    """Option combinations only the command line has (`InputError`: exit 2). The values
    themselves are checked by LoadOptions / FillOptions."""
    from .errors import InputError

    if batch is None:
        if output is not None:
            raise InputError("-o/--output works with --batch FILE only (redirect stdout instead)")
        if resume:
            raise InputError("--resume works with --batch FILE -o OUTPUT only")
        return
    if text is not None:
        raise InputError("give either TEXT or --batch FILE, not both")
    if resume and output is None:
        raise InputError("--resume needs -o OUTPUT: the file an earlier run was writing")
    if explain and not as_json:
        raise InputError("--explain with --batch needs --json (each span then gets its per-byte alternatives)")
    if top_k > 1 and not as_json:
        raise InputError("--top-k with --batch needs --json (each span then gets its candidates)")


def _load_filler(load: LoadOptions, fill_options: FillOptions | None = None):
    """The model, with the fill options checked against it (a --max-span longer than the
    model's window: exit 2) before any input is filled. A download shows its progress
    when stderr is a terminal; the library's notes (e.g. an int8 cache that could not be
    written) go to stderr, dimmed."""
    with _startup():
        from .filler import MaskFiller

        filler = MaskFiller.from_pretrained(load, progress=stderr_console().is_terminal)
        runtime.apply_threads(runtime.import_torch(), load.threads)  # the process's, not the library's to set
    if fill_options is not None:
        filler.check(fill_options)
    for note in filler.notes:
        say(f"note: {note}", "dim")
    return filler


@contextmanager
def _startup():
    """Importing torch and loading the model make ~165k objects that live as long as the
    process; Python's cyclic garbage collector would scan them again and again while they
    are made (~0.15-0.3 s of a cold run). So it is off meanwhile; afterwards they are frozen
    (never scanned again) and it is back on for the fills. torch is imported here, with
    OpenMP's idle threads set to sleep rather than spin (runtime.py: a busy machine no
    longer slows a fill tenfold) and without the warning torch prints when NumPy is absent."""
    runtime.configure_threads()
    gc.disable()
    try:
        runtime.import_torch()
        yield
    finally:
        gc.freeze()
        gc.enable()


def _write_document(result, options: FillOptions, *, as_json: bool, from_stdin: bool) -> None:
    """Piped: the filled bytes exactly (the argument form adds a newline, like echo).
    On a terminal: the fills highlighted by confidence, then the tables asked for."""
    from . import render

    top_k, explain = options.top_k, options.explain
    out = stdout_console()
    if as_json:
        from .results import json_line

        line = json_line(result.to_dict(top_k, explain))
        if out.is_terminal:
            out.print_json(line.decode("utf-8"), indent=None)  # the same one line, with colour
        else:
            write_stdout(line)
        return
    if not out.is_terminal:
        write_stdout(result.data if from_stdin else result.data + b"\n")
        if top_k > 1 or explain:
            say("note: --top-k and --explain tables are drawn on a terminal only; in a pipe use --json", "dim")
        return
    render.document(result, out)
    render.legend(out)
    if top_k > 1:
        out.print()
        render.candidates(result, out, top_k)
    if explain:
        out.print()
        render.explain(result, out)


@app.command(cls=Command, short_help="Fill the masked spans of a text.")
def fill(
    ctx: typer.Context,
    text: Optional[str] = typer.Argument(None, metavar="TEXT", show_default=False,
                                         help="Text with [MASK] / [MASK:N] markers; '-' or nothing reads stdin."),
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    strategy: str = StrategyOpt,
    top_k: int = TopKOpt,
    max_span: int = MaxSpanOpt,
    mask_token: str = MaskTokenOpt,
    as_json: bool = typer.Option(False, "--json", help="Write JSON (JSON Lines with --batch)."),
    explain: bool = ExplainOpt,
    choices: Optional[list[str]] = ChoiceOpt,
    choice_score: str = ChoiceScoreOpt,
    device: str = DeviceOpt,
    quantize: str = QuantizeOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    offline: bool = OfflineOpt,
    batch: Optional[str] = typer.Option(None, "--batch", metavar="FILE", help="Fill each line of FILE ('-' = stdin) independently."),
    batch_size: int = BatchSizeOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="With --batch: write to FILE instead of stdout."),
    resume: bool = typer.Option(False, "--resume", help="With --batch -o FILE: skip lines already written."),
    server: Optional[str] = typer.Option(None, "--server", envvar=SERVER_ENV, metavar="URL",
                                         help="Fill through a running `perceiver serve` at URL (its model, device and budget; no torch loaded here)."),
    max_inputs: int = MaxInputsOpt,
    max_search: int = MaxSearchOpt,
    max_memory_mb: int = MaxMemoryOpt,
    max_answer_mb: int = MaxAnswerOpt,
):
    """Fill the masked spans of a text.

    [MASK] lets the model choose the span's length (up to --max-span bytes); [MASK:N]
    masks exactly N bytes. A marker right after a space takes that space into its span.

    \b
    Examples:
      perceiver fill "This is an incomplete sentence where some words are [MASK]."
      perceiver fill -k 5 "The capital of France is [MASK:6]."
      perceiver fill --choice cat --choice horse "The [MASK] sat on the mat." --json
      perceiver fill --explain "some words are [MASK:9]"
      perceiver fill --json "some words are [MASK:9]" | jq -r .text
      cat draft.txt | perceiver fill > filled.txt
      perceiver fill --batch sentences.txt --json -o filled.jsonl
      perceiver fill --batch sentences.txt --json -o filled.jsonl --resume

    Exit status: 0 filled, 2 bad input or usage, 1 runtime failure (the model could not
    be loaded, or a --batch line failed), 130 interrupted, 141 output pipe closed.
    """
    with failures():
        _check_modes(text=text, batch=batch, output=output, resume=resume, explain=explain, top_k=top_k, as_json=as_json)
        options = build(FillOptions, ctx, single_line=batch is not None and not as_json)
        load = build(LoadOptions, ctx)
        budget = build(Budget, ctx)
        if batch is not None:
            from . import batch as batch_mode
            from .client import ServerError

            from .budget import as_flags

            source = batch_mode.open_input(batch, output)  # an unreadable FILE fails before the model loads
            out = batch_mode.Output(output, resume=resume, as_json=as_json)  # locked before the model loads
            try:
                filler = _filler(ctx, server, load, options, budget)
                failed = batch_mode.run(
                    lambda texts, o: as_flags(filler.fill_many(texts, o, return_errors=True)), source, out, options,
                    as_json=as_json, chunk=load.batch_size * batch_mode.CHUNK_BATCHES,
                    stderr=stderr_console(), stdout_is_terminal=stdout_console().is_terminal,
                )
            except ServerError as e:  # the server was lost mid-run: what is written stays, as after Ctrl-C
                if out.path is None:
                    raise
                raise ServerError(f"{e} ({out.skip + out.writer.lines} lines written to {out.path}; "
                                  "run again with --resume to go on)") from None
            finally:
                out.close()
            if failed:
                raise typer.Exit(1)
            return
        check_stdout()
        document, from_stdin = read_document(ctx, text)
        if not document:
            from .errors import InputError

            raise InputError("empty input: nothing to fill (a text with [MASK] or [MASK:N] markers is needed)")
        from .masks import parse

        parse(document, options.mask_token)  # a missing or malformed marker fails here, before torch loads
        filler = _filler(ctx, server, load, options, budget)
        result = filler.fill(document, options)  # over the budget: OverBudget, shown with its flags (exit 2)
        _write_document(result, options, as_json=as_json, from_stdin=from_stdin)


def _filler(ctx: typer.Context, server: Optional[str], load: LoadOptions, options: FillOptions, budget: Budget):
    """What fills: the model loaded here, held to `budget`, or with --server URL (or
    $PERCEIVER_SERVER) a `perceiver serve` (client.py: never imports torch), held to its
    own. Either one takes `fill(text, options)` and `fill_many(texts, options,
    return_errors=True)`, and has checked the options against its model."""
    from .client import server_url

    url = server_url(server, {})
    if url is None:
        filler = _load_filler(load, options)
        filler.budget = budget
        return filler
    from .client import Client

    def given(option: str, env: str) -> str | None:  # where the user gave `option`, if they did
        source = getattr(ctx.get_parameter_source(option), "name", "")
        return {"COMMANDLINE": f"--{option}", "ENVIRONMENT": env}.get(source)

    client = Client.from_environment(url)
    model_from, revision_from = given("model", MODEL_ENV), given("revision", "--revision")
    client.check(options, model=load.model if model_from else None, model_from=model_from or "--model",
                 revision=load.revision if revision_from else None)
    return client


@app.command(short_help="Serve the model over HTTP.")
def serve(
    ctx: typer.Context,
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: str = QuantizeOpt,
    threads: Optional[int] = ThreadsOpt,
    offline: bool = OfflineOpt,
    batch_size: int = BatchSizeOpt,
    host: str = typer.Option(ServeOptions.host, "--host", help="Address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every interface."),
    port: int = typer.Option(ServeOptions.port, "--port", help="Port; 0: any free port."),
    max_batch: int = typer.Option(ServeOptions.max_batch, "--max-batch", help="Most texts of waiting requests run together."),
    batch_wait_ms: float = typer.Option(ServeOptions.batch_wait_ms, "--batch-wait-ms", help="How long to wait for more requests before a batch runs."),
    queue_size: int = typer.Option(ServeOptions.queue_size, "--queue-size", help="Most requests waiting; beyond, 503."),
    max_body_mb: float = typer.Option(ServeOptions.max_body_mb, "--max-body-mb", help="Largest request body, in MiB; beyond, 413."),
    max_inputs: int = typer.Option(ServeOptions.max_inputs, "--max-inputs", help="Most model inputs (a window of a text in one pass) one request may take, and each of its texts (estimated before any work); beyond, 400."),
    max_search: int = MaxSearchOpt,
    max_memory_mb: int = MaxMemoryOpt,
    max_answer_mb: int = MaxAnswerOpt,
    body_timeout_s: float = typer.Option(ServeOptions.body_timeout_s, "--body-timeout-s", help="Seconds a client has to send its request body; then 408."),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", metavar="FILE", help="Require `Authorization: Bearer KEY`, KEY the file's first line (or set PERCEIVER_API_KEY)."),
    access_log: bool = typer.Option(ServeOptions.access_log, "--access-log/--no-access-log", help="One line per request on stderr."),
    log_format: str = typer.Option(ServeOptions.log_format, "--log-format", help="The access log's lines: text, or json (one object a line).",
                                   autocompletion=completer(LOG_FORMATS)),
    cors_origins: Optional[list[str]] = typer.Option(None, "--cors-origin", metavar="ORIGIN", help="Let pages of ORIGIN (https://host[:port], or *) call the server; repeatable [default: none]."),
):
    """Serve the model over HTTP until Ctrl-C or SIGTERM (then requests in flight are answered).

    \b
    GET /health, GET /info, POST / (Hugging Face fill-mask: {"inputs": ..., "parameters":
    {"top_k": ..., "targets": [...]}}), POST /v1/fill (the objects of `fill --json`).

    \b
    Examples:
      perceiver serve
      perceiver serve -m ./my-checkpoint --port 8080
      PERCEIVER_API_KEY=secret perceiver serve --host 0.0.0.0
      perceiver fill --server http://127.0.0.1:8000 "some words are [MASK:9]"
    """
    with failures():
        from .options import read_api_key

        load = build(LoadOptions, ctx)
        settings = build(ServeOptions, ctx, api_key=read_api_key(api_key_file, os.environ))
        budget = build(Budget, ctx)  # its max_inputs is --max-inputs, the server's
        filler = _load_filler(load)
        from .serve import describe, run

        about = describe(filler, settings)

        def announce(url: str) -> None:
            quantized = (" mixed" if about["mixed"] else "") + (", int8" if about["quantize"] == "int8" else "")
            say(f"serving {about['model']} on {url} ({about['device']}, {about['dtype']}{quantized}; "
                f"{'API key required' if settings.api_key else 'no API key'}); Ctrl-C stops")
            if not settings.loopback and not settings.api_key:
                say(f"warning: --host {settings.host} takes requests from other machines, and no API key is set "
                     "(PERCEIVER_API_KEY or --api-key-file)", "yellow")

        from .console import Diagnostics
        from .observe import LineWriter

        access_log = LineWriter(Diagnostics().write)  # best effort: stderr never stops nor slows the server
        try:
            run(filler, settings, announce=announce, log=access_log, budget=budget)
        finally:
            access_log.close()


@app.command(short_help="Fetch a model ahead of time.")
def download(
    ctx: typer.Context,
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
):
    """Fetch a model ahead of time and print where it lives and its size.

    \b
    perceiver download
    perceiver download --model deepmind/language-perceiver --revision main
    """
    from .hub import resolve

    with failures():  # asks the Hub for the revision's latest commit; the cache if it cannot be reached
        load = build(LoadOptions, ctx)
        check_stdout()
        found = resolve(load.model, load.revision, update=True, progress=sys.stderr.isatty())
        if found.repo_id is None:  # a local directory, not fetched: checked as `info` and `fill` load it
            from .checkpoint import load_model

            load_model(found.directory)
        print_fields(_model_fields(found))


@app.command(short_help="Show the resolved model, its files, size and device.")
def info(
    ctx: typer.Context,
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    offline: bool = OfflineOpt,
    device: str = DeviceOpt,
):
    """Show the resolved model, revision, cache path, size, parameter count, device and dtype.

    \b
    perceiver info
    perceiver info --model ./my-checkpoint
    """
    from .hub import resolve

    with failures(), _startup():
        from .checkpoint import load_model
        from .filler import pick_device, pick_dtype

        load = build(LoadOptions, ctx)
        check_stdout()
        where = pick_device(load.device)  # what `fill --device` would use, and its default --dtype
        found = resolve(load.model, load.revision, offline=load.offline, progress=sys.stderr.isatty())
        parameters = sum(p.numel() for p in load_model(found.directory).parameters())  # memory-mapped: cheap
        dtype = str(pick_dtype(load.dtype, where)).removeprefix("torch.")
        print_fields(_model_fields(found) + [("parameters", f"{parameters:,}"), ("device", str(where)), ("dtype", dtype)])


@app.command("ray-fill", cls=Command, short_help="Fill every line of many files on Ray.")
def ray_fill(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., metavar="INPUT", show_default=False,
                                       help="Text files, directories (their files, recursively) or glob patterns; each line one example, as fill --batch."),
    output: Path = typer.Option(..., "--output", "-o", metavar="DIR", help="Directory for the results: one JSON Lines file per input file."),
    address: Optional[str] = typer.Option(RayOptions.address, "--address", envvar="RAY_ADDRESS", metavar="ADDRESS",
                                          help="A running Ray cluster (HOST:6379, or auto; `ray job submit` sets RAY_ADDRESS); unset: start a local Ray for this run."),
    actors: int = typer.Option(RayOptions.actors, "--actors", help="Model copies running at once (Ray actors), each loading the model once."),
    gpus_per_actor: float = typer.Option(RayOptions.gpus_per_actor, "--gpus-per-actor", help="GPUs per actor (0.5: two actors share one)."),
    cpus_per_actor: Optional[float] = typer.Option(RayOptions.cpus_per_actor, "--cpus-per-actor",
                                                   help="CPUs per actor, its torch threads (unset: 1; on a local Ray without GPUs, its CPUs / --actors)."),
    batch_size: int = BatchSizeOpt,
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    strategy: str = StrategyOpt,
    top_k: int = TopKOpt,
    max_span: int = MaxSpanOpt,
    mask_token: str = MaskTokenOpt,
    explain: bool = ExplainOpt,
    choices: Optional[list[str]] = ChoiceOpt,
    choice_score: str = ChoiceScoreOpt,
    device: str = DeviceOpt,
    quantize: str = QuantizeOpt,
    dtype: str = DtypeOpt,
    offline: bool = OfflineOpt,
    resume: bool = typer.Option(False, "--resume", help="Go on after an interrupted run: skip the files complete with these inputs and options, continue the one cut off."),
    max_inputs: int = MaxInputsOpt,
    max_search: int = MaxSearchOpt,
    max_memory_mb: int = MaxMemoryOpt,
    max_answer_mb: int = MaxAnswerOpt,
):
    """Fill every line of many files on Ray (a local one, or a cluster with GPUs).

    Each record is the object `fill --batch --json` writes for that line, plus "file": the
    input's path as given. Output: DIR/NNNNN-NAME.jsonl per input file, in input order.
    Needs the ray extra: pip install 'perceiver-cli[ray]'.

    \b
    Examples:
      perceiver ray-fill corpus/ -o filled/
      perceiver ray-fill 'logs/**/*.txt' -o filled/ --actors 2 --quantize int8
      perceiver ray-fill corpus/ -o filled/ --address HEAD:6379 --actors 8 --gpus-per-actor 1
      perceiver ray-fill corpus/ -o filled/ --resume      # after Ctrl-C or a crash: go on

    Exit status: 0 every line filled, 1 a line failed (or the run failed), 2 bad usage,
    an unreadable input or no Ray installed (before Ray starts), 130 interrupted.
    """
    with failures():
        options = build(FillOptions, ctx)
        load = build(LoadOptions, ctx)
        settings = build(RayOptions, ctx, quiet_ray=not debug())
        budget = build(Budget, ctx)
        settings.check_load(load)
        from . import corpus
        from . import ray_fill as rf
        from .batch import report

        rf.require_ray()
        found = corpus.expand_inputs(inputs, output)
        with corpus.OutputFolder(output) as folder:  # locked: a second run on DIR is exit 2 at once
            folder.plan(found, corpus.run_key(load, options, budget), resume=resume)
            stderr = stderr_console()
            tally = rf.run(found, folder, load, options, settings, stderr=stderr, budget=budget)
        notes = ([f"{len(found)} files in {output}"] if stderr.is_terminal else []) + corpus.already(found)
        report(stderr, tally, f" ({'; '.join(notes)})" if notes else "")
        if tally.failed:
            raise typer.Exit(1)


def _model_fields(found) -> list[tuple[str, str]]:
    """What `download` and `info` say about a resolved model, as (key, value) pairs."""
    weights = found.weights.name + (" (converted from pytorch_model.bin)" if found.converted else "")
    if found.repo_id is None:
        where = [("model", found.model), ("revision", "(local directory)")]
    else:
        where = [("model", found.repo_id), ("revision", found.revision or "main"), ("commit", found.commit)]
    size = f"{found.size / 1e6:.1f} MB ({found.size:,} bytes)"
    return where + [("path", str(found.directory)), ("weights", weights), ("size", size)]


def main():
    """The console script (entry.py): the command, then a quick exit (console.exit_after)."""
    exit_after(app)
