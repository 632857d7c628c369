"""``speechlm-eval check``: the release gate (exit 1 on a significant regression, 2 on unusable input)."""

from __future__ import annotations

import typer

from speechlm_eval.cli.common import EXIT_REGRESSION, fail
from speechlm_eval.cli.options import config_command
from speechlm_eval.report.check import CheckConfig

HELP = ("CI gate: exit 1 when a subset's score drops (or a gap grows) by more than --max-drop with p < --alpha. "
        "Prints a Markdown table (also appended to $GITHUB_STEP_SUMMARY when set); exit 2 on unusable runs.")


def check(config: CheckConfig) -> None:
    from speechlm_eval.report.check import CheckError, append_step_summary, render_check_markdown
    from speechlm_eval.report.check import check as run_check

    try:
        report = run_check(config)
    except CheckError as error:
        fail(str(error))
    markdown = render_check_markdown(report)
    typer.echo(markdown, nl=False)
    append_step_summary(markdown)
    if report.failed:
        raise typer.Exit(EXIT_REGRESSION)


def register(app: typer.Typer) -> None:
    config_command(app, "check", [CheckConfig], check, help=HELP)
