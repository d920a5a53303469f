"""The `perceiver` command: parse options, read input, call the library, render results.

torch is imported only by the commands that run the model, so `--help` and
`--version` start fast. Results go to stdout; everything else to stderr.
"""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
import typer.core

from . import __version__, runtime
from .options import DEVICES, DTYPES, LOG_FORMATS, QUANTIZE, STRATEGIES, FillOptions, LoadOptions, RayOptions

# click's exception classes, whichever click this Typer uses (its own copy or click itself)
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option or command, a bad option value, an extra argument)
    as one line on stderr and exit 2, like every other bad input, where Typer would draw
    the usage and a box:

        error: No such option: --bogus (see 'perceiver fill --help')
    """

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # `perceiver` alone: the help
            else:
                ctx = getattr(e, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                _error(" ".join(e.format_message().split()) + hint)
            sys.exit(e.exit_code)
        except typer.Abort:  # click's word for Ctrl-C while it parses: as any interrupt
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
):
    """Fill masked text with DeepMind's byte-level Perceiver IO language model."""


def _completer(values):
    return lambda incomplete: [v for v in values if v.startswith(incomplete.lower())]


# Options shared by the commands that load a model; defaults from options.LoadOptions.
ModelOpt = typer.Option(LoadOptions.model, "--model", "-m", envvar="PERCEIVER_MODEL", help="Hub repo id or local checkpoint directory.")
RevisionOpt = typer.Option(LoadOptions.revision, "--revision", help="Hub branch, tag or commit.")
OfflineOpt = typer.Option(LoadOptions.offline, "--offline", help="Never use the network: the cache or a local directory only.")
DeviceOpt = typer.Option(LoadOptions.device, "--device", help="auto, cpu, cuda (cuda:N) or mps.", autocompletion=_completer(DEVICES))
DtypeOpt = typer.Option(LoadOptions.dtype, "--dtype", help="auto (float16 on CUDA, else float32: exact), float32, bfloat16 or float16.",
                        autocompletion=_completer(DTYPES))
QuantizeOpt = typer.Option(LoadOptions.quantize, "--quantize", help="int8: faster CPU matrix products, fills close to fp32's (none: exact).",
                           autocompletion=_completer(QUANTIZE))
ThreadsOpt = typer.Option(LoadOptions.threads, "--threads", help="torch's CPU threads (default: the CPUs this process may use).")


# -- fill ------------------------------------------------------------------------------

EXIT_INTERRUPTED = 130  # what a shell reports after Ctrl-C
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by a closed pipe (SIGPIPE)


def _stderr_console():
    """Diagnostics, progress and errors: a rich console on stderr, best effort (`_Diagnostics`)."""
    from rich.console import Console

    return Console(file=_Diagnostics(), highlight=False, **_width())


def _stdout_console():
    """Results on a terminal. `is_terminal` also honours FORCE_COLOR / TTY_COMPATIBLE."""
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, **_width())


def _width() -> dict:
    """rich takes COLUMNS as the width, and at `COLUMNS=0` prints nothing at all: then 80."""
    columns = os.environ.get("COLUMNS", "").strip()
    return {"width": 80} if columns.isdigit() and int(columns) < 1 else {}


class _Diagnostics:
    """stderr for messages about the work: one that cannot be written (stderr on a full
    disk, or closed) is dropped, and never stops the work it reports on (a batch run
    goes on writing its results, and exits with the code it would have had). It writes to
    `sys.stderr` as it is at each write (ray-fill points it elsewhere while Ray runs)."""

    @property
    def stream(self):
        # under a live progress bar sys.stderr is rich's proxy that writes to this console: what is behind it
        return getattr(sys.stderr, "rich_proxied_file", sys.stderr)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError, AttributeError):
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"


def _say(message: str, style: str = "") -> None:
    """One line on stderr, never wrapped (colour only on a terminal, none with NO_COLOR)."""
    from rich.text import Text

    _stderr_console().print(Text(message, style=style), soft_wrap=True, markup=False, emoji=False)


def _error(message: str) -> None:
    from rich.text import Text

    _stderr_console().print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, markup=False, emoji=False)


def _debug() -> bool:
    return os.environ.get("PERCEIVER_DEBUG", "") not in ("", "0")


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the final flush at exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


