"""The `perceiver` command: parse options, read input, call the library, render results.

torch is imported only by the commands that run the model, so `--help` and
`--version` start fast. Results go to stdout; everything else to stderr.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
import typer.core

from . import __version__

DEFAULT_MODEL = "deepmind/language-perceiver"

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
        except typer.Abort:
            _error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
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


# Options shared by the commands that load a model.
ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", envvar="PERCEIVER_MODEL", help="Hub repo id or local checkpoint directory.")
RevisionOpt = typer.Option(None, "--revision", help="Hub branch, tag or commit.")
OfflineOpt = typer.Option(False, "--offline", help="Never use the network: the cache or a local directory only.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")


# -- fill ------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda", "mps")
EXIT_INTERRUPTED = 130  # what a shell reports after Ctrl-C
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by a closed pipe (SIGPIPE)


def _stderr_console():
    """Diagnostics, progress and errors: a rich console on stderr."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    """Results on a terminal. `is_terminal` also honours FORCE_COLOR / TTY_COMPATIBLE."""
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False)


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
    """Map failures to DESIGN.md's exit codes and one-line errors on stderr.

    `PerceiverError` (its `.exit_code`: 2 bad input, 1 runtime), anything unexpected 1,
    Ctrl-C 130, a closed stdout pipe 141 and silent. `PERCEIVER_DEBUG=1` re-raises
    (full traceback) instead of the one-line error.
    """
    from .errors import PerceiverError

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
        _error(str(e))
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


def _check_options(*, text, top_k, max_span, device, threads, batch, batch_size, output, resume, explain, as_json) -> None:
    """Option errors, before anything is read or loaded (`InputError`: exit 2)."""
    from .errors import InputError

    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cpus:  # more only slows down; far more crashes OpenMP
        raise InputError(f"--threads must be between 1 and {cpus}, this machine's CPUs (got {threads})")
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1 (got {top_k})")
    if max_span < 1:
        raise InputError(f"--max-span must be at least 1 byte (got {max_span})")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    name = device.lower()
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or mps")
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


def _load_filler(model: str, options: dict, **load):
    """The model (`load`: from_pretrained's options), with the fill options checked by the
    library (an unknown --strategy, a --max-span longer than the model's window: exit 2)
    before any input is filled. A download shows its progress when stderr is a terminal."""
    with _startup():
        from .filler import MaskFiller

        filler = MaskFiller.from_pretrained(model, progress=_stderr_console().is_terminal, **load)
    filler.fill_many([], **options)
    return filler


@contextmanager
def _startup():
    """Importing torch and loading the model make ~165k objects that live as long as the
    process; Python's cyclic garbage collector would scan them again and again while they
    are made (~0.15-0.3 s of a cold run). So it is off meanwhile; afterwards they are frozen
    (never scanned again) and it is back on for the fills."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _write_stdout(data: bytes) -> None:
    """Raw bytes on stdout, flushed now (a closed pipe raises here, not at exit)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _write_document(result, *, as_json: bool, top_k: int, explain: bool, from_stdin: bool) -> None:
    """Piped: the filled bytes exactly (the argument form adds a newline, like echo).
    On a terminal: the fills highlighted by confidence, then the tables asked for."""
    from . import render

    out = _stdout_console()
    if as_json:
        line = json.dumps(render.json_object(result, top_k, explain), ensure_ascii=False)
        if out.is_terminal:
            out.print_json(line, indent=None)  # the same one line, with colour
        else:
            _write_stdout(line.encode("utf-8") + b"\n")
        return
    if not out.is_terminal:
        _write_stdout(result.data if from_stdin else result.data + b"\n")
        if top_k > 1 or explain:
            _say("note: --top-k and --explain tables are drawn on a terminal only; in a pipe use --json", "dim")
        return
    render.document(result, out)
    render.legend(out)
    if top_k > 1:
        render.candidates(result, out, top_k)
    if explain:
        render.explain(result, out)


def _complete_device(incomplete: str):
    return [d for d in DEVICES if d.startswith(incomplete)]


@app.command()
def fill(
    ctx: typer.Context,
    text: Optional[str] = typer.Argument(None, help="Text with [MASK] / [MASK:N] markers; '-' or nothing reads stdin."),
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    strategy: Optional[str] = typer.Option(None, "--strategy", help="How spans are filled: iterative (the default), beam, or oneshot (one pass: exactly the reference's argmax)."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Candidates per span (a table on a terminal; 'candidates' in --json)."),
    max_span: int = typer.Option(16, "--max-span", help="Longest span [MASK] may choose, in bytes."),
    mask_token: str = typer.Option("[MASK]", "--mask-token", help="The marker literal."),
    as_json: bool = typer.Option(False, "--json", help="Write JSON (JSON Lines with --batch)."),
    explain: bool = typer.Option(False, "--explain", help="Show each masked byte's top candidates."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.", autocompletion=_complete_device),
    quantize: str = typer.Option("none", "--quantize", help="int8: faster CPU matrix products, fills close to fp32's (none: exact)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float16 on CUDA, else float32: exact), float32, bfloat16 or float16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch's CPU threads (default: all cores)."),
    offline: bool = OfflineOpt,
    batch: Optional[str] = typer.Option(None, "--batch", help="Fill each line of FILE ('-' = stdin) independently."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="With --batch: write to FILE instead of stdout."),
    resume: bool = typer.Option(False, "--resume", help="With --batch -o FILE: skip lines already written."),
):
    """Fill the masked spans of a text.

    [MASK] lets the model choose the span's length (up to --max-span bytes); [MASK:N]
    masks exactly N bytes. A marker right after a space takes that space into its span.

    \b
    Examples:
      perceiver fill "This is an incomplete sentence where some words are [MASK]."
      perceiver fill -k 5 "The capital of France is[MASK:6]."
      perceiver fill --explain "some words are [MASK:9]"
      perceiver fill --json "some words are [MASK:9]" | jq -r .text
      cat draft.txt | perceiver fill > filled.txt
      perceiver fill --batch sentences.txt --json -o filled.jsonl
      perceiver fill --batch sentences.txt --json -o filled.jsonl --resume

    Exit status: 0 filled, 2 bad input or usage, 1 runtime failure (the model could not
    be loaded, or a --batch line failed), 130 interrupted.
    """
    with _failures():
        _check_options(text=text, top_k=top_k, max_span=max_span, device=device, threads=threads, batch=batch,
                       batch_size=batch_size, output=output, resume=resume, explain=explain, as_json=as_json)
        options = dict(top_k=top_k, max_span=max_span, mask_token=mask_token)
        if strategy is not None:  # else the library's default (strategies.DEFAULT_STRATEGY)
            options["strategy"] = strategy
        load = dict(revision=revision, device=device, offline=offline, batch_size=batch_size, quantize=quantize, threads=threads,
                    dtype=dtype)
        if batch is not None:
            from . import batch as batch_mode

            source = batch_mode.open_input(batch, output)  # an unreadable FILE fails before the model loads
            filler = _load_filler(model, options, **load)
            failed = batch_mode.run(
                filler, source, output=output, resume=resume, as_json=as_json, explain=explain,
                chunk=batch_size * batch_mode.CHUNK_BATCHES, options=options,
                stderr=_stderr_console(), stdout_is_terminal=_stdout_console().is_terminal,
            )
            if failed:
                raise typer.Exit(1)
            return
        document, from_stdin = _read_document(ctx, text)
        if not document:
            from .errors import InputError

            raise InputError("empty input: nothing to fill (a text with [MASK] or [MASK:N] markers is needed)")
        from .masks import parse

        parse(document, mask_token)  # a missing or malformed marker fails here, before torch loads
        filler = _load_filler(model, options, **load)
        result = filler.fill(document, **options)
        _write_document(result, as_json=as_json, top_k=top_k, explain=explain, from_stdin=from_stdin)


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
        found = resolve(model, revision, update=True, progress=sys.stderr.isatty())
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

        where = pick_device(device)  # what `fill --device` would use, and its default --dtype
        found = resolve(model, revision, offline=offline, progress=sys.stderr.isatty())
        parameters = sum(p.numel() for p in load_model(found.directory).parameters())  # memory-mapped: cheap
        dtype = str(pick_dtype(None, where)).removeprefix("torch.")
        _print_fields(_model_fields(found) + [("parameters", f"{parameters:,}"), ("device", str(where)), ("dtype", dtype)])


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
    sys.stdout.write("".join(f"{key + ':':<{width}}{value}\n" for key, value in fields))


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
        sys.stdout.flush()
    except BrokenPipeError:  # a closed pipe found only now: quiet, as in _failures
        code = code or EXIT_BROKEN_PIPE
    except (OSError, ValueError):
        code = code or 1
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)
