"""``speechlm-eval organism build|experiments|tune``: build the model organism, run its distillation experiment, and
tune the alignment channels on its tuning split."""

from __future__ import annotations

import json

import typer

from speechlm_eval.cli.common import bad_input_exits
from speechlm_eval.cli.options import config_command
from speechlm_eval.experiments.organism import ExperimentsConfig
from speechlm_eval.experiments.tuning import TuningConfig
from speechlm_eval.organism.config import BuildConfig

BUILD_HELP = ("Build the model organism from scratch: world, tokenizer, text LLM, clips, speech LLM (stages A and "
              "B). Deterministic for a seed on a given machine and library set; about 15 minutes on 2 CPU cores. "
              "Prints the build's timings, sizes and measured gaps; evaluate it with `speechlm-eval gap --model "
              "OUT/speech_llm --text-model OUT/text_llm --suite organism:organism_mcq@seedN`.")
EXPERIMENTS_HELP = ("The organism's distillation experiment: KD, its channel ablations and two controls on one or "
                    "more builds (one per seed), each scored by gap; writes OUT/experiments.{json,md}.")


def build(config: BuildConfig) -> None:
    from speechlm_eval.organism.builder import build_organism

    with bad_input_exits():
        paths = build_organism(config)
    summary = json.loads(paths.summary.read_text())
    typer.echo(json.dumps({k: summary.get(k) for k in ("timings_s", "sizes", "measurements")}, indent=1))
    typer.echo(str(paths.summary))


def experiments(config: ExperimentsConfig) -> None:
    from speechlm_eval.experiments.organism import experiments as run_experiments

    with bad_input_exits():
        path = run_experiments(config)
    typer.echo(str(path))


TUNE_HELP = ("Choose the alignment channels' settings on the organism's tuning split (48 distillation-only facts "
             "held out of distillation), never on the evaluation suite; writes OUT/tuning.{json,md}.")


def tune(config: TuningConfig) -> None:
    from speechlm_eval.experiments.tuning import tune as run_tune

    with bad_input_exits():
        path = run_tune(config)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    organism_app = typer.Typer(help="The model organism: a tiny text LLM + speech LLM pair that shows forgetting and "
                               "inequivalence (the embedded default).", no_args_is_help=True)
    config_command(organism_app, "build", [BuildConfig], build, help=BUILD_HELP)
    config_command(organism_app, "experiments", [ExperimentsConfig], experiments, help=EXPERIMENTS_HELP)
    config_command(organism_app, "tune", [TuningConfig], tune, help=TUNE_HELP)
    app.add_typer(organism_app, name="organism")
