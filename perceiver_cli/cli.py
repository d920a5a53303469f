"""The `perceiver` command: parse options, read input, call the library, render results.

torch is imported only by the commands that run the model, so `--help` and
`--version` start fast. Results go to stdout; everything else to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__

DEFAULT_MODEL = "deepmind/language-perceiver"

app = typer.Typer(
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


@app.command()
def fill(
    text: Optional[str] = typer.Argument(None, help="Text with [MASK] / [MASK:N] markers; '-' or nothing reads stdin."),
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    strategy: str = typer.Option("oneshot", "--strategy", help="How spans are filled."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Candidates per span."),
    max_span: int = typer.Option(16, "--max-span", help="Longest span [MASK] may choose, in bytes."),
    mask_token: str = typer.Option("[MASK]", "--mask-token", help="The marker literal."),
    as_json: bool = typer.Option(False, "--json", help="Write JSON (JSON Lines with --batch)."),
    explain: bool = typer.Option(False, "--explain", help="Show each masked byte's top candidates."),
    device: str = DeviceOpt,
    offline: bool = OfflineOpt,
    batch: Optional[str] = typer.Option(None, "--batch", help="Fill each line of FILE ('-' = stdin) independently."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="With --batch: write to FILE instead of stdout."),
    resume: bool = typer.Option(False, "--resume", help="With --batch -o FILE: skip lines already written."),
):
    """Fill the masked spans of a text.

    \b
    perceiver fill "This is an incomplete sentence where some words are [MASK]."
    perceiver fill --json "words are [MASK:9]"
    cat draft.txt | perceiver fill
    perceiver fill --batch sentences.txt --json
    """
    from .errors import PerceiverError
    from .filler import MaskFiller

    if text is None or text == "-":
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    try:
        filler = MaskFiller.from_pretrained(model, revision=revision, device=device, offline=offline)
        result = filler.fill(text, strategy=strategy, top_k=top_k, max_span=max_span, mask_token=mask_token)
    except PerceiverError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(top_k if top_k > 1 else 0), ensure_ascii=False) + "\n")
    else:
        sys.stdout.buffer.write(result.data + b"\n")


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
    from .errors import PerceiverError
    from .hub import resolve

    try:  # asks the Hub for the revision's latest commit; the cache if it cannot be reached
        found = resolve(model, revision, update=True, progress=sys.stderr.isatty())
    except PerceiverError as e:
        if os.environ.get("PERCEIVER_DEBUG", "") not in ("", "0"):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    _print_fields(_model_fields(found))


@app.command()
def info(
    model: str = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    offline: bool = OfflineOpt,
    device: str = DeviceOpt,
):
    """Show the resolved model, revision, cache path, size, parameter count and device.

    \b
    perceiver info
    perceiver info --model ./my-checkpoint
    """
    from .errors import PerceiverError
    from .hub import resolve

    try:
        from .checkpoint import load_model
        from .filler import pick_device

        where = pick_device(device)  # what `fill --device` would use
        found = resolve(model, revision, offline=offline, progress=sys.stderr.isatty())
        parameters = sum(p.numel() for p in load_model(found.directory).parameters())  # memory-mapped: cheap
    except PerceiverError as e:
        if os.environ.get("PERCEIVER_DEBUG", "") not in ("", "0"):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    _print_fields(_model_fields(found) + [("parameters", f"{parameters:,}"), ("device", str(where))])


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
    app()
