"""The command line's streams and process: where input comes from, where results and
messages go, and how a command ends.

- `read_document(ctx, text)`: TEXT, or stdin read whole as bytes (never waiting silently
  on a terminal); `stdout_console()` draws results on a terminal, `write_stdout(data)`
  writes raw result bytes, all of them (a closed pipe: BrokenPipeError, exit 141),
  `print_fields` writes `key: value` lines; `check_stdout()` fails early without stdout.
- `stderr_console()`, `say(message)` and `error(message)`: diagnostics, progress and
  one-line errors on stderr, best effort (`Diagnostics`: a stderr that cannot be written
  never stops the work it reports on).
- `failures()`: the one map from exceptions to README's exit codes and one-line errors
  (`PERCEIVER_DEBUG=1`: the traceback instead); `OneLineErrors`: Typer's usage errors as
  one line too; `exit_after(app)`: the console script's quick exit once torch is loaded.
- `Command`: help that shows an argument by its metavar (`INPUT...`), not its Python type.

This module is the CLI's own (cli.py and nothing below it): the library never prints.
It imports no torch, and no module of the package at import time (`errors` and `options`
when a failure is mapped), so `--help` and the server's client start fast.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import contextmanager

import typer
import typer.core

EXIT_INTERRUPTED = 130  # what a shell reports after Ctrl-C
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by a closed pipe (SIGPIPE)


def stderr_console():
    """Diagnostics, progress and errors: a rich console on stderr, best effort (`Diagnostics`)."""
    from rich.console import Console

    return Console(file=Diagnostics(), highlight=False, **_width())


def stdout_console():
    """Results on a terminal. `is_terminal` also honours FORCE_COLOR / TTY_COMPATIBLE."""
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, **_width())


def _width() -> dict:
    """rich takes COLUMNS as the width, and at `COLUMNS=0` prints nothing at all: then 80."""
    columns = os.environ.get("COLUMNS", "").strip()
    return {"width": 80} if columns.isdigit() and int(columns) < 1 else {}


class Diagnostics:
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


def say(message: str, style: str = "") -> None:
    """One line on stderr, never wrapped (colour only on a terminal, none with NO_COLOR)."""
    from rich.text import Text

    stderr_console().print(Text(message, style=style), soft_wrap=True, markup=False, emoji=False)


def error(message: str) -> None:
    """`error: message`, one line on stderr."""
    from rich.text import Text

    stderr_console().print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, markup=False, emoji=False)


def debug() -> bool:
    return os.environ.get("PERCEIVER_DEBUG", "") not in ("", "0")


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the final flush at exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


@contextmanager
def failures():
    """Map failures to the exit codes of README.md (Exit status and errors) and one-line errors on stderr.

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
        if debug():
            raise
        error(e.flag())  # in the command line's words: `--top-k ...` where the library says `top_k ...`
        raise typer.Exit(e.exit_code)
    except OSError as e:  # e.g. the disk is full, or a file vanished while we read it
        if debug():
            raise
        error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        raise typer.Exit(1)
    except Exception as e:
        if debug():
            raise
        error(f"{type(e).__name__}: {e} (set PERCEIVER_DEBUG=1 for the traceback)")
        raise typer.Exit(1)


def check_stdout() -> None:
    """Fail early, in one line, when stdout was closed (`>&-`): nowhere to write results."""
    from .errors import PerceiverError

    if sys.stdout is None:
        raise PerceiverError("standard output is closed: nowhere to write the results")


def write_stdout(data: bytes) -> None:
    """Raw bytes on stdout, all of them, now. A pipe closed early makes a write come back
    short rather than fail, so write until every byte is taken: the next write then
    raises BrokenPipeError (exit 141) instead of the rest being lost in silence."""
    check_stdout()
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


def read_document(ctx: typer.Context, text: str | None) -> tuple[str, bool]:
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
    if sys.stdin.isatty():  # `perceiver fill -` typed in: say how it ends rather than wait in silence
        say("reading the text from the terminal until Ctrl-D (an empty line does not end it)", "dim")
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), True


def print_fields(fields: list[tuple[str, str]]) -> None:
    """`key: value` lines on stdout, values aligned: easy to read and to grep."""
    width = max(len(key) for key, _ in fields) + 2
    write_stdout("".join(f"{key + ':':<{width}}{value}\n" for key, value in fields).encode("utf-8", "surrogateescape"))


# -- the command line's own Typer: one-line usage errors, arguments by their metavar ----------

# click's exception classes, whichever click this Typer uses (its own copy or click itself)
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(typer.core.TyperGroup):
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
                error(" ".join(e.format_message().split()) + hint)
            sys.exit(e.exit_code)
        except typer.Abort:  # click's word for Ctrl-C while it parses: as any interrupt
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


class Argument(typer.core.TyperArgument):
    """An argument shown in help by its metavar alone (`INPUT...`), as click shows one:
    Typer adds its Python type (`INPUT <list[str]>`), which tells a user nothing."""

    def display_type_rich(self, ctx) -> None:
        return None

    def _rich_display_name(self) -> str:
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


class Command(typer.core.TyperCommand):
    """A command whose arguments are `Argument`s."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is typer.core.TyperArgument:
                param.__class__ = Argument


def exit_after(app) -> None:
    """Run the console script's `app`, then exit without tearing the interpreter down.

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
    atexit._run_exitfuncs()
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:  # a closed pipe found only now: quiet, as in failures()
        code = code or EXIT_BROKEN_PIPE
    except (OSError, ValueError):
        code = code or 1
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)
