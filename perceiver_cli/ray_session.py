"""How `perceiver ray-fill` runs Ray in its own process (ray_fill.py's driver): a local Ray
started, or a cluster joined, and shut down; Ray's own messages kept off stderr; Ray's
failures as one line. The `ray` module is handed in: only ray_fill.py imports it, so that
`perceiver --help` and the other commands never load it. Nothing here knows of files,
records or the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from .errors import PerceiverError
from .options import OptionError, RayOptions


class RaySession:
    """Ray for one run: a local Ray started, or the cluster of `settings.address` joined,
    unless this process is already connected; shut down at the end when started here.

    With `quiet_ray`, Ray's own messages stay off stderr and stdout: its C++ core prints
    notices on descriptor 2 that no Python setting silences, and the driver's thread that
    listens for errors prints them on `sys.stdout` (`(raylet) Task ... submit failed` when a
    failed run stops its actors). So while the run lasts descriptor 2 and `sys.stdout` go
    to a log file and `sys.stderr` (our messages, the progress bar) to a copy of the real
    stderr. The file is removed after the run, or kept and named in the error when Ray
    itself fails (a plain `PerceiverError`, not the model's nor the input's)."""

    def __init__(self, ray, settings: RayOptions):
        self.ray, self.settings, self.started = ray, settings, False
        self.log: str | None = None  # the file that keeps Ray's messages
        self.saved: int | None = None  # the real stderr, while descriptor 2 is the log
        self.stderr = self.stdout = None  # sys.stderr and sys.stdout before

    def __enter__(self) -> "RaySession":
        if self.settings.quiet_ray:
            self._quiet()
        try:
            if not self.ray.is_initialized():
                _init_ray(self.ray, self.settings)
                self.started = True
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def _quiet(self) -> None:
        import io
        import sys
        import tempfile

        fd, self.log = tempfile.mkstemp(prefix="perceiver-ray-fill-", suffix=".log")
        os.close(fd)
        if sys.stderr is not None:
            sys.stderr.flush()
        self.saved, self.stderr = os.dup(2), sys.stderr
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND)  # Ray's processes append to it too
        os.dup2(fd, 2)
        os.close(fd)
        sys.stderr = io.TextIOWrapper(io.FileIO(self.saved, "w", closefd=False), line_buffering=True,
                                      encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                      errors="backslashreplace")
        self.stdout, sys.stdout = sys.stdout, open(self.log, "a", encoding="utf-8", errors="backslashreplace")

    def __exit__(self, kind, error, tb) -> None:
        keep = self.log is not None and kind is PerceiverError
        if keep:
            error.args = (f"{error} (Ray's own messages: {self.log})",)
        try:
            if self.started:
                _settle()
                self.ray.shutdown()
        finally:
            if self.saved is not None:
                self._loud(keep)

    def _loud(self, keep: bool) -> None:
        import sys

        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        log, sys.stdout = sys.stdout, self.stdout
        log.close()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.saved, sys.stderr = None, self.stderr
        if not keep:
            try:
                os.unlink(self.log)
            except OSError:
                pass


SETTLE_S = 30.0  # at most this long for Ray Data's executor threads to end before ray.shutdown


def _settle(timeout: float = SETTLE_S) -> None:
    """Wait for Ray Data's executor threads (`StreamingExecutor-*`) that are still running
    to end. A run interrupted by Ctrl-C (or failed) leaves its executor shutting down in
    the background, and `ray.shutdown()` under it can end the whole process at once with
    status 1 (seen under load: the interrupted run then exited 1 instead of 130)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name.startswith("StreamingExecutor-") and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def check_local_resources(have: dict, settings: RayOptions) -> None:
    """An actor that asks for more than the local Ray has would wait for it forever."""
    for name, key, want in (("cpus_per_actor", "CPU", settings.cpus_per_actor),
                            ("gpus_per_actor", "GPU", settings.gpus_per_actor)):
        if want and want > have.get(key, 0):
            raise OptionError(name, f"asks for {want:g} {key}{'s' * (want != 1)} per actor, more than the "
                                    f"{have.get(key, 0):g} of the local Ray this run started (give --address for "
                                    "a cluster that has them)")


def _init_ray(ray, settings: RayOptions) -> None:
    quiet = settings.quiet_ray
    _quiet_loggers(quiet)
    kwargs: dict = dict(include_dashboard=False, log_to_driver=not quiet)
    if quiet:
        kwargs["logging_level"] = logging.ERROR
    try:
        if settings.address is not None:
            _reachable(settings.address)
        with _utf8_entrypoint(ray):  # "local": a new Ray, never one that happens to run here
            ray.init(address=settings.address or "local", **kwargs)
    except PerceiverError:
        raise
    except Exception as e:
        where = f"the Ray cluster at {settings.address}" if settings.address else "a local Ray"
        raise PerceiverError(f"cannot start or reach {where}: {_first_line(e)}") from e
    _quiet_loggers(quiet)  # again: ray.init sets its own


@contextlib.contextmanager
def _utf8_entrypoint(ray):
    """Ray records the driver's command line as UTF-8 text, and fails on a file name that is
    not UTF-8 (`caf\\xe9.txt`): it gets that line with such bytes escaped."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    original = getattr(utils, "get_entrypoint_name", None)
    if original is None:  # another Ray: nothing to mend
        yield
        return
    utils.get_entrypoint_name = lambda: original().encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        yield
    finally:
        utils.get_entrypoint_name = original


def _quiet_loggers(quiet: bool) -> None:
    for name in ("ray", "ray.data") if quiet else ():
        logging.getLogger(name).setLevel(logging.ERROR)


def _reachable(address: str) -> None:
    """A cluster's `host:port` must take a connection: Ray itself would wait minutes, silent."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # "auto" and the like: Ray's to judge
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise PerceiverError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def from_ray(error: BaseException) -> PerceiverError:
    """A failed Ray run in one line (exit 1): the first exception named in Ray's text of
    the failure (the actor's traceback comes back as text), else Ray's own message."""
    import re

    for line in str(error).splitlines():
        found = re.match(r"([A-Za-z_][\w.]*(?:Error|Exception|Failure|Exit)\w*): (.+)", line)
        if found and not found[1].startswith("ray."):
            return PerceiverError(f"the Ray run failed: {found[1].rsplit('.', 1)[-1]}: {found[2].strip()}")
    return PerceiverError(f"the Ray run failed: {type(error).__name__}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
