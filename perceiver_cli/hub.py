"""Resolve `--model` to a local checkpoint directory: a directory as is, or a Hub repo id.

This module finds and fetches; layout.py names the files and checks them, checkpoint.py
reads them. A Hub repo is looked up in the standard Hugging Face cache first (`HF_HUB_CACHE`,
by default `$HF_HOME/hub`) without any network request; only what is missing is downloaded,
with `huggingface_hub.hf_hub_download`:

1. `config.json` at the revision (default `main`); its snapshot folder names the commit.
2. `model.safetensors` at that commit, or, when the repo has none, `pytorch_model.bin`,
   converted once (`checkpoint.BinCopy`) into `<cache>/models--<org>--<name>/
   perceiver-safetensors/<commit>/`, so that every later load is memory-mapped.
   (huggingface_hub's cache tools ignore that folder; deleting the repo's folder deletes it.)

Cached files are checked cheaply before use (layout.py); a bad one is downloaded again, or
named in the error when offline. huggingface_hub writes each download to a temporary file and
renames it into place only once complete, so a download cut off half-way is never loaded.

The library never prints: `progress=True` lets huggingface_hub draw its download bars on
stderr (the CLI sets it when stderr is a terminal); otherwise they are off, and the warnings
huggingface_hub issues (`UserWarning`s such as "Not enough free disk space") are dropped: what
matters reaches the caller as this module's one-line `CheckpointError`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, InputError
from .layout import (  # noqa: F401  (the names tests and callers import from here)
    BIN_FILE,
    CONFIG_FILE,
    CONVERTED_DIR,
    SAFETENSORS_FILE,
    config_problem,
    hub_cache,
    not_a_checkpoint,
    offline_from_env,
    safetensors_problem,
    short_error,
    weights_file,
)

if TYPE_CHECKING:
    from .checkpoint import BinCopy  # imported when needed: it imports torch


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's checkpoint lives on disk, and where it came from."""

    model: str  # as given: a directory or a repo id
    directory: Path  # config.json + weights, what `checkpoint.load_model` reads
    weights: Path  # the weights file in `directory`
    repo_id: str | None = None  # None for a local directory
    revision: str | None = None  # as asked; None means the default branch
    commit: str | None = None  # the Hub commit the files come from
    converted: bool = False  # weights converted from the repo's pytorch_model.bin

    @property
    def size(self) -> int:
        """Bytes on disk of config.json plus the weights."""
        return sum(os.stat(p).st_size for p in (self.directory / CONFIG_FILE, self.weights))


def resolve_model(model: str, revision: str | None = None, offline: bool = False, progress: bool = False) -> Path:
    """A local checkpoint directory for `model` (a directory, or a Hub repo id)."""
    return resolve(model, revision, offline=offline, progress=progress).directory