@contextmanager
def _failures():
    """Map failures to the exit codes of README.md (Exit status and errors) and one-line errors on stderr.

    `PerceiverError` (its `.exit_code`: 2 bad input, 1 runtime), anything unexpected 1,
    Ctrl-C 130, a closed stdout pipe 141 and silent. `PERCEIVER_DEBUG=1` re-raises
    (full traceback) instead of the one-line error.
    """
    from .errors import PerceiverError
    from .options import OptionError

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(EXIT_BROKEN_PIPE)
    except PerceiverError as e:
        if _debug():
            raise
        _error(e.flag() if isinstance(e, OptionError) else str(e))
        raise typer.Exit(e.exit_code)
    except OSError as e:  # e.g. the disk is full, or a file vanished while we read it
        if _debug():
            raise
        _error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        raise typer.Exit(1)
    except Exception as e:
        if _debug():
            raise
        _error(f"{type(e).__name__}: {e} (set PERCEIVER_DEBUG=1 for the traceback)")
        raise typer.Exit(1)


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


def _read_document(ctx: typer.Context, text: Optional[str]) -> tuple[str, bool]:
    """(the document, whether it came from stdin). Stdin is read whole, as bytes, and
    decoded with surrogateescape: bytes that are not UTF-8 survive unchanged."""
    from .errors import InputError

    if text is not None and text != "-":
        return text, False
    if sys.stdin is None:
        raise InputError("no TEXT and no stdin to read a document from")
    if text is None and sys.stdin.isatty():
        # Nothing given and nothing piped: show how to call us instead of waiting for input.
        typer.echo(ctx.get_usage(), err=True)
        typer.echo(f"Try '{ctx.command_path} --help' for help.", err=True)
        raise InputError("no text: give TEXT, '-' to type it on stdin, or pipe a document in")
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), True


def _load_filler(load: LoadOptions, fill_options: FillOptions | None = None):
    """The model, with the fill options checked against it (a --max-span longer than the
    model's window: exit 2) before any input is filled. A download shows its progress
    when stderr is a terminal; the library's notes (e.g. an int8 cache that could not be
    written) go to stderr, dimmed."""
    with _startup():
        from .filler import MaskFiller

        filler = MaskFiller.from_pretrained(load, progress=_stderr_console().is_terminal)
        runtime.apply_threads(runtime.import_torch(), load.threads)  # the process's, not the library's to set
    if fill_options is not None:
        filler.check(fill_options)
    for note in filler.notes:
        _say(f"note: {note}", "dim")
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


def _check_stdout() -> None:
    """Fail early, in one line, when stdout was closed (`>&-`): nowhere to write results."""
    from .errors import PerceiverError

    if sys.stdout is None:
        raise PerceiverError("standard output is closed: nowhere to write the results")


def _write_stdout(data: bytes) -> None:
    """Raw bytes on stdout, all of them, now. A pipe closed early makes a write come back
    short rather than fail, so write until every byte is taken: the next write then
    raises BrokenPipeError (exit 141) instead of the rest being lost in silence."""
    _check_stdout()
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (e.g. an in-memory stream in tests)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_document(result, options: FillOptions, *, as_json: bool, from_stdin: bool) -> None:
    """Piped: the filled bytes exactly (the argument form adds a newline, like echo).
    On a terminal: the fills highlighted by confidence, then the tables asked for."""
    from . import render

    top_k, explain = options.top_k, options.explain
    out = _stdout_console()
    if as_json:
        from .results import json_line

        line = json_line(result.to_dict(top_k, explain))
        if out.is_terminal:
            out.print_json(line.decode("utf-8"), indent=None)  # the same one line, with colour
        else:
            _write_stdout(line)
        return
    if not out.is_terminal:
        _write_stdout(result.data if from_stdin else result.data + b"\n")
        if top_k > 1 or explain:
            _say("note: --top-k and --explain tables are drawn on a terminal only; in a pipe use --json", "dim")
        return
    render.document(result, out)
    render.legend(out)
    if top_k > 1:
        out.print()
        render.candidates(result, out, top_k)
    if explain:
        out.print()
        render.explain(result, out)


