"""The options of loading a model and of filling text: every default and every rule, once.

    load = LoadOptions(model="tests/assets/perceiver-small", threads=1)
    fill = FillOptions(strategy="oneshot", top_k=3)
    MaskFiller.from_pretrained(load).fill("Hello [MASK:6].", fill)

Both are frozen dataclasses that validate themselves when built: a bad value raises
`OptionError` (an `InputError`: exit 2 on the command line) with one message naming the
option. The CLI, batch mode, the server and the scripts all build these objects, so a
default or a bound is written here and nowhere else; the CLI's `--help` reads its
defaults from them. Rules that need the model (a `max_span` longer than the model's
window) are checked by `MaskFiller` against the loaded model.

This module imports no torch: the CLI validates options before the ~2 s torch import,
and the server's client never imports torch at all. It imports no other module of the
package but `errors` and `runtime`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import InputError
from .runtime import available_cpus

DEFAULT_MODEL = "deepmind/language-perceiver"
MODEL_ENV = "PERCEIVER_MODEL"  # the model of every command that loads one, when --model is not given
DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZE = ("none", "int8")
STRATEGIES = ("iterative", "beam", "oneshot")
MAX_BATCH_SIZE = 256  # windows per forward pass; a full-size pass of 256 texts needs ~1 GB
MAX_TOP_K = 256  # candidates per span: one per byte value of a one-byte span
MAX_CHOICES = 64  # --choice words per fill
# How a --choice is scored (choices.py): sum = one pass, the span masked; pll = one pass per
# byte, that byte masked; chain = left to right, one pass per byte, the bytes after it
# masked. "-mean": divided by the choice's byte count (its absorbed space not counted).
CHOICE_SCORES = ("chain", "chain-mean", "pll", "pll-mean", "sum", "sum-mean")
# What a fill with choices never uses (a choice is scored as written: nothing is searched
# for, no length chosen): away from their defaults, they are refused with choices.
NOT_WITH_CHOICES = ("strategy", "max_span", "iterative_passes", "beam_width", "length_alpha", "length_candidates",
                    "length_prior")


INT8_CPU_ONLY = "int8 runs on the CPU only"
# FillOptions fields that the command line does not offer (set them from Python or in
# /v1/fill's "options"): a message that names one says so instead of showing a flag.
NO_FLAG = ("single_line", "iterative_passes", "beam_width", "length_alpha", "length_candidates", "length_prior")


class OptionError(InputError):
    """A bad option value. `name` is the option's field name (`top_k`); the CLI shows it as
    its flag (`--top-k`), a Python caller sees the field name."""

    def __init__(self, name: str, rule: str):
        self.name, self.rule = name, rule
        super().__init__(f"{name} {rule}")

    def flag(self) -> str:
        """The message with the command-line flag in place of the field name (a name that is
        no field, like an environment variable's, as it is)."""
        if not (self.name.isidentifier() and self.name.islower()):
            return str(self)
        return f"{flag_of(self.name)} {self.rule}"


def flag_of(name: str) -> str:
    """The command-line flag of an option's field name: `top_k` -> `--top-k`, `choices` ->
    `--choice` (given as --choice WORD ...)."""
    return "--" + {"choices": "choice"}.get(name, name).replace("_", "-")


def _whole(name: str, value: Any, lo: int, hi: int | None = None, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be a whole number (got {value!r})")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}{what}" if hi is not None else f"at least {lo}{what}"
        raise OptionError(name, f"must be {bound} (got {value})")


def _choice(name: str, value: Any, allowed: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    if not isinstance(value, str):
        raise OptionError(name, f"must be one of {', '.join(allowed)} (got {value!r})")
    key = value.strip().lower()
    key = (aliases or {}).get(key, key)
    if key not in allowed:
        raise OptionError(name, f"must be one of {', '.join(allowed)} (got {value!r})")
    return key


class _Options:
    """What both option classes share: `replace` with validation, and plain dicts."""

    def replace(self, **changes):
        """A copy with `changes` applied and validated; an unknown name is an `OptionError`."""
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        for name in changes:
            if name not in names:
                raise OptionError(name, f"is not an option of {type(self).__name__} (options: {', '.join(sorted(names))})")
        return replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict):
        """From a plain dict (a JSON request): unknown keys are an `OptionError`."""
        if not isinstance(values, dict):
            raise InputError(f"{cls.__name__} must be given as an object of option names and values")
        return cls().replace(**values)


@dataclass(frozen=True)
class LoadOptions(_Options):
    """How to load a model. The defaults reproduce the reference on the CPU."""

    model: str = DEFAULT_MODEL  # a Hub repo id or a local checkpoint directory
    revision: str | None = None  # a Hub branch, tag or commit; None: the repo's main branch
    device: str = "auto"  # auto takes CUDA, then MPS, then the CPU
    dtype: str = "auto"  # auto: float16 on CUDA (fast), float32 elsewhere (exact)
    quantize: str = "none"  # int8: faster CPU products, fills close to float32's
    threads: int | None = None  # torch CPU threads; None: the CPUs this process may use
    offline: bool = False  # never use the network: the cache or a local directory only
    batch_size: int = 8  # windows per forward pass (memory grows with it)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise OptionError(
                "model", "is empty: give a Hub repo id (like deepmind/language-perceiver) or a checkpoint directory"
            )
        if self.revision is not None:
            if not isinstance(self.revision, str):
                raise OptionError("revision", f"must be a string (got {self.revision!r})")
            check_revision(self.revision)
        object.__setattr__(self, "device", _device(self.device))
        object.__setattr__(self, "dtype", _choice("dtype", self.dtype or "auto", DTYPES, DTYPE_ALIASES))
        object.__setattr__(self, "quantize", _choice("quantize", self.quantize or "none", QUANTIZE))
        if self.threads is not None:
            cpus = available_cpus()  # more only slows down; far more crashes OpenMP
            _whole("threads", self.threads, 1, cpus, ", the CPUs this process may use")
        if not isinstance(self.offline, bool):
            raise OptionError("offline", f"must be true or false (got {self.offline!r})")
        _whole("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.quantize == "int8":
            if self.device not in ("auto", "cpu"):
                raise OptionError("quantize", f"{INT8_CPU_ONLY}: use device cpu")
            if self.dtype not in ("auto", "float32"):
                raise OptionError("quantize", "int8 keeps the other products in float32: leave dtype at auto or float32")


def _device(value: Any) -> str:
    if not isinstance(value, str):
        raise OptionError("device", f"must be one of auto, cpu, cuda, cuda:N, mps (got {value!r})")
    name = value.strip().lower() or "auto"
    if name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise OptionError("device", f"must be one of auto, cpu, cuda, cuda:N, mps (got {value!r})")


def check_revision(revision: str) -> None:
    """A revision must be a plain branch or tag name or a commit: never a path that could
    make a download land outside the cache (`..`, a leading `/`, a backslash, control
    characters). Checked before any network request."""
    bad = (
        not revision
        or revision != revision.strip()
        or revision.startswith("/")
        or revision.endswith("/")
        or "\\" in revision
        or any(part in ("", ".", "..") for part in revision.split("/"))
        or any(ord(c) < 32 or ord(c) == 127 for c in revision)
        or not revision.isprintable()
    )
    try:
        revision.encode("utf-8")
    except UnicodeEncodeError:
        bad = True
    if bad:
        raise OptionError("revision", f"{revision!r} is not a branch, tag or commit name")


class ChoicesConflict(OptionError):
    """Options given with choices that a fill with choices would ignore: one error naming
    each of them (as flags on the command line)."""

    def __init__(self, given: list[tuple[str, Any]]):
        self.given = given
        super().__init__("choices", self._rule([f"{name}={value!r}" for name, value in given]))

    def _rule(self, shown: list[str]) -> str:
        them = "it at its default" if len(shown) == 1 else "them at their defaults"
        return (f"cannot be combined with {', '.join(shown)}: each choice is scored as written, never "
                f"searched for or given a length; leave {them}")

    def flag(self) -> str:
        return "--choice " + self._rule([f"--{name.replace('_', '-')} {value}" for name, value in self.given])


@dataclass(frozen=True)
class FillOptions(_Options):
    """How to fill spans. The defaults were chosen on the validation split (QUALITY.md)."""

    strategy: str = "iterative"  # iterative (best quality per pass), beam, or oneshot (exactly the reference)
    top_k: int = 1  # whole-span candidates per span, best first (at most MAX_TOP_K)
    max_span: int = 16  # longest span `[MASK]` may choose, in bytes
    mask_token: str = "[MASK]"  # the marker literal; `[MASK:N]` is its sized form
    explain: bool = False  # keep each masked byte's top alternatives (`alternatives` in JSON)
    single_line: bool = False  # never fill a line break (plain --batch output: one line per line)
    iterative_passes: int | None = 2  # most passes per span; None: one byte per pass
    beam_width: int = 4  # hypotheses kept by `beam`
    length_alpha: float = 0.5  # auto length: a length L scores (sum of byte log-probs) / L ** alpha
    length_candidates: int | None = 2  # auto length: lengths scored per `[MASK]`; None: all; 0: the probe decides
    length_prior: float = 1.0  # auto length: weight of the probe's log-probability that the word ends at L
    choices: tuple[str, ...] = ()  # fill every span with the best of these words (choices.py); () : free fill
    choice_score: str = "sum-mean"  # how a choice is scored, one of CHOICE_SCORES (chosen on validation)

    def __post_init__(self):
        object.__setattr__(self, "strategy", _choice("strategy", self.strategy, STRATEGIES))
        _whole("top_k", self.top_k, 1, MAX_TOP_K)
        _whole("max_span", self.max_span, 1)
        if not isinstance(self.mask_token, str) or not self.mask_token or self.mask_token.isspace():
            raise OptionError("mask_token", "must be a non-empty literal")
        if any(c in self.mask_token for c in "\r\n"):
            raise OptionError("mask_token", "must not hold a line break")
        for name in ("explain", "single_line"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"must be true or false (got {getattr(self, name)!r})")
        if self.iterative_passes is not None:
            _whole("iterative_passes", self.iterative_passes, 1)
        _whole("beam_width", self.beam_width, 1, MAX_TOP_K)
        for name in ("length_alpha", "length_prior"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
                raise OptionError(name, f"must be a number between 0 and 10 (got {value!r})")
        if self.length_candidates is not None:
            _whole("length_candidates", self.length_candidates, 0)
        choices = self.choices
        if isinstance(choices, str):  # one word, e.g. from a JSON request
            choices = (choices,)
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
            raise OptionError("choices", f"must be a list of words (got {choices!r})")
        if len(choices) > MAX_CHOICES:
            raise OptionError("choices", f"may hold at most {MAX_CHOICES} words (got {len(choices)})")
        for k, c in enumerate(choices):
            if not c:
                raise OptionError("choices", "must not hold an empty word")
            if c in choices[:k]:
                raise OptionError("choices", f"holds {c!r} twice")
            try:
                c.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise OptionError("choices", f"{c!r} holds a lone surrogate: not a character") from None
            if self.single_line and any(b in c for b in "\r\n"):  # a fill of plain --batch output is one line
                raise OptionError("choices", f"{c!r} holds a line break: plain --batch output is one line per "
                                             f"input line (--json may hold one)")
        object.__setattr__(self, "choices", tuple(choices))  # hashable (the server groups by options)
        object.__setattr__(self, "choice_score", _choice("choice_score", self.choice_score, CHOICE_SCORES))
        changed = [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) != f.default]
        if self.choices and any(name in NOT_WITH_CHOICES for name, _ in changed):
            raise ChoicesConflict([(name, value) for name, value in changed if name in NOT_WITH_CHOICES])
        if not self.choices and any(name == "choice_score" for name, _ in changed):
            raise OptionError("choice_score", f"{self.choice_score!r} applies with choices only (no choices given)")

    def check_window(self, window: int) -> "FillOptions":
        """These options against a model whose inputs hold `window` document bytes (what they
        cannot know alone; `MaskFiller.check` and the server's client both ask this):
        `OptionError` for a `max_span`, or a choice, longer than that."""
        if self.max_span > window:
            raise OptionError("max_span", f"must be between 1 and {window} bytes, this model's window (got {self.max_span})")
        for word in self.choices:
            n = len(word.encode("utf-8", "surrogateescape"))
            if n > window:
                raise OptionError("choices", f"{word[:20]!r}... is {n} bytes, longer than this model's {window}-byte window")
        return self


def model_window(max_position_embeddings: int) -> int:
    """Document bytes one model input holds: `[CLS]` and `[SEP]` take two of its positions."""
    return max_position_embeddings - 2


@dataclass(frozen=True)
class Budget(_Options):
    """What one text's fill may cost, estimated from what it asks before anything is built
    (budget.py). Over a limit the text is refused with `OverBudget` (an `InputError`: exit 2,
    a 400) naming the option to turn. The defaults let any document of ordinary size be
    filled with any strategy, and refuse requests that would take gigabytes or hours.
    Each field is a flag of `fill`, `ray-fill` and `serve` (`--max-inputs`, ...); on the
    server `max_inputs` is its `--max-inputs` (ServeOptions: also counted per request) and
    `max_answer_mb` also bounds a whole /v1/fill answer (fillrequest.py)."""

    max_inputs: int = 20_000  # model inputs (a window in one pass); ~1 s each on the full model's CPU
    max_search: int = 2_000  # millions of scores the search handles outside the passes (~1 s per 500)
    max_memory_mb: int = 2_048  # estimated peak memory; texts of one call are filled in groups under it
    max_answer_mb: int = 64  # estimated size of the text's answer in JSON (explain, candidates, choices)

    def __post_init__(self):
        for f in fields(self):
            _whole(f.name, getattr(self, f.name), 1)



# -- perceiver serve -----------------------------------------------------------------------

API_KEY_ENV = "PERCEIVER_API_KEY"  # the server's key, and the key its clients send
SERVER_ENV = "PERCEIVER_SERVER"  # the server `perceiver fill` sends its work to


@dataclass(frozen=True)
class ServeOptions(_Options):
    """How the server listens and batches (`perceiver serve`). Bad values raise `OptionError`
    (exit 2)."""

    host: str = "127.0.0.1"  # loopback: another address has to be asked for
    port: int = 8000  # 0: any free port (the announced address says which)
    max_body_mb: float = 4.0  # request bodies larger than this get 413
    max_batch: int = 16  # texts gathered into one batch of model work
    batch_wait_ms: float = 5.0  # how long the worker waits for more requests after the first
    queue_size: int = 64  # requests waiting for the model; one more gets 503
    max_inputs: int = 10_000  # model inputs (one window of one text in one pass) one request may take
    body_timeout_s: float = 60.0  # seconds a client has to send its whole request body; then 408
    api_key: str | None = field(default=None, repr=False)  # None: no key needed
    access_log: bool = True  # one line per request on stderr (observe.py)
    log_format: str = "text"  # the access log's lines: text, or json (one object a line)
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the server ("*": any); none by default

    def __post_init__(self):
        if not isinstance(self.access_log, bool):
            raise OptionError("access_log", f"must be true or false (got {self.access_log!r})")
        object.__setattr__(self, "log_format", _choice("log_format", self.log_format, LOG_FORMATS))
        origins = (self.cors_origins,) if isinstance(self.cors_origins, str) else self.cors_origins
        if not isinstance(origins, (list, tuple)):
            raise OptionError("cors_origin", f"must be a list of origins (got {origins!r})")
        for origin in origins:
            check_origin(origin)
        object.__setattr__(self, "cors_origins", tuple(origins))
        if not isinstance(self.host, str) or not self.host.strip():
            raise OptionError("host", "must be an address to listen on, like 127.0.0.1")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise OptionError("port", f"must be between 0 and 65535 (got {self.port!r})")
        for name, lo in (("max_body_mb", 0.001), ("batch_wait_ms", 0.0), ("body_timeout_s", 0.001)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= 1e6:
                raise OptionError(name, f"must be a number of at least {lo} (got {value!r})")
        for name in ("max_batch", "queue_size", "max_inputs"):
            _whole(name, getattr(self, name), 1)
        if self.api_key is not None:
            check_api_key(self.api_key, "api_key")

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")


LOG_FORMATS = ("text", "json")
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def check_origin(origin: Any) -> str:
    """A CORS origin is `*` or scheme://host[:port], as a browser sends it in `Origin`
    (no path, no trailing slash)."""
    if origin != "*" and not (isinstance(origin, str) and _ORIGIN.fullmatch(origin)):
        raise OptionError("cors_origin", f"must be * or an origin like https://example.org or "
                                         f"http://localhost:3000, without a path (got {origin!r})")
    return origin


def check_api_key(key: str, where: str) -> str:
    """A key must be printable text without surrounding or only white space; it travels in an
    HTTP header as UTF-8 (both sides compare its UTF-8 bytes)."""
    if not isinstance(key, str) or not key.strip():
        raise OptionError(where, "is blank: an API key must hold printable characters")
    if key.startswith("\ufeff"):
        raise OptionError(where, "starts with a byte order mark (BOM): save the key without one")
    if key != key.strip() or not key.isprintable():
        raise OptionError(where, "must be printable characters without surrounding white space")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise OptionError(where, "holds a lone surrogate: not a character") from None
    return key


def read_api_key(path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The server's API key: the first line of `path` (--api-key-file), else $PERCEIVER_API_KEY,
    else None (no key). A key that is set but blank is an `InputError` (a server that was
    meant to have a key never starts without one)."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                line = f.readline()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --api-key-file {path}: {getattr(e, 'strerror', None) or e}") from None
        key = line.rstrip("\r\n")
        if not key.strip():
            raise InputError(f"--api-key-file {path} is empty: its first line must be the key")
        return check_api_key(key.strip(" \t"), f"the first line of --api-key-file {path}")
    return client_api_key(environ)


def client_api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    """$PERCEIVER_API_KEY, checked as the server checks it; None when it is not set."""
    if API_KEY_ENV not in environ:
        return None
    key = environ[API_KEY_ENV]
    return check_api_key(key.strip(" \t\r\n") if key.strip() else key, API_KEY_ENV)


# -- perceiver ray-fill --------------------------------------------------------------------


@dataclass(frozen=True)
class RayOptions(_Options):
    """How `ray-fill` uses Ray (the command's flags)."""

    address: str | None = None  # None: start a local Ray for this run
    actors: int = 1  # model copies that run at once
    gpus_per_actor: float = 0  # fractions put several actors on one GPU
    cpus_per_actor: float | None = None  # None: 1, or on a local Ray its CPUs / actors
    quiet_ray: bool = True  # keep Ray's own logs off stderr

    def __post_init__(self):
        if isinstance(self.actors, bool) or not isinstance(self.actors, int) or self.actors < 1:
            raise OptionError("actors", f"must be a whole number, at least 1 (got {self.actors!r})")
        for name in ("gpus_per_actor", "cpus_per_actor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise OptionError(name, f"must be a number, at least 0 (got {value!r})")
            if value > 1 and value != int(value):
                raise OptionError(name, f"must be a whole number when above 1 (got {value!r})")

    def check_load(self, load: LoadOptions) -> None:
        """The rules between Ray's resources and the model's: int8 needs CPU actors."""
        if load.quantize == "int8" and self.gpus_per_actor:
            raise OptionError("quantize", f"{INT8_CPU_ONLY}: use no GPUs per actor")
