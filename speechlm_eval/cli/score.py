"""``speechlm-eval score voicebench|mmau``: re-score outputs already written in the official formats."""

from __future__ import annotations

import json
from typing import Any

import typer

from speechlm_eval.cli.common import fail
from speechlm_eval.cli.options import config_command
from speechlm_eval.scoring.rescore import MmauScoreConfig, VoiceBenchScoreConfig


def _print_json(obj: Any) -> None:
    from speechlm_eval.records import json_safe

    typer.echo(json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False))


def score_voicebench(config: VoiceBenchScoreConfig) -> None:
    from speechlm_eval.scoring.rescore import RescoreError, check_output_path, rescore_voicebench, write_per_item

    try:
        if config.per_item is not None:
            check_output_path(config.per_item)
        result = rescore_voicebench(config.file, config.subset, seed=config.seed, split=config.split)
        if config.per_item is not None:
            write_per_item(config.per_item, result.per_item)
    except RescoreError as error:
        fail(str(error))
    _print_json(result.metrics)


def score_mmau(config: MmauScoreConfig) -> None:
    from speechlm_eval.scoring.rescore import RescoreError, check_output_path, rescore_mmau, write_per_item

    try:
        if config.per_item is not None:
            check_output_path(config.per_item)
        result = rescore_mmau(config.file)
        if config.per_item is not None:
            write_per_item(config.per_item, result.per_item)
    except RescoreError as error:
        fail(str(error))
    _print_json(result.metrics)


def register(app: typer.Typer) -> None:
    score_app = typer.Typer(help="Re-score outputs already written in the official VoiceBench / MMAU formats.",
                            no_args_is_help=True)
    config_command(score_app, "voicebench", [VoiceBenchScoreConfig], score_voicebench, with_config_file=False,
                   help="Score a VoiceBench output file with the official rules; prints one JSON object with the "
                        "official metrics.")
    config_command(score_app, "mmau", [MmauScoreConfig], score_mmau, with_config_file=False,
                   help="Score an MMAU test-mini file as evaluation.py does; prints total_accuracy, n and the "
                        "per-group accuracies (%).")
    app.add_typer(score_app, name="score")