def resolve(
    model: str,
    revision: str | None = None,
    *,
    offline: bool = False,
    progress: bool = False,
    update: bool = False,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
) -> ResolvedModel:
    """Find or fetch `model`'s checkpoint.

    A directory is used as is. A Hub repo id is read from the cache when it holds a good copy
    (no network at all), else downloaded. `update=True` asks the Hub for the revision's latest
    commit first (falling back to the cache when the Hub cannot be reached). `offline=True`, or
    `HF_HUB_OFFLINE=1`, never uses the network. `cache_dir` and `endpoint` default to
    huggingface_hub's (`HF_HUB_CACHE`, `HF_ENDPOINT`). A `revision` that is not a plain branch,
    tag or commit name (`../x`) is refused (`OptionError`) before anything else.
    """
    if revision is not None:
        from .options import check_revision

        check_revision(revision)
    local = _local_directory(model)
    if local is not None:
        if revision:
            raise InputError(f"revision {revision} needs a Hub repo id, but {model} is a local directory")
        weights = weights_file(local)
        if not (local / CONFIG_FILE).is_file() or weights is None:
            raise CheckpointError(not_a_checkpoint(local))
        return ResolvedModel(model, local, weights)

    _check_endpoint(endpoint)
    # huggingface_hub's constants are read at its import; a caller may have set them since
    hf_offline = getattr(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE", False)
    offline = offline or offline_from_env() or hf_offline is True
    cache = Path(cache_dir or hub_cache()).expanduser().absolute()
    hub = _Repo(model, revision, cache, endpoint, offline, progress)
    # The cache first, before huggingface_hub validates the id in full (its import is the
    # cost): a repo folder in the cache was made by huggingface_hub for a valid id.
    if not (update and not offline) and _REPO_ID_SHAPE.fullmatch(model) and "--" not in model and ".." not in model:
        found = hub.from_cache()
        if found is not None:
            return found
    _check_repo_id(model)
    if offline:
        raise CheckpointError(
            f"{model}{hub.at} is not in the cache ({hub.cache}) and offline mode forbids downloading it"
            f" (--offline or HF_HUB_OFFLINE=1): run once online (e.g. `perceiver download --model {model}`),"
            " or use a local checkpoint directory"
        )
    with _quiet():
        return hub.download()


def _check_endpoint(endpoint: str | None) -> None:
    """`HF_ENDPOINT` (or the endpoint given) must be an http(s) URL: huggingface_hub parses
    the variable when it is imported, and a malformed one would fail there, unnamed."""
    for name, url in (("HF_ENDPOINT", os.environ.get("HF_ENDPOINT")), ("the endpoint", endpoint)):
        if not url:
            continue
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
        except ValueError:
            ok = False
        if not ok:
            raise InputError(f"{name} {url!r} is not an http:// or https:// URL")


@contextmanager
def _quiet():
    """huggingface_hub's `UserWarning`s ("Not enough free disk space ...") and its logged
    warnings ("Error while downloading ... Trying to resume download") would be printed on
    stderr: the library never prints, and what matters reaches the caller as one
    CheckpointError line. Both are off for the call (process-wide, as `warnings` and
    `logging` are), then as they were."""
    import huggingface_hub.utils.logging  # noqa: F401  (its import sets its logger's level: before ours)

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(max(logging.ERROR, logger.getEffectiveLevel()))
        try:
            yield
        finally:
            logger.setLevel(level)


def _local_directory(model: str) -> Path | None:
    """`model` as a local directory; None when it is to be read as a Hub repo id."""
    if not model.strip():  # Path("") would be the current directory
        raise InputError("model is empty: give a Hub repo id (like deepmind/language-perceiver) or a checkpoint directory")
    path = Path(model).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise CheckpointError(f"{model} is a file: the model is a checkpoint directory or a Hub repo id")
    if model.startswith((".", "/", "~")) or "\\" in model or path.is_absolute():
        raise CheckpointError(f"local model directory {model} does not exist")
    return None


_REPO_ID_SHAPE = re.compile(r"(?:[\w.-]+/)?[\w.-]+")  # every valid repo id has this shape


def _check_repo_id(model: str) -> None:
    """huggingface_hub's own validation of a repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise CheckpointError(
            f"model {model!r} is neither a local directory nor a Hub repo id (like deepmind/language-perceiver)"
        ) from None


def _network_error(e: BaseException, kind: str = "TransportError") -> bool:
    """An error of the network itself: `TransportError` (any: refused, timed out, broken off)
    or `ConnectError` (no connection made). huggingface_hub lets its HTTP client's own errors
    through for these (httpx's in 1.x, httpx2's in 2.x); this module imports neither client, so
    they are told by class name. Python's own `ConnectionError` counts as well (huggingface_hub's
    `OfflineModeIsEnabled` is one)."""
    return isinstance(e, (ConnectionError, TimeoutError) if kind == "TransportError" else ConnectionError) or any(
        cls.__name__ == kind and cls.__module__.startswith("httpx") for cls in type(e).__mro__
    )


class _Repo:
    """One Hub repo at one revision, in one cache."""

    def __init__(self, repo_id, revision, cache: Path, endpoint, offline: bool, progress: bool):
        self.repo_id, self.revision, self.cache = repo_id, revision, cache
        self._endpoint = endpoint
        self.offline, self.progress = offline, progress
        self.folder = cache / "--".join(["models", *repo_id.split("/")])  # models--<org>--<name>
        self.refetch: set[str] = set()  # cached files found corrupted: download again
        self.at = f" (revision {revision})" if revision else ""

    @property
    def endpoint(self) -> str:
        """The Hub's URL: as given, else `HF_ENDPOINT` now, else huggingface_hub's default."""
        if self._endpoint is None:
            from huggingface_hub import constants

            self._endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        return self._endpoint.rstrip("/")

    # -- the cache, no network -----------------------------------------------------------

    def from_cache(self) -> ResolvedModel | None:
        """The checkpoint from the cache alone; None when something is missing or bad."""
        config = self.cached(CONFIG_FILE, self.revision or "main")
        if config is None or self._is_bad(CONFIG_FILE, config, config_problem(config)):
            return None
        commit = config.parent.name  # snapshots/<commit>/config.json
        weights = self.cached(SAFETENSORS_FILE, commit)
        if weights is not None:
            if self._is_bad(SAFETENSORS_FILE, weights, safetensors_problem(weights)):
                return None
            return self._found(config.parent, weights, commit)
        copy = self._bin_copy(commit)
        if copy.whole():
            return self._copied(copy)
        weights = self.cached(BIN_FILE, commit)
        if weights is not None:
            from .checkpoint import UnreadableWeights

            try:
                copy.convert(config, weights)
                return self._copied(copy)
            except UnreadableWeights as e:
                self._is_bad(BIN_FILE, weights, e.reason)
        return None

    def cached(self, filename: str, revision: str) -> Path | None:
        """`filename` at `revision` (a branch, tag or commit) in the cache, or None.

        What huggingface_hub's `try_to_load_from_cache` answers (tests/test_hub.py checks it),
        without importing its download machinery: measured on this 2-core machine, importing
        `huggingface_hub.file_download` takes 0.10-0.16 s alone and 0.26-0.33 s after torch,
        the order a fill runs in. The layout: `refs/<branch or tag>` holds a commit;
        `snapshots/<commit>/<filename>`.
        """
        ref = self.folder / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
        except (OSError, ValueError):
            return None
        if not commit or "/" in commit or "\\" in commit or commit in (".", ".."):
            return None
        path = self.folder / "snapshots" / commit / filename
        return path if path.is_file() else None

    def _is_bad(self, filename: str, path: Path, problem: str | None) -> bool:
        """Note a corrupted cached file for download; offline, fail naming it."""
        if problem is None:
            return False
        if self.offline:
            raise CheckpointError(
                f"the cached {filename} of {self.repo_id} is corrupted ({problem}): run once online"
                f" (without --offline / HF_HUB_OFFLINE) to download it again, or delete {path}"
            )
        self.refetch.add(filename)
        return True

    def _bin_copy(self, commit: str) -> BinCopy:
        """The safetensors copy of the repo's pytorch_model.bin at `commit` (checkpoint.py
        converts; its folder is beside the snapshots)."""
        from .checkpoint import BinCopy

        return BinCopy(self.repo_id, commit, self.folder / CONVERTED_DIR / commit)

    def _copied(self, copy: BinCopy) -> ResolvedModel:
        return self._found(copy.directory, copy.weights, copy.commit, converted=True)

    def _found(self, directory: Path, weights: Path, commit: str, converted: bool = False) -> ResolvedModel:
        return ResolvedModel(self.repo_id, directory, weights, self.repo_id, self.revision, commit, converted)

    # -- the Hub -------------------------------------------------------------------------

    def download(self) -> ResolvedModel:
        """Fetch what the cache lacks (or holds corrupted) and return the checkpoint."""
        from huggingface_hub.errors import EntryNotFoundError

        if not self._reachable():
            found = self.from_cache()  # `update` went online first: the cache will do
            if found is not None:
                return found
            raise self._unreachable()
        config, problem = self._fetch_checked(CONFIG_FILE, self.revision, config_problem)
        if problem:
            raise CheckpointError(f"{self.repo_id}{self.at}: {CONFIG_FILE} is {problem}; not a model checkpoint")
        commit = config.parent.name
        try:  # pinned to config.json's commit
            weights, problem = self._fetch_checked(SAFETENSORS_FILE, commit, safetensors_problem)
        except EntryNotFoundError:
            weights = None
        if weights is not None:
            if problem:
                raise CheckpointError(
                    f"{SAFETENSORS_FILE} of {self.repo_id} at commit {commit[:12]} is not a valid safetensors file"
                    f" ({problem})"
                )
            return self._found(config.parent, weights, commit)
        copy = self._bin_copy(commit)
        if copy.whole():
            return self._copied(copy)
        was_cached = self.cached(BIN_FILE, commit) is not None
        try:
            weights = self._fetch(BIN_FILE, commit)
        except EntryNotFoundError:
            raise CheckpointError(
                f"{self.repo_id}{self.at} has neither {SAFETENSORS_FILE} nor {BIN_FILE}: no weights to load;"
                " pick another model or revision"
            ) from None
        # a cached .bin that cannot be read may have gone bad in the cache: once more from the Hub
        refetch = (lambda: self._fetch(BIN_FILE, commit, force=True)) if was_cached else None
        copy.convert_download(config, weights, refetch)
        return self._copied(copy)

    def _fetch_checked(self, filename: str, revision: str | None, problem_of) -> tuple[Path, str | None]:
        """The file and what is wrong with it; a cached copy gone bad is fetched once more."""
        was_cached = filename not in self.refetch and self.cached(filename, revision or "main") is not None
        path = self._fetch(filename, revision)
        problem = problem_of(path)
        if problem and was_cached:
            path = self._fetch(filename, revision, force=True)
            problem = problem_of(path)
        return path, problem

    def _reachable(self) -> bool:
        """One HEAD request, without huggingface_hub's retries (they take half a minute when offline).

        Also turns a missing repo or revision into its error before anything is downloaded.
        """
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        url = hf_hub_url(self.repo_id, CONFIG_FILE, revision=self.revision or "main", endpoint=self.endpoint)
        try:
            get_hf_file_metadata(url, endpoint=self.endpoint)
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code >= 500:
                return False  # the Hub is down: the cache may still do
            raise self._error(e, CONFIG_FILE) from None
        except Exception as e:
            if _network_error(e):  # no network, no server, a timeout
                return False
            raise self._error(e, CONFIG_FILE) from None
        return True

    def _fetch(self, filename: str, revision: str | None, force: bool = False) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        force = force or filename in self.refetch
        try:
            path = hf_hub_download(
                self.repo_id,
                filename,
                revision=revision,
                cache_dir=self.cache,
                endpoint=self.endpoint,
                force_download=force,
                tqdm_class=_progress_class(self.progress),
            )
        except EntryNotFoundError as e:
            if filename != CONFIG_FILE and not isinstance(e, FileNotFoundError):
                raise  # not on the Hub: the caller tries the other weights file
            raise self._error(e, filename) from None
        except Exception as e:
            if force and type(e) is ValueError and e.__cause__ is not None:
                e = e.__cause__  # force_download found no HEAD answer: the cause says why
            raise self._error(e, filename) from None
        self.refetch.discard(filename)
        return Path(path)

    def _error(self, e: BaseException, filename: str) -> CheckpointError:
        """huggingface_hub's and the network's errors as one line that says what to do."""
        from huggingface_hub import errors

        if isinstance(e, errors.GatedRepoError):
            return CheckpointError(
                f"{self.repo_id} is a gated repo: accept its conditions on the Hub, then log in (`hf auth login`)"
            )
        if isinstance(e, errors.RepositoryNotFoundError):
            return CheckpointError(
                f"model {self.repo_id!r} not found on the Hub ({self.endpoint}): check the model name (a Hub repo id"
                " such as deepmind/language-perceiver, or a local directory; a private repo needs `hf auth login`)"
            )
        if isinstance(e, errors.RevisionNotFoundError):
            return CheckpointError(
                f"revision {self.revision!r} not found in {self.repo_id}: check the revision (a branch, tag or commit)"
            )
        if isinstance(e, errors.LocalEntryNotFoundError) or _network_error(e, "ConnectError"):
            return self._unreachable(filename)
        if isinstance(e, errors.EntryNotFoundError):
            return CheckpointError(f"{self.repo_id}{self.at} has no {filename}: not a model checkpoint")
        if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
            return CheckpointError(
                f"the Hub answered HTTP {e.response.status_code} for {filename} of {self.repo_id}: try again later"
            )
        if _network_error(e) or (isinstance(e, OSError) and e.errno is None):
            return CheckpointError(  # a broken connection, or fewer bytes than announced
                f"the download of {filename} from {self.repo_id} was cut off ({short_error(e)}): run the command again"
                " (nothing partial is kept)"
            )
        if isinstance(e, OSError):
            return CheckpointError(f"cannot write {filename} to the cache {self.cache}: {e.strerror or short_error(e)}")
        return CheckpointError(f"cannot download {filename} from {self.repo_id}: {short_error(e)}")

    def _unreachable(self, filename: str | None = None) -> CheckpointError:
        filename = filename or min(self.refetch, default=None)
        if filename in self.refetch:
            return CheckpointError(
                f"the cached {filename} of {self.repo_id} is corrupted and the Hub ({self.endpoint}) cannot be"
                " reached to download it again: connect and run again"
            )
        missing = f"{filename} of {self.repo_id}" if filename else f"{self.repo_id}{self.at}"
        return CheckpointError(
            f"cannot reach the Hub ({self.endpoint}) and {missing} is not in the cache ({self.cache}):"
            " connect to the internet once (later runs work offline), or use a local checkpoint directory"
        )


_PROGRESS_CLASSES: dict[bool, type] = {}


def _progress_class(progress: bool) -> type:
    """huggingface_hub's tqdm bar (stderr, a terminal only, HF_HUB_DISABLE_PROGRESS_BARS honoured),
    labelled with the file name instead of the tail of its URL; or a silent one."""
    if progress not in _PROGRESS_CLASSES:
        from huggingface_hub.utils import tqdm

        class Bar(tqdm):
            def __init__(self, *args, **kwargs):
                if isinstance(kwargs.get("desc"), str):
                    kwargs["desc"] = kwargs["desc"].rsplit("/", 1)[-1]
                super().__init__(*args, **kwargs)

        class Silent(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        _PROGRESS_CLASSES.update({True: Bar, False: Silent})
    return _PROGRESS_CLASSES[progress]