@app.command()
def fill(
    ctx: typer.Context,
    text: Optional[str] = typer.Argument(None, help="Text with [MASK] / [MASK:N] markers; '-' or nothing reads stdin."),
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    strategy: str = typer.Option(FillOptions.strategy, "--strategy", help="How spans are filled: iterative, beam, or oneshot (one pass: exactly the reference's argmax).",
                                 autocompletion=_completer(STRATEGIES)),
    top_k: int = typer.Option(FillOptions.top_k, "--top-k", "-k", help="Candidates per span, at most 256 (a table on a terminal; 'candidates' in --json)."),
    max_span: int = typer.Option(FillOptions.max_span, "--max-span", help="Longest span [MASK] may choose, in bytes."),
    mask_token: str = typer.Option(FillOptions.mask_token, "--mask-token", help="The marker literal."),
    as_json: bool = typer.Option(False, "--json", help="Write JSON (JSON Lines with --batch)."),
    explain: bool = typer.Option(FillOptions.explain, "--explain", help="Show each masked byte's top candidates."),
    choice: Optional[list[str]] = typer.Option(None, "--choice", metavar="WORD", help="Fill every [MASK] with the best of these words (repeat --choice; any lengths). -k N shows the N best, --json lists them all with their scores."),
    device: str = DeviceOpt,
    quantize: str = QuantizeOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    offline: bool = OfflineOpt,
    batch: Optional[str] = typer.Option(None, "--batch", help="Fill each line of FILE ('-' = stdin) independently."),
    batch_size: int = typer.Option(LoadOptions.batch_size, "--batch-size", help="Texts per forward pass (1-256)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="With --batch: write to FILE instead of stdout."),
    resume: bool = typer.Option(False, "--resume", help="With --batch -o FILE: skip lines already written."),
    server: Optional[str] = typer.Option(None, "--server", envvar="PERCEIVER_SERVER", help="Fill through a running `perceiver serve` at URL (its model and device; no torch loaded here)."),
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
    with _failures():
        _check_modes(text=text, batch=batch, output=output, resume=resume, explain=explain, top_k=top_k, as_json=as_json)
        options = FillOptions(strategy=strategy, top_k=top_k, max_span=max_span, mask_token=mask_token, explain=explain,
                              choices=tuple(choice or ()), single_line=batch is not None and not as_json)
        load = LoadOptions(model=model, revision=revision, device=device, dtype=dtype, quantize=quantize, threads=threads,
                           offline=offline, batch_size=batch_size)
        if batch is not None:
            from . import batch as batch_mode

            source = batch_mode.open_input(batch, output)  # an unreadable FILE fails before the model loads
            out = batch_mode.Output(output, resume=resume, as_json=as_json)  # locked before the model loads
            try:
                filler = _filler(ctx, server, load, options)
                failed = batch_mode.run(
                    lambda texts, o: filler.fill_many(texts, o, return_errors=True), source, out, options,
                    as_json=as_json, chunk=load.batch_size * batch_mode.CHUNK_BATCHES,
                    stderr=_stderr_console(), stdout_is_terminal=_stdout_console().is_terminal,
                )
            finally:
                out.close()
            if failed:
                raise typer.Exit(1)
            return
        _check_stdout()
        document, from_stdin = _read_document(ctx, text)
        if not document:
            from .errors import InputError

            raise InputError("empty input: nothing to fill (a text with [MASK] or [MASK:N] markers is needed)")
        from .masks import parse

        parse(document, options.mask_token)  # a missing or malformed marker fails here, before torch loads
        filler = _filler(ctx, server, load, options)
        result = filler.fill(document, options)
        _write_document(result, options, as_json=as_json, from_stdin=from_stdin)


def _filler(ctx: typer.Context, server: Optional[str], load: LoadOptions, options: FillOptions):
    """What fills: the model loaded here, or with --server URL (or $PERCEIVER_SERVER) a
    `perceiver serve` (client.py: never imports torch). Either one takes
    `fill(text, options)` and `fill_many(texts, options, return_errors=True)`."""
    from .client import server_url

    url = server_url(server, {})
    if url is None:
        return _load_filler(load, options)
    from .client import Client

    def named(option: str) -> bool:  # given on the command line or by its environment variable
        return getattr(ctx.get_parameter_source(option), "name", "") in ("COMMANDLINE", "ENVIRONMENT")

    client = Client.from_environment(url)
    client.check_model(load.model if named("model") else None, load.revision if named("revision") else None)
    client.check(options)  # the server's model judges the options, as a loaded one would (--max-span)
    return client


@app.command()
def serve(
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: str = QuantizeOpt,
    threads: Optional[int] = ThreadsOpt,
    offline: bool = OfflineOpt,
    batch_size: int = typer.Option(LoadOptions.batch_size, "--batch-size", help="Texts per forward pass (1-256)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on [default: 127.0.0.1, this machine only; 0.0.0.0 for every interface]."),
    port: Optional[int] = typer.Option(None, "--port", help="Port [default: 8000; 0: any free port]."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Most texts of waiting requests run together [default: 16]."),
    batch_wait_ms: Optional[float] = typer.Option(None, "--batch-wait-ms", help="How long to wait for more requests before a batch runs [default: 5]."),
    queue_size: Optional[int] = typer.Option(None, "--queue-size", help="Most requests waiting; beyond, 503 [default: 64]."),
    max_body_mb: Optional[float] = typer.Option(None, "--max-body-mb", help="Largest request body, in MiB; beyond, 413 [default: 4]."),
    max_inputs: Optional[int] = typer.Option(None, "--max-inputs", help="Most model inputs (a window of a text in one pass) one request may take; beyond, 400 [default: 10000]."),
    body_timeout_s: Optional[float] = typer.Option(None, "--body-timeout-s", help="Seconds a client has to send its request body; then 408 [default: 60]."),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", help="Require `Authorization: Bearer KEY`, KEY the file's first line (or set PERCEIVER_API_KEY)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="One line per request on stderr."),
    log_format: str = typer.Option("text", "--log-format", help=f"The access log's lines: {' or '.join(LOG_FORMATS)} (one object a line)."),
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
    with _failures():
        load = LoadOptions(model=model, revision=revision, device=device, dtype=dtype, quantize=quantize, threads=threads,
                           offline=offline, batch_size=batch_size)
        from .options import ServeOptions, read_api_key

        given = dict(host=host, port=port, max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue_size=queue_size,
                     max_body_mb=max_body_mb, max_inputs=max_inputs, body_timeout_s=body_timeout_s,
                     access_log=access_log, log_format=log_format, cors_origins=cors_origins or None)
        settings = ServeOptions(**{k: v for k, v in given.items() if v is not None},
                                api_key=read_api_key(api_key_file, os.environ))
        filler = _load_filler(load)
        from .serve import describe, run

        about = describe(filler, settings)

        def announce(url: str) -> None:
            quantized = ", int8" if about["quantize"] == "int8" else ""
            _say(f"serving {about['model']} on {url} ({about['device']}, {about['dtype']}{quantized}; "
                 f"{'API key required' if settings.api_key else 'no API key'}); Ctrl-C stops")
            if not settings.loopback and not settings.api_key:
                _say(f"warning: --host {settings.host} takes requests from other machines, and no API key is set "
                     "(PERCEIVER_API_KEY or --api-key-file)", "yellow")

        def log(line: str) -> None:  # best effort: a stderr that cannot be written never stops the server
            try:
                sys.stderr.write(line + "\n")
            except (OSError, ValueError):
                pass

        run(filler, settings, announce=announce, log=log)


@app.command()
def download(
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
):
    """Fetch a model ahead of time and print where it lives and its size.

    \b
    perceiver download
    perceiver download --model deepmind/language-perceiver --revision main
    """
    from .hub import resolve

    with _failures():  # asks the Hub for the revision's latest commit; the cache if it cannot be reached
        load = LoadOptions(model=model, revision=revision)
        _check_stdout()
        found = resolve(load.model, load.revision, update=True, progress=sys.stderr.isatty())
        if found.repo_id is None:  # a local directory, not fetched: checked as `info` and `fill` load it
            from .checkpoint import load_model

            load_model(found.directory)
        _print_fields(_model_fields(found))


@app.command()
def info(
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

    with _failures(), _startup():
        from .checkpoint import load_model
        from .filler import pick_device, pick_dtype

        load = LoadOptions(model=model, revision=revision, offline=offline, device=device)
        _check_stdout()
        where = pick_device(load.device)  # what `fill --device` would use, and its default --dtype
        found = resolve(load.model, load.revision, offline=load.offline, progress=sys.stderr.isatty())
        parameters = sum(p.numel() for p in load_model(found.directory).parameters())  # memory-mapped: cheap
        dtype = str(pick_dtype(load.dtype, where)).removeprefix("torch.")
        _print_fields(_model_fields(found) + [("parameters", f"{parameters:,}"), ("device", str(where)), ("dtype", dtype)])


@app.command("ray-fill")
def ray_fill(
    inputs: list[str] = typer.Argument(..., metavar="INPUT", help="Text files, directories (their files, recursively) or glob patterns; each line one example, as fill --batch."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the results: one JSON Lines file per input file."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="A running Ray cluster (HOST:6379, or auto; `ray job submit` sets RAY_ADDRESS) [default: start a local Ray for this run]."),
    actors: int = typer.Option(1, "--actors", help="Model copies running at once (Ray actors), each loading the model once."),
    gpus_per_actor: float = typer.Option(0, "--gpus-per-actor", help="GPUs per actor (0.5: two actors share one)."),
    cpus_per_actor: Optional[float] = typer.Option(None, "--cpus-per-actor", help="CPUs per actor, its torch threads [default: 1; on a local Ray without GPUs, its CPUs / --actors]."),
    batch_size: int = typer.Option(LoadOptions.batch_size, "--batch-size", help="Texts per forward pass (1-256); each actor call fills 4x as many lines."),
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    strategy: str = typer.Option(FillOptions.strategy, "--strategy", help="iterative, beam, or oneshot (as fill).", autocompletion=_completer(STRATEGIES)),
    top_k: int = typer.Option(FillOptions.top_k, "--top-k", "-k", help="Candidates per span ('candidates' in each record)."),
    max_span: int = typer.Option(FillOptions.max_span, "--max-span", help="Longest span [MASK] may choose, in bytes."),
    mask_token: str = typer.Option(FillOptions.mask_token, "--mask-token", help="The marker literal."),
    explain: bool = typer.Option(FillOptions.explain, "--explain", help="Each span's per-byte alternatives ('alternatives' in each record)."),
    device: str = DeviceOpt,
    quantize: str = QuantizeOpt,
    dtype: str = DtypeOpt,
    offline: bool = OfflineOpt,
    choice: Optional[list[str]] = typer.Option(None, "--choice", metavar="WORD", help="Fill every [MASK] with the best of these words (repeat --choice; any lengths); each record lists them all with their scores."),
    resume: bool = typer.Option(False, "--resume", help="Go on after an interrupted run: skip the files complete with these inputs and options, continue the one cut off."),
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
    with _failures():
        options = FillOptions(strategy=strategy, top_k=top_k, max_span=max_span, mask_token=mask_token, explain=explain,
                              choices=tuple(choice or ()))
        load = LoadOptions(model=model, revision=revision, device=device, dtype=dtype, quantize=quantize,
                           offline=offline, batch_size=batch_size)
        settings = RayOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor,
                              cpus_per_actor=cpus_per_actor, quiet_ray=not _debug())
        settings.check_load(load)
        from . import corpus
        from . import ray_fill as rf
        from .batch import report

        rf.require_ray()
        found = corpus.expand_inputs(inputs, output)
        with corpus.OutputFolder(output) as folder:  # locked: a second run on DIR is exit 2 at once
            folder.plan(found, corpus.run_key(load, options), resume=resume)
            stderr = _stderr_console()
            tally = rf.run(found, folder, load, options, settings, stderr=stderr)
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


def _print_fields(fields: list[tuple[str, str]]) -> None:
    """`key: value` lines on stdout, values aligned: easy to read and to grep."""
    width = max(len(key) for key, _ in fields) + 2
    _write_stdout("".join(f"{key + ':':<{width}}{value}\n" for key, value in fields).encode("utf-8", "surrogateescape"))


def main():
    """The console script: run the command, then exit without tearing the interpreter down.

    Once torch is imported, Python's own shutdown (freeing thousands of module objects)
    costs ~0.4 s after the answer is already written: a cold `perceiver fill` is ~15%
    faster without it. So when torch is loaded we do what a normal exit does that
    matters (atexit handlers, flushed stdout and stderr) and leave with os._exit.
    """
    try:
        app()
        code = 0
    except KeyboardInterrupt:  # before or after a command's own handling
        code = EXIT_INTERRUPTED
    except SystemExit as e:
        code = e.code
        if code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            code = EXIT_BROKEN_PIPE  # Typer's own closed-pipe exit (e.g. `--help | head -1`), as ours
    if "torch" not in sys.modules:
        sys.exit(code)  # --help, --version, usage errors: the ordinary exit
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): what Python itself would do
        print(code, file=sys.stderr)
        code = 1
    import atexit

    atexit._run_exitfuncs()
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:  # a closed pipe found only now: quiet, as in _failures
        code = code or EXIT_BROKEN_PIPE
    except (OSError, ValueError):
        code = code or 1
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)
