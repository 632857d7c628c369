"""``speechlm-eval distill`` (gap before, distillation, gap after, comparison) and the bare training run behind
``python -m speechlm_eval.distill`` (the entry ``accelerate launch -m`` / ``torchrun -m`` start), from one config."""

from __future__ import annotations

import typer

from speechlm_eval.cli.common import bad_input_exits
from speechlm_eval.cli.options import config_command
from speechlm_eval.distill.config import DistillConfig, EvalConfig
from speechlm_eval.embedded import ORGANISM_DISTILL_DEFAULTS

HELP = ("Repair a speech LLM by cross-modal knowledge distillation (T→T and S→T) from its text LLM teacher, then "
        "report forgetting and inequivalence before and after. With no --student/--teacher it repairs the embedded "
        "model organism with its own data and defaults ("
        + ", ".join(f"{k}={v}" for k, v in ORGANISM_DISTILL_DEFAULTS.items())
        + "). Defaults marked 'our reading' are our decisions, not the paper's.")
TRAIN_HELP = ("One cross-modal distillation run (T→T and S→T) from a text LLM into a speech LLM, resumable; "
              "prints OUT/checkpoint. Defaults marked 'our reading' are our decisions, not the paper's.")


def distill(config: DistillConfig, evaluation: EvalConfig) -> None:
    from speechlm_eval.distill.pipeline import distill_and_compare

    with bad_input_exits():
        report = distill_and_compare(config, evaluation)
    from speechlm_eval.cli.common import console
    from speechlm_eval.report.before_after import read_comparison
    from speechlm_eval.report.summary import before_after_table, print_gap_summary, print_table
    from speechlm_eval.rundir import RunDir

    print_gap_summary(console, RunDir(report.parent / "after").read_results(),
                      title="speechlm-eval gap after distillation")
    print_table(console, before_after_table(read_comparison(report.parent)))
    typer.echo(str(report))


def train(config: DistillConfig) -> None:
    from speechlm_eval.distill.train import distill as run_distillation
    from speechlm_eval.progress import configure_logging

    with bad_input_exits():
        configure_logging()
        path = run_distillation(config)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    config_command(app, "distill", [DistillConfig, EvalConfig], distill, help=HELP)


def train_app() -> typer.Typer:
    """The single-command app of ``python -m speechlm_eval.distill``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    config_command(app, "train", [DistillConfig], train, help=TRAIN_HELP)
    return app
