"""The `perceiver` command: parse options, read input, call the library, render results.

torch is imported only by the commands that run the model, so `--help` and
`--version` start fast.
"""

from __future__ import annotations

import json
import os
import sys
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


@app.command()
def fill(
    text: Optional[str] = typer.Argument(None, help="Text with [MASK] / [MASK:N] markers; '-' or nothing reads stdin."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", envvar="PERCEIVER_MODEL", help="Hub repo id or local directory."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    strategy: str = typer.Option("oneshot", "--strategy", help="How spans are filled."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Candidates per span."),
    as_json: bool = typer.Option(False, "--json", help="Write a JSON object instead of text."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    offline: bool = typer.Option(False, "--offline", help="Never use the network."),
):
    """Fill the masked spans of a text.

    \b
    perceiver fill "This is an incomplete sentence where some words are [MASK]."
    perceiver fill --json "words are [MASK:9]"
    """
    from .errors import PerceiverError
    from .filler import MaskFiller

    if text is None or text == "-":
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    try:
        filler = MaskFiller.from_pretrained(model, revision=revision, device=device, offline=offline)
        result = filler.fill(text, strategy=strategy, top_k=top_k)
    except PerceiverError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(top_k if top_k > 1 else 0), ensure_ascii=False) + "\n")
    else:
        sys.stdout.buffer.write(result.data + b"\n")


def main():
    app()
