"""Progress of every long stage, and the one place logging is configured.

A stage (an arm, the diagnostics pass, the perception probe, the judge, lm-eval, the teacher cache, distillation
training) reports through :func:`stage`: a rich bar when stderr is a terminal, and otherwise (CI, slurm, a redirected
log) a plain log line when it starts, at least every ``interval`` seconds while it runs — from a heartbeat thread, so a
batch that takes minutes still shows the run is alive — and when it ends, each with items/s and an ETA. rich alone
renders nothing useful to a file; these lines are what a CI log or a slurm ``.out`` file shows.

The interval is 30 s (``$SPEECHLM_EVAL_PROGRESS_INTERVAL`` overrides it; tests use a fraction of a second). The CLI
calls :func:`configure_logging` once, from ``--log-level`` (or ``$SPEECHLM_EVAL_LOG_LEVEL``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any

INTERVAL_ENV = "SPEECHLM_EVAL_PROGRESS_INTERVAL"
LOG_LEVEL_ENV = "SPEECHLM_EVAL_LOG_LEVEL"
DEFAULT_INTERVAL_S = 30.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("speechlm_eval.progress")
_live = threading.Lock()  # rich can show one live display at a time; a nested stage logs instead


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at emit time (a test runner swaps it per command)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler assigns it; the property always reads sys.stderr
        pass


def configure_logging(level: str | None = None) -> None:
    """Send ``speechlm_eval`` log records at ``level`` (default ``info``, or ``$SPEECHLM_EVAL_LOG_LEVEL``) to stderr.

    Idempotent: the package logger gets exactly one handler of ours however often it is called.
    """
    name = (level or os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logger = logging.getLogger("speechlm_eval")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(name.upper())


def progress_interval() -> float:
    """Seconds between plain progress lines (``$SPEECHLM_EVAL_PROGRESS_INTERVAL``, default 30)."""
    raw = os.environ.get(INTERVAL_ENV)
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status_line(name: str, done: int, total: int | None, elapsed: float, unit: str = "items",
                already: int = 0) -> str:
    """``"name: 40/144 items (28%), 3.1 items/s, elapsed 0:00:13, ETA 0:00:34"``; the rate counts only what this
    process did (``done - already``)."""
    rate = (done - already) / elapsed if elapsed > 0 else 0.0
    if total:
        eta = _clock((total - done) / rate) if rate > 0 else "?"
        return (f"{name}: {done}/{total} {unit} ({100 * done / total:.0f}%), {rate:.2f} {unit}/s, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")
    return f"{name}: {done} {unit}, {rate:.2f} {unit}/s, elapsed {_clock(elapsed)}"


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Stage:
    """One long stage's progress; use as a context manager and call :meth:`advance` as work finishes."""

    def __init__(self, name: str, total: int | None, *, unit: str = "items", enabled: bool = True,
                 interval: float | None = None, rich: bool | None = None, completed: int = 0) -> None:
        self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
        self.interval = progress_interval() if interval is None else interval
        self.done = self.completed = completed  # ``completed``: done before this process started (a resume)
        self.postfix = ""
        self._rich = _is_terminal() if rich is None else rich
        self._progress: Any = None
        self._task: Any = None
        self._owns_live = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> "Stage":
        self._start = time.perf_counter()
        if not self.enabled:
            return self
        if self._rich and _live.acquire(blocking=False):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._owns_live = True
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[postfix]}"), console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=self.total, completed=self.completed, postfix="")
        else:
            log.info("%s", self.line())
            self._thread = threading.Thread(target=self._heartbeat, name=f"progress:{self.name}", daemon=True)
            self._thread.start()
        return self

    def line(self) -> str:
        text = status_line(self.name, self.done, self.total, time.perf_counter() - self._start, self.unit,
                           already=self.completed)
        return f"{text} {self.postfix}".rstrip()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            log.info("%s", self.line())

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        """``n`` more units done; ``postfix`` (e.g. the current loss) is shown after the counts."""
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if self._progress is not None:
            self._progress.update(self._task, advance=n, postfix=self.postfix)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._owns_live:
            _live.release()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            outcome = "done" if exc_type is None else f"stopped ({exc_type.__name__})"
            log.info("%s [%s]", self.line(), outcome)


def stage(name: str, total: int | None, *, unit: str = "items", enabled: bool = True,
          interval: float | None = None, completed: int = 0) -> Stage:
    """The progress of one long stage (see the module docstring); ``enabled=False`` (other ranks) shows nothing."""
    return Stage(name, total, unit=unit, enabled=enabled, interval=interval, completed=completed)
