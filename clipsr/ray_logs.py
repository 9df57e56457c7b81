"""Where Ray's own driver-side output goes: a log file by default, the console with ``--verbose``.

A person running a job wants its progress and its failures; Ray, in the process that starts or
joins it, writes its own: its Python loggers ("ray", "ray.data", ...: cluster start, the token
notice, Ray Data's execution plan and its progress tables) and the ERROR lines of its native core,
which go straight to file descriptor 2. One such line comes with every Ray Data actor pool in Ray
2.60 ("Actor ... has constructor arguments in the object store and max_restarts > 0",
ray-project/ray#57733): Ray Data hands each actor its context by object reference, the driver owns
those objects for the whole run, so the restarts it warns about still work, and turning restarts
off to silence it would cost the pool its recovery from a lost node.

So, while quiet: Ray's Python loggers write to the file instead of the console, and so do the
Python warnings raised inside Ray's code (Ray Data's notes on pool sizes and deprecated settings);
descriptor 2 points at the file too, and ``sys.stderr`` (progress lines, the job's own log lines and
messages) at a copy of the console; Ray Data's progress bars and execution-plan lines are off
(:func:`quiet_data`). :func:`stop` puts everything back. Nothing here imports Ray.
"""
from __future__ import annotations

import datetime as dt
import io
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO

#: Where the files go: ``$CLIPSR_LOG_DIR``, else ``<temp dir>/clipsr``.
LOG_DIR_ENV = "CLIPSR_LOG_DIR"


@dataclass
class _Quiet:
    path: str
    file: TextIO
    target: logging.Handler  # Ray's log records, into the file
    console_fd: int
    stderr: TextIO  # sys.stderr before
    console: TextIO | None  # the console copy given to sys.stderr, when sys.stderr wrote to descriptor 2
    handlers: list[tuple[logging.Logger, logging.Handler]] = field(default_factory=list)  # moved to the file
    stream_handlers: list[logging.StreamHandler] = field(default_factory=list)  # pointed at the console copy
    showwarning: Any = None  # warnings.showwarning before


_active: _Quiet | None = None
_last: str | None = None  # the file of the latest start(), stopped or not


def log_path() -> str | None:
    """The file Ray's driver-side output goes to now (None: to the console)."""
    return _active.path if _active else None


def last_path() -> str | None:
    """The file of the latest :func:`start`, also after :func:`stop` (a Ray that failed to start
    left its reasons there)."""
    return _last


def new_log_path(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    folder = os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), "clipsr")
    return os.path.join(folder, f"ray-{now.strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}.log")


def start(path: str | None = None) -> str:
    """Send Ray's driver-side output to ``path`` (default: :func:`new_log_path`); returns the path.
    Call before ``ray.init``, so that what Ray prints while starting goes there too."""
    global _active, _last
    if _active is not None:
        return _active.path
    path = _last = path or new_log_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115  closed by stop()
    sys.stderr.flush()
    console_fd = os.dup(2)
    target = logging.StreamHandler(file)
    target.setLevel(logging.INFO)  # Ray Data keeps its debug lines in its own ray-data.log
    target.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    state = _Quiet(path=path, file=file, target=target, console_fd=console_fd, stderr=sys.stderr, console=None)
    if _writes_to_fd2(sys.stderr):
        state.console = io.TextIOWrapper(io.FileIO(console_fd, "w", closefd=False),
                                         encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                         errors="backslashreplace", line_buffering=True)
        for handler in _all_handlers():  # _StderrHandler looks sys.stderr up as it writes: nothing to move
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging._StderrHandler)
                    and handler.stream is sys.stderr):
                handler.setStream(state.console)
                state.stream_handlers.append(handler)
        sys.stderr = state.console
    os.dup2(file.fileno(), 2)
    state.showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    _active = state
    route_ray_loggers()
    return path


def route_ray_loggers() -> None:
    """Move the console handlers of Ray's loggers ("ray" and "ray.*") to the file. Called by
    :func:`start`; call again after importing a Ray library that sets up its own logger (Ray Data
    does when imported)."""
    if _active is None:
        return
    target = _active.target
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or not (name == "ray" or name.startswith("ray.")):
            continue
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                _active.handlers.append((logger, handler))
                if target not in logger.handlers:
                    logger.addHandler(target)


def quiet_data(context: Any, verbose: bool = False) -> None:
    """Ray Data's progress bars and the execution-plan lines printed when a dataset starts: on
    with ``verbose``, off otherwise (the job draws its own progress line)."""
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose


def note(text: str) -> None:
    """A line of context in the file (where Ray's own session logs are, for one)."""
    if _active is not None:
        _active.file.write(text.rstrip("\n") + "\n")


def stop() -> None:
    """Ray's output back to the console, as before :func:`start`."""
    global _active
    state, _active = _active, None
    if state is None:
        return
    sys.stderr.flush()
    os.dup2(state.console_fd, 2)
    if warnings.showwarning is _show_warning:
        warnings.showwarning = state.showwarning
    for handler in state.stream_handlers:
        handler.setStream(state.stderr)
    if state.console is not None and sys.stderr is state.console:
        sys.stderr = state.stderr
    for logger, handler in state.handlers:
        logger.removeHandler(state.target)
        logger.addHandler(handler)
    state.target.close()
    if state.console is not None:
        state.console.close()
    os.close(state.console_fd)
    state.file.close()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings raised in Ray's code (or of Ray's own deprecation class) go to the file."""
    state = _active
    from_ray = f"{os.sep}ray{os.sep}" in filename or category.__name__ == "RayDeprecationWarning"
    if state is not None and from_ray:
        state.file.write(warnings.formatwarning(message, category, filename, lineno, line))
    elif state is not None:
        state.showwarning(message, category, filename, lineno, file, line)
    else:  # stopped, but another hook kept this one in its chain
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def _writes_to_fd2(stream: TextIO) -> bool:
    """Whether a stream is the process's descriptor 2 (not a test's capture, not a redirect)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers]
