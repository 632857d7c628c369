"""``speechlm-eval report``: rebuild a run's results and reports from its records alone."""

from __future__ import annotations

import typer

from speechlm_eval.cli.common import bad_input_exits
from speechlm_eval.cli.options import config_command
from speechlm_eval.report.build import ReportConfig

HELP = "Rebuild results.json, report.md and report.html from a run's records alone (no model is loaded)."


def report(config: ReportConfig) -> None:
    from speechlm_eval.report.build import rebuild_report

    with bad_input_exits():
        path = rebuild_report(config)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    config_command(app, "report", [ReportConfig], report, help=HELP, with_config_file=False)
