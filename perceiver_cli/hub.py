"""Resolve `--model` to a local checkpoint directory: a directory as is, or a Hub repo id."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


def resolve_model(model: str, revision: str | None = None, offline: bool = False) -> Path:
    """A local checkpoint directory for `model` (a directory, or a Hub repo id)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    raise CheckpointError(f"model {model!r} is not a local directory (Hub download is not implemented yet)")
