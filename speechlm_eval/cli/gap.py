"""``speechlm-eval gap``: answer every item three ways and report forgetting and inequivalence."""

from __future__ import annotations

import typer

from speechlm_eval.cli.common import bad_input_exits, console, fail
from speechlm_eval.cli.options import config_command
from speechlm_eval.gap import GapConfig

HELP = "Answer every item three ways (text LLM · text, speech LLM · text, speech LLM · speech) and report the gaps."


def gap(config: GapConfig) -> None:
    from speechlm_eval.distributed import process_state
    from speechlm_eval.gap import run_gap
    from speechlm_eval.judge.base import JudgeError
    from speechlm_eval.report.build import RunFailedError
    from speechlm_eval.report.summary import print_gap_summary
    from speechlm_eval.rundir import RunDir

    with bad_input_exits():
        try:
            run_dir = run_gap(config, console=console)
        except RunFailedError as error:
            print_gap_summary(console, RunDir(error.run_dir).read_results())
            fail(str(error))
        except JudgeError as error:  # after the arms: their records are kept
            fail(f"{error}. The answers are kept in {config.out}; score them once the judge works with "
                 f"`speechlm-eval report {config.out} --judge {config.judge}`")
    if process_state().is_main_process:
        print_gap_summary(console, RunDir(run_dir).read_results())
        console.print(f"[green]results:[/] {run_dir / 'results.json'}\n[green]report:[/]  {run_dir / 'report.md'}")
        typer.echo(str(run_dir / "report.md"))


def register(app: typer.Typer) -> None:
    config_command(app, "gap", [GapConfig], gap, help=HELP)
