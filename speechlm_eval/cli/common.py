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

console = Console(stderr=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def bad_input_exits() -> Iterator[None]:
    """Turn the errors that mean "the input is unusable" (raised before any work is lost) into :func:`fail`."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
