"""``speechlm-eval gap``: answer every item three ways and report forgetting and inequivalence."""

from __future__ import annotations

import typer

from speechlm_eval.cli.common import bad_input_exits, console
from speechlm_eval.cli.options import config_command
from speechlm_eval.gap import GapConfig

HELP = "Answer every item three ways (text LLM · text, speech LLM · text, speech LLM · speech) and report the gaps."


def gap(config: GapConfig) -> None:
    from speechlm_eval.distributed import process_state
    from speechlm_eval.gap import run_gap

    with bad_input_exits():
        run_dir = run_gap(config, console=console)
    if process_state().is_main_process:
        from speechlm_eval.report.summary import print_gap_summary
        from speechlm_eval.rundir import RunDir

        print_gap_summary(console, RunDir(run_dir).read_results())
        console.print(f"[green]results:[/] {run_dir / 'results.json'}\n[green]report:[/]  {run_dir / 'report.md'}")
        typer.echo(str(run_dir / "report.md"))


def register(app: typer.Typer) -> None:
    config_command(app, "gap", [GapConfig], gap, help=HELP)
