"""The command line: one module per command, one framework (typer), options generated from each command's config
dataclass. Commands only parse options and call library functions; everything is callable from Python too.

Exit codes, for every command: 0 ok, 1 a failed gate (``check``: a regression or a broken candidate), 2 unusable
input, 3 an internal error (a bug).
"""

from __future__ import annotations

from typing import Optional

import typer

from speechlm_eval.cli import check, distill, export, families, gap, lmeval, organism, report, score

app = typer.Typer(
    help="Measure what a speech LLM lost when it learned to listen (forgetting, modality inequivalence), and repair "
         "it by cross-modal distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (gap, report, score, check, export, lmeval, distill, organism, families):
    command.register(app)


@app.callback()
def configure(log_level: Optional[str] = typer.Option(
        None, "--log-level", help="debug | info | warning | error (default info, or $SPEECHLM_EVAL_LOG_LEVEL). "
        "Progress of long stages is logged at info every $SPEECHLM_EVAL_PROGRESS_INTERVAL seconds (default 30) when "
        "stderr is not a terminal.")) -> None:
    from speechlm_eval.cli.common import bad_input_exits
    from speechlm_eval.progress import configure_logging

    with bad_input_exits():
        configure_logging(log_level)


def main() -> None:
    """The ``speechlm-eval`` entry point. An exception no check anticipated is a bug: its traceback is printed and the
    exit code is 3, so it cannot pass for ``check``'s exit 1 (a failed gate)."""
    import sys
    import traceback

    from speechlm_eval.cli.common import EXIT_INTERNAL

    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:  # noqa: BLE001 - the last line of defence
        traceback.print_exc()
        print("speechlm-eval: internal error (a bug, not a problem with your input); please report it with the "
              "traceback above", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
