"""``speechlm-eval check``: the release gate (exit 1 on a failed gate, 2 on unusable input; the step summary is
written either way)."""

from __future__ import annotations

import typer

from speechlm_eval.cli.common import EXIT_REGRESSION, console, fail
from speechlm_eval.cli.options import config_command
from speechlm_eval.report.check import CheckConfig

HELP = ("CI gate: exit 1 when a subset's score drops (or a gap grows) by more than --max-drop with p < --alpha, or "
        "when the candidate lacks a subset or arm of the baseline, answered different items, has more unusable "
        "answers than --max-error-rate allows, or did not hear its audio. Prints a Markdown table (also appended to "
        "$GITHUB_STEP_SUMMARY when set, on every exit code); exit 2 on unusable runs or options.")


def check(config: CheckConfig) -> None:
    from speechlm_eval.report.check import CheckError, append_step_summary, render_check_error, render_check_markdown
    from speechlm_eval.report.check import check as run_check

    try:
        report = run_check(config)
    except CheckError as error:
        append_step_summary(render_check_error(config.baseline, config.candidate, str(error)))
        fail(str(error))
    markdown = render_check_markdown(report)
    typer.echo(markdown, nl=False)
    append_step_summary(markdown)
    for failure in report.failures:
        console.print(f"[bold red]gate failure:[/] {failure.line()}", highlight=False, soft_wrap=True, markup=True)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(EXIT_REGRESSION)


def register(app: typer.Typer) -> None:
    config_command(app, "check", [CheckConfig], check, help=HELP)
