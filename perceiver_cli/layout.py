"""The checkpoint layout on disk, in one place: file names, which file loads, cheap checks.

A checkpoint directory holds `config.json` plus `model.safetensors` (preferred) or
`pytorch_model.bin`. The checks here read a few bytes, never the weights: `config.json` must
parse as a JSON object, and a safetensors file's header must describe exactly the file's size
(a cut-off or overwritten file fails this). Also here: where the Hugging Face caches live
(`HF_HOME`, `HF_HUB_CACHE`), read from the environment at each call, and the one way this
package writes a file (whole, then renamed into place, with the usual permissions).

This module imports neither torch nor huggingface_hub: the CLI and the warm-cache lookup in
hub.py use it before either is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
WEIGHTS_FILES = (SAFETENSORS_FILE, BIN_FILE)  # the order a directory is read in
CONVERTED_DIR = "perceiver-safetensors"  # in a repo's Hub cache folder: <commit>/{config.json, model.safetensors}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header, in bytes
LOADABLE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors' names -> torch's


def weights_file(directory: str | Path) -> Path | None:
    """The weights file a checkpoint directory loads from: safetensors first, then .bin."""
    directory = Path(directory)
    return next((directory / f for f in WEIGHTS_FILES if (directory / f).is_file()), None)


def not_a_checkpoint(directory: str | Path) -> str:
    return f"{directory} is not a Perceiver checkpoint: it needs {CONFIG_FILE} and {SAFETENSORS_FILE} or {BIN_FILE}"


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensors a safetensors file lists, `{name: {"dtype", "shape", "data_offsets"}}`.

    Reads the header only (8-byte length, then JSON). Raises ValueError when the file is not
    a whole safetensors file: in a whole file the last tensor ends exactly at the end of the
    file. OSError when it cannot be read.
    """
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(MAX_HEADER, size - 8):
            raise ValueError(f"its header length ({n} bytes) does not fit its {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"unreadable header: {short_error(e)}") from None
    if not isinstance(header, dict):
        raise ValueError("unreadable header: not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            shape = list(entry["shape"])
            numbers = [start, end, *shape]
            if not all(type(x) is int and x >= 0 for x in numbers) or start > end:
                raise ValueError
            tensors[name] = {"dtype": str(entry["dtype"]), "shape": shape, "data_offsets": [start, end]}
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"unreadable header: bad entry for tensor {name!r}") from None
    expected = 8 + n + max((t["data_offsets"][1] for t in tensors.values()), default=0)
    if expected != size:
        raise ValueError(f"it has {size} bytes, its header describes {expected}")
    return tensors


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None. Reads only its header."""
    try:
        safetensors_header(path)
    except ValueError as e:
        return str(e)
    except OSError as e:
        return f"unreadable: {short_error(e)}"
    return None


def config_problem(path: str | Path) -> str | None:
    """Why `path` is not a config.json (a JSON object), or None."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        return f"not JSON: {short_error(e)}"
    return None if isinstance(value, dict) else "not a JSON object"


def short_error(e: BaseException) -> str:
    """The first line of an exception's message, or its class name: fits in a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- where the caches are -----------------------------------------------------------------


def hf_home() -> Path:
    """`$HF_HOME`, by default `$XDG_CACHE_HOME/huggingface`, by default `~/.cache/huggingface`:
    huggingface_hub's rule (`huggingface_hub.constants.HF_HOME`), read now, not at import."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home)))


def hub_cache() -> Path:
    """`$HF_HUB_CACHE` (or the legacy `$HUGGINGFACE_HUB_CACHE`), by default `$HF_HOME/hub`:
    huggingface_hub's rule (`huggingface_hub.constants.HF_HUB_CACHE`), read now."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or str(hf_home() / "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def offline_from_env() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to 1/on/yes/true: huggingface_hub's rule."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


# -- writing ----------------------------------------------------------------------------------


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` whole or not at all: `write(tmp)` fills a temporary file beside it, which is
    then renamed into place, so a reader (or a run killed half-way) never sees half a file.

    The file gets the mode of any new file, 0666 less the process umask (0644 under umask 022),
    as huggingface_hub's blobs do, even when `write` makes it another way (safetensors' writer
    leaves 0600). Raises OSError (or the writer's error); nothing is left behind then.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a killed run, with whatever mode it had
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies here
        try:
            mode = os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
