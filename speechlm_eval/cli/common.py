"""What every command shares: the console, the exit-code convention and how bad input becomes a clean error."""

from __future__ import annotations

import contextlib
from typing import Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

EXIT_OK = 0
EXIT_REGRESSION = 1  # `check`: a significant regression (a failed gate)
EXIT_BAD_INPUT = 2  # unusable input: a bad option, file, model path or run directory
EXIT_INTERNAL = 3  # a bug: an exception no check anticipated (the traceback is printed), never confused with 1

console = Console(stderr=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def bad_input_exits() -> Iterator[None]:
    """Turn the errors that mean "the input is unusable" into :func:`fail` (exit 2, no traceback): bad values and
    files, a path that cannot be read or written, a judge that refuses or cannot be reached, a TTS engine that cannot
    speak. (A run's records are kept; the message says what to fix.)"""
    from speechlm_eval.judge.base import JudgeError
    from speechlm_eval.speech.engine import TTSError

    try:
        yield
    except UnicodeDecodeError as error:
        fail(f"not UTF-8 text: {error}")
    except (ValueError, OSError, JudgeError, TTSError) as error:
        fail(_message(error))


def _message(error: BaseException) -> str:
    """An OSError as "what: path" (its str() is "[Errno 13] Permission denied: 'x'"), anything else as is."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
