"""The command line: one module per command, one framework (typer), options generated from each command's config
dataclass. Commands only parse options and call library functions; everything is callable from Python too.

Exit codes, for every command: 0 ok, 1 a failed gate (``check`` found a regression), 2 unusable input.
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
    app()


if __name__ == "__main__":
    main()
